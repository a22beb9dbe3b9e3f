#!/usr/bin/env bash
# crash-table.sh [DIR]: print the crash-point table that tests/crashpoints.rs left in DIR
# (default: the cargo target directory's tmp/crashpoints), failpoint × invariant, and how many
# of the daemon's failpoints were covered.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${CARGO_TARGET_DIR:-target}/tmp/crashpoints}
[ -d "$DIR" ] || { echo "crash-table: no rows in $DIR (tests/crashpoints.rs did not run)"; exit 0; }
all=$(sed -n '/^pub const ALL/,/^];/p' src/failpoint.rs | grep -o '"[a-z:-]*"' | tr -d '"')
total=$(echo "$all" | wc -l)
printf '%-40s %-6s %-8s %-7s %-5s %-8s\n' failpoint once applied alarms disk notices
covered=0
for p in $all; do
  f="$DIR/${p//:/_}"
  if [ -f "$f" ]; then
    covered=$((covered + 1))
    IFS=$'\t' read -r name once applied alarms disk notices < "$f"
    printf '%-40s %-6s %-8s %-7s %-5s %-8s\n' "$name" "$once" "$applied" "$alarms" "$disk" "$notices"
  else
    printf '%-40s %s\n' "$p" "NOT RUN"
  fi
done
echo "crash points covered: $covered of $total"
