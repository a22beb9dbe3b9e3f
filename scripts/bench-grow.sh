#!/usr/bin/env bash
# bench-grow.sh [N]: live disk grow latency, N grows each (default 30), three ways side by
# side: through a real vmkeeper daemon (configuration change + `reload` on its API), in-process
# (librbd + our QMP client), and a shell script (rbd CLI + a one-shot QMP client).
# Release builds. Needs the harness: `harness/run.sh scripts/bench-grow.sh 30`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CEPH_CONF:-}" ] || { echo "bench-grow: run under the harness: harness/run.sh scripts/bench-grow.sh" >&2; exit 2; }
cargo build --quiet --release --example bench_grow --bin vmkeeper
export VMKEEPER_BIN=$PWD/target/release/vmkeeper
exec target/release/examples/bench_grow "${1:-30}"
