#!/usr/bin/env bash
# run.sh CMD [ARGS...]: bring up the harness in a fresh directory, run CMD with the harness
# environment (DIR/env) exported, tear everything down afterwards, and exit with CMD's code.
#
# Teardown runs on every way out: CMD's success or failure, a failed up.sh, and SIGINT,
# SIGTERM or SIGHUP to this script (CMD gets SIGTERM first, and SIGKILL after 30 s).
#   VMKEEPER_HARNESS_PARENT  where the directory is made (default /tmp; keep it short:
#                            unix socket paths below it are limited to 107 bytes)
#   VMKEEPER_HARNESS_KEEP=1  keep the directory (logs, journal) after teardown
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || { echo "usage: harness/run.sh CMD [ARGS...]" >&2; exit 2; }

DIR=$(mktemp -d "${VMKEEPER_HARNESS_PARENT:-/tmp}/vmkeeper-harness.XXXXXX") || exit 1
CHILD=
teardown() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ "${VMKEEPER_HARNESS_KEEP:-0}" = 1 ]; then
    echo "harness: keeping $DIR" >&2
  fi
  "$HERE/down.sh" "$DIR"
  exit "$rc"
}
on_signal() {
  local sig=$1 code=$2
  trap - INT TERM HUP
  echo "harness/run.sh: got SIG$sig, stopping" >&2
  if [ -n "$CHILD" ] && kill -0 "$CHILD" 2> /dev/null; then
    kill -TERM "$CHILD" 2> /dev/null
    for _ in $(seq 1 300); do
      kill -0 "$CHILD" 2> /dev/null || break
      sleep 0.1
    done
    kill -KILL "$CHILD" 2> /dev/null
  fi
  exit "$code"
}
trap teardown EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

T0=$(date +%s%N)
if ! "$HERE/up.sh" "$DIR"; then
  echo "harness/run.sh: the harness did not come up; logs:" >&2
  tail -n 20 "$DIR"/log/* "$DIR"/ceph/log/*.err 2> /dev/null >&2
  exit 1
fi
echo "harness: up in $((($(date +%s%N) - T0) / 1000000)) ms, running: $*" >&2
set -a
# shellcheck source=/dev/null
. "$DIR/env"
set +a

# CMD runs in a cgroup of its own, so that teardown also ends what it left behind (daemons,
# orphans, a QEMU whose test died), whatever their names or sessions.
CMD_CGROUP=
for root in /sys/fs/cgroup /sys/fs/cgroup/unified; do
  if [ "$(stat -fc %T "$root" 2> /dev/null)" = cgroup2fs ]; then
    CMD_CGROUP=$root/vmkeeper-harness-$(basename "$DIR").cmd
    mkdir "$CMD_CGROUP" && echo "$CMD_CGROUP" > "$DIR/cmd-cgroup" || CMD_CGROUP=
    break
  fi
done

# In the background so that a signal to this script is handled at once; the explicit stdin
# keeps an interactive CMD usable (background jobs otherwise read /dev/null).
(
  [ -z "$CMD_CGROUP" ] || echo "$BASHPID" > "$CMD_CGROUP/cgroup.procs"
  exec "$@"
) <&0 &
CHILD=$!
wait "$CHILD"
exit $?
