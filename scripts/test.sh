#!/usr/bin/env bash
# test.sh [NEXTEST ARGS...]: install what is needed and run every test: unit, property and
# integration tests with cargo-nextest inside the harness (real systemd, Ceph, QEMU guest),
# plus doc tests and `promtool test rules` for the example alert rules. As root on Debian
# 12. Extra arguments go to `cargo nextest run`, e.g. a filter: `scripts/test.sh --test
# harness`. With CI=true the nextest profile `ci` is used.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
PROFILE=default
[ "${CI:-}" = true ] && PROFILE=ci

# Build before the harness is up, so it is not kept waiting by a compile.
cargo nextest run --workspace --cargo-quiet --no-run
cargo test --workspace --doc --quiet
rc=0
# Rows of the crash-point table from an earlier run must not pass for this one's.
rm -rf "${CARGO_TARGET_DIR:-target}/tmp/crashpoints"
# The example alert rules, offline against their own synthetic series (tests/monitoring.rs
# runs them in a real Prometheus against the daemon's real metrics).
promtool check rules docs/examples/alerts.yml || rc=$?
promtool test rules docs/examples/alerts.test.yml || rc=$?
# The Ceph outage test stops the only OSD, so it runs alone, in a harness of its own
# (nextest profile `outage`; the default profiles leave it out). It goes first so that the
# last summary printed is the one of the whole suite.
harness/run.sh cargo nextest run --workspace --cargo-quiet --profile outage \
  --no-tests=pass "$@" || rc=$?
harness/run.sh cargo nextest run --workspace --cargo-quiet --profile "$PROFILE" "$@" || rc=$?
scripts/crash-table.sh
echo "test.sh: done in $(($(date +%s) - T0)) s" >&2
exit "$rc"
