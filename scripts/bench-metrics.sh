#!/usr/bin/env bash
# bench-metrics.sh [N...]: the metrics benchmark (examples/bench_metrics.rs) against a fresh
# harness: scrape time and size of a real daemon's /metrics for N VMs (default 10 100 1000),
# beside a `vmkeeper status --json` + python3 script producing the gauges status shows.
# Release build, for latency. Run as root; takes about a minute after the build.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# Built before the harness comes up.
cargo build --quiet --release --bin vmkeeper --example bench_metrics
export VMKEEPER_BIN=$TARGET/release/vmkeeper
exec "$ROOT/harness/run.sh" "$TARGET/release/examples/bench_metrics" "$@"
