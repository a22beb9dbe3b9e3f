#!/usr/bin/env bash
# bench-boot.sh [N]: a host start with N declared VMs (default 50): time until every unit is
# active, every QMP connection up and every guest booted, with the default bound on concurrent
# starts and without it. Release build; brings up its own harness. As root; 50 TCG guests need
# about 10 GiB of RAM and take a few minutes on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --quiet --release --example bench_boot --bin vmkeeper
export VMKEEPER_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/vmkeeper
exec "$ROOT/harness/run.sh" "${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench_boot" "${1:-50}"
