#!/usr/bin/env bash
# bench-observe.sh [N...]: the observation benchmark of issue 4 (examples/bench_observe.rs)
# against a fresh harness: one ListUnitsByPatterns call vs a `systemctl show` loop per unit,
# for N stand-in VM units (default 10 100 1000). Run as root.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# Built before the harness comes up, so compile time is not spent with it running. The dev
# profile is enough: the cost measured is systemd's and the bus's, not our parsing.
cargo build --quiet --example bench_observe
exec "$ROOT/harness/run.sh" "$ROOT/target/debug/examples/bench_observe" "$@"
