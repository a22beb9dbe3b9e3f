#!/usr/bin/env bash
# down.sh DIR: tear down what harness/up.sh DIR started, and remove DIR.
#
#  1. everything harness/run.sh's command left running is killed (it runs in a cgroup of its
#     own, so this catches orphans and daemons whatever their names);
#  2. the private systemd is asked to power off (SIGRTMIN+4): it stops its units (QEMU units
#     get SIGTERM) and exits; after VMKEEPER_HARNESS_STOP_TIMEOUT seconds it is killed, and
#     with it every process of its pid namespace;
#  3. every process still running whose command line names DIR (QEMUs started by tests, the
#     Ceph daemons, a KVM probe, clients) is killed: DIR is unique to this harness, so this
#     never touches anything else;
#  4. the cgroup subtrees are removed, anything mounted below DIR is unmounted, DIR is
#     deleted (VMKEEPER_HARNESS_KEEP=1 keeps DIR for its logs).
# Safe to run twice and after a partial up.sh.
set -uo pipefail

DIR=${1:?usage: harness/down.sh DIR}
[ -d "$DIR" ] || exit 0
DIR=$(cd "$DIR" && pwd)
STOP_TIMEOUT=${VMKEEPER_HARNESS_STOP_TIMEOUT:-20}
T0=$(date +%s%N)

# is pid $1 still a process whose command line contains $2? (guards against pid reuse)
ours() { [ -n "$1" ] && tr '\0' ' ' 2> /dev/null < "/proc/$1/cmdline" | grep -qF -- "$2"; }
# a zombie counts as gone: its parent may be long dead
alive() { [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2> /dev/null; }
# gone "PIDS" TENTHS: wait up to TENTHS/10 s until none of PIDS is alive
gone() {
  local p a
  for _ in $(seq 1 "$2"); do
    a=
    for p in $1; do alive "$p" && a=1 && break; done
    [ -z "$a" ] && return 0
    sleep 0.1
  done
  return 1
}

# ---- 1. what harness/run.sh's command left behind (its own cgroup)
kill_cgroup() {
  local cg=$1 p
  [ -n "$cg" ] && [ -d "$cg" ] || return 0
  if [ -e "$cg/cgroup.kill" ]; then
    echo 1 > "$cg/cgroup.kill" 2> /dev/null
  else
    while read -r p; do kill -KILL "$p" 2> /dev/null; done < "$cg/cgroup.procs"
  fi
  for _ in $(seq 1 50); do
    find "$cg" -depth -type d -exec rmdir {} \; 2> /dev/null
    [ -d "$cg" ] || return 0
    sleep 0.1
  done
  echo "harness/down.sh: could not remove $cg" >&2
}
kill_cgroup "$(cat "$DIR/cmd-cgroup" 2> /dev/null)"

# ---- 2. systemd
SDPID=$(cat "$DIR/systemd/pid" 2> /dev/null || true)
UNSHARE_PID=$(cat "$DIR/systemd/unshare.pid" 2> /dev/null || true)
if ours "$SDPID" "systemd --system --unit=harness.target"; then
  kill -s RTMIN+4 "$SDPID"
  if ! gone "$SDPID" $((STOP_TIMEOUT * 10)); then
    echo "harness/down.sh: systemd did not power off within ${STOP_TIMEOUT}s, killing it" >&2
    kill -KILL "$SDPID" 2> /dev/null
  fi
fi
if ours "$UNSHARE_PID" "$DIR/systemd/ns-init.sh"; then
  gone "$UNSHARE_PID" 50 || kill -KILL "$UNSHARE_PID" 2> /dev/null
fi

# ---- 3. everything else that names DIR (but not this script or its callers)
ancestors=" "
p=$$
while [ -n "$p" ] && [ "$p" -gt 1 ]; do
  ancestors+="$p "
  p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2> /dev/null)
done
victims=()
for f in $(grep -laF -- "$DIR/" /proc/[0-9]*/cmdline 2> /dev/null); do
  p=${f#/proc/}
  p=${p%/cmdline}
  case $ancestors in *" $p "*) continue ;; esac
  victims+=("$p")
done
if [ ${#victims[@]} -gt 0 ]; then
  kill -KILL "${victims[@]}" 2> /dev/null
  gone "${victims[*]}" 100 || echo "harness/down.sh: still running: ${victims[*]}" >&2
fi

# ---- 4. cgroup, mounts, files (cgroup.kill catches anything that escaped the pid namespace)
kill_cgroup "$(cat "$DIR/cgroup" 2> /dev/null)"
findmnt -rn -o TARGET | grep -F -- "$DIR" | sort -r | while read -r m; do umount -l "$m"; done

echo "harness: down in $((($(date +%s%N) - T0) / 1000000)) ms" >&2
[ "${VMKEEPER_HARNESS_KEEP:-0}" = 1 ] || rm -rf "$DIR"
exit 0
