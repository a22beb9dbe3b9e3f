#!/usr/bin/env bash
# bench-grow.sh [N]: live disk grow latency, in-process (librbd + our QMP client) against a
# shell script (rbd CLI + a one-shot QMP client), N grows each (default 20), side by side.
# Needs the harness (real Ceph + QEMU): run it as `harness/run.sh scripts/bench-grow.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CEPH_CONF:-}" ] || { echo "bench-grow: run under the harness: harness/run.sh scripts/bench-grow.sh" >&2; exit 2; }
# The dev profile optimises dependencies already; the latency is I/O, not our code.
cargo build --quiet --example bench_grow
exec target/debug/examples/bench_grow "${1:-20}"
