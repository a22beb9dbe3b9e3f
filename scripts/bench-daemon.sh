#!/usr/bin/env bash
# bench-daemon.sh [N...]: the daemon benchmark of issue 4 (examples/bench_daemon.rs) against a
# fresh harness, printed as two tables: one idle reconcile pass for N declared VMs whose units
# run (default 10 100 1000; stand-in units) against a `systemctl show` loop per VM, and a real
# idle daemon's context switches per minute and RSS. Run as root; takes 3-5 minutes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# Built before the harness comes up. The dev profile (dependencies optimised, as in
# Cargo.toml) is what the tests run too; the pass cost is systemd's and the bus's.
cargo build --quiet --bin vmkeeper --example bench_daemon
export VMKEEPER_BIN=$ROOT/target/debug/vmkeeper
exec "$ROOT/harness/run.sh" "$ROOT/target/debug/examples/bench_daemon" "$@"
