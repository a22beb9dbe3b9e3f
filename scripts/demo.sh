#!/usr/bin/env bash
# demo.sh: install what is needed, build vmkeeper, bring up the harness (real systemd, Ceph,
# QEMU) and show vmkeeper on the example configuration of two small VMs; everything is torn
# down at the end. As root on Debian 12.
#
# What it shows: the configuration check, the next maintenance windows, the plan; then the
# vmkeeper daemon running both VMs as QEMU units of the harness systemd on their RBD disks,
# a live disk grow seen by the guest, a refused shrink, QEMU unprivileged and sandboxed, the
# Prometheus metrics, a guest's own reboot raising an alarm, a kill -9 of the daemon that the
# VMs survive, a foreign RBD image refused until adopted, a CPU change of a VM of another
# project pending with its slot in that project's New York window, a deletion timeline, and
# a VM's story in the journal.
#
# Inside an existing harness (VMKEEPER_HARNESS_DIR set, e.g. `harness/run.sh scripts/demo.sh`)
# it skips installing and uses that harness.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ -z "${VMKEEPER_HARNESS_DIR:-}" ]; then
  scripts/install-deps.sh
  cargo build --quiet --bin vmkeeper
  exec harness/run.sh "$0" "$@"
fi

BIN=${CARGO_TARGET_DIR:-target}/debug/vmkeeper
[ -x "$BIN" ] || cargo build --quiet --bin vmkeeper
DEMO=$VMKEEPER_HARNESS_DIR/demo
CONFIG=$DEMO/demo.json
mkdir -p "$DEMO"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() {
  printf '$ %s\n' "$*"
  "$@"
}

# The example names the system paths a real host would use; point them into the harness.
python3 - examples/demo.json "$CONFIG" << 'PY'
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
cfg = json.load(open(src))
demo = os.path.dirname(dst)
cfg["stateDir"] = os.path.join(demo, "state")
cfg["runtimeDir"] = os.path.join(demo, "run")
cfg["ceph"]["conf"] = os.environ["CEPH_CONF"]
cfg["ceph"]["clientId"] = os.environ["VMKEEPER_CEPH_CLIENT"]
cfg["ceph"]["qemuClientId"] = os.environ["VMKEEPER_CEPH_QEMU_CLIENT"]
cfg["ceph"]["qemuKeyFile"] = os.environ["VMKEEPER_CEPH_QEMU_KEY"]
cfg["qemu"]["user"] = os.environ["VMKEEPER_QEMU_USER"]
cfg["ceph"]["pool"] = os.environ["VMKEEPER_CEPH_POOL"]
cfg["qemu"]["accel"] = os.environ["VMKEEPER_QEMU_ACCEL"]
# The harness has no time synchronization daemon; its clock stands for a synchronized one.
cfg["clock"] = {"syncedFlag": os.path.join(demo, "clock-synchronized")}
open(cfg["clock"]["syncedFlag"], "w").close()
for vm in cfg["vms"].values():
    vm["boot"]["kernel"] = os.environ["VMKEEPER_GUEST_KERNEL"]
    vm["boot"]["initrd"] = os.environ["VMKEEPER_GUEST_INITRD"]
json.dump(cfg, open(dst, "w"), indent=2)
PY

step "The configuration: two small VMs (examples/demo.json, paths pointed into the harness)"
python3 -c 'import json,sys
for n, v in json.load(open(sys.argv[1]))["vms"].items():
    print("  %s: %d cores, %d MiB RAM, %d GiB disk" % (n, v["cores"], v["memoryMiB"], v["diskGiB"]))' "$CONFIG"

step "vmkeeper validates it"
run "$BIN" check-config "$CONFIG"

step "The next maintenance windows of this host"
run "$BIN" windows --config "$CONFIG" --count 3

step "What vmkeeper would do now"
run "$BIN" plan --config "$CONFIG" --state-dir "$DEMO/state"

step "Starting the vmkeeper daemon (a unit of the harness systemd, like vmkeeper.service)"
# shellcheck disable=SC2086 # VMKEEPER_NSENTER is a command prefix
run $VMKEEPER_NSENTER systemd-run --quiet --unit=vmkeeper-demo.service --property=Type=notify \
  "$(readlink -f "$BIN")" daemon --config "$CONFIG"
vmk() { run "$BIN" "$@"; }
jour() { journalctl -D "$VMKEEPER_JOURNAL_DIR" --no-pager -o cat "$@"; }
hup() {
  # shellcheck disable=SC2086
  $VMKEEPER_NSENTER systemctl kill -s HUP vmkeeper-demo.service
}
setvm() { # setvm VM KEY VALUE: what `nixos-rebuild switch` does to the JSON
  python3 - "$CONFIG" "$@" << 'PY'
import json, sys
path, vm, key, value = sys.argv[1:]
cfg = json.load(open(path))
cfg["vms"][vm][key] = json.loads(value)
json.dump(cfg, open(path, "w"), indent=2)
PY
}
wait_vmsize() { # wait_vmsize VM GIB
  local log=$DEMO/run/vms/$1/console.log want=$(($2 * 1024 * 1024 * 2)) line=
  for _ in $(seq 1 1200); do
    line=$(grep -a '^VMSIZE' "$log" 2> /dev/null | tail -n 1 | tr -d '\r') || true
    [ "${line#*vda=}" = "$want" ] && break
    sleep 0.1
  done
  [ "${line#*vda=}" = "$want" ] || { echo "demo: $1 does not see $2 GiB; console:" >&2; tail -n 3 "$log" >&2; exit 1; }
  echo "  $1 guest console: \"$line\" = $2 GiB"
}

step "Both guests boot and print the size of their RBD disk"
wait_vmsize demo-web 30
wait_vmsize demo-db 40
vmk status --config "$CONFIG"

step "Grow demo-web's disk live: diskGiB 30 -> 35, then SIGHUP (as nixos-rebuild switch does)"
setvm demo-web diskGiB 35
hup
wait_vmsize demo-web 35
jour VM=demo-web ACTION=grow-disk | tail -n 1

step "Shrinking is refused: diskGiB 35 -> 32 changes nothing"
setvm demo-web diskGiB 32
hup
sleep 2
jour VM=demo-web MESSAGE_ID=ccf4d8956bc44914b5f421a2e3764e6b | tail -n 1
rbd --conf "$CEPH_CONF" --id "$VMKEEPER_CEPH_CLIENT" info "$VMKEEPER_CEPH_POOL/demo-web" | grep size
setvm demo-web diskGiB 35
hup

step "QEMU runs unprivileged in a sandbox (the VM unit's /proc status and systemd-analyze)"
# shellcheck disable=SC2086
pid=$($VMKEEPER_NSENTER systemctl show -p MainPID --value vmkeeper-vm-demo-web.service)
# shellcheck disable=SC2086
$VMKEEPER_NSENTER grep -E '^(Uid|CapEff|NoNewPrivs|Seccomp):' "/proc/$pid/status" | sed 's/^/  /'
# shellcheck disable=SC2086
$VMKEEPER_NSENTER systemd-analyze security --no-pager vmkeeper-vm-demo-web.service | tail -n 1 | sed 's/^/  /'
ls -l "$DEMO/run/vms/demo-web" | sed 's/^/  /'

step "A guest that reboots itself raises an alarm (unplanned), the VM is still supervised"
python3 - "$DEMO/run/vms/demo-web/serial.sock" << 'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"reboot\n")
PY
for _ in $(seq 1 150); do
  "$BIN" status --config "$CONFIG" --json | grep -q guest-reset && break
  sleep 0.2
done
jour VM=demo-web MESSAGE_ID=5a9f1f2c90ee4c2fb7905d1dd0033ad3 | tail -n 1 | sed 's/^/  journal: /'
"$BIN" status --config "$CONFIG" --json | python3 -c 'import json,sys
v = [x for x in json.load(sys.stdin)["vms"] if x["name"] == "demo-web"][0]
print("  lastUnplanned:", json.dumps(v.get("lastUnplanned")))'

step "Prometheus metrics on 127.0.0.1:9848 (metrics.listen): the reboot counted as unplanned"
python3 - << 'PY'
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9848/metrics", timeout=5).read().decode()
keep = ("vmkeeper_vm_running", "vmkeeper_vm_disk_bytes", "vmkeeper_vm_qmp_connected",
        "vmkeeper_vm_unplanned_events_total")
for line in text.splitlines():
    # Of the per-kind counters, only those that counted something.
    if line.startswith(keep) and not ("_total{" in line and line.endswith(" 0")):
        print("  " + line)
PY

step "kill -9 of the daemon: the VMs keep running, the restart adopts them (same QEMU instances)"
before=$("$BIN" status --config "$CONFIG" --json | python3 -c 'import json,sys; print(" ".join(v["name"]+"="+str(v.get("instance")) for v in json.load(sys.stdin)["vms"]))')
# shellcheck disable=SC2086
run $VMKEEPER_NSENTER systemctl kill -s KILL vmkeeper-demo.service
sleep 1
# shellcheck disable=SC2086
$VMKEEPER_NSENTER systemctl reset-failed vmkeeper-demo.service 2> /dev/null || true
# shellcheck disable=SC2086
run $VMKEEPER_NSENTER systemd-run --quiet --unit=vmkeeper-demo.service --property=Type=notify \
  "$(readlink -f "$BIN")" daemon --config "$CONFIG"
after=$("$BIN" status --config "$CONFIG" --json | python3 -c 'import json,sys; print(" ".join(v["name"]+"="+str(v.get("instance")) for v in json.load(sys.stdin)["vms"]))')
echo "  before: $before"
echo "  after:  $after"

step "An RBD image vmkeeper did not make is never attached: declare demo-new over a foreign image"
rbd --conf "$CEPH_CONF" --id "$VMKEEPER_CEPH_CLIENT" create --size 30G "$VMKEEPER_CEPH_POOL/demo-new"
python3 - "$CONFIG" << 'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["vms"]["demo-new"] = dict(cfg["vms"]["demo-web"], diskGiB=30)
cfg["vms"]["demo-new"].pop("project", None)
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
PY
hup
sleep 3
jour VM=demo-new | grep -m 1 "not this VM's disk" | fold -s -w 100 | sed 's/^/  /'
vmk adopt-disk demo-new --config "$CONFIG"
wait_vmsize demo-new 30
rbd --conf "$CEPH_CONF" --id "$VMKEEPER_CEPH_CLIENT" image-meta get "$VMKEEPER_CEPH_POOL/demo-new" vmkeeper.owner | sed 's/^/  owner: /'

step "A CPU change of demo-db (project shop, America/New_York) waits for a slot in shop's window, announced 24 h ahead to shop's contacts"
setvm demo-db cores 4
hup
sleep 2
vmk maintenance list --config "$CONFIG"
# shellcheck disable=SC2086
run $VMKEEPER_NSENTER systemctl list-timers --all --no-pager 'vmkeeper-maint-*'
vmk plan --config "$CONFIG" --state-dir "$DEMO/state"

step "A deletion timeline: what deleteAt ten days from now would do"
python3 - "$CONFIG" "$DEMO/demo-delete.json" << 'PY'
import datetime, json, sys
cfg = json.load(open(sys.argv[1]))
cfg["vms"]["demo-web"]["deleteAt"] = (datetime.date.today() + datetime.timedelta(days=10)).isoformat()
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PY
vmk plan --config "$DEMO/demo-delete.json" --state-dir "$DEMO/state"

step "Every state change of a VM is a structured journal entry: journalctl VM=demo-db"
jour VM=demo-db

step "Stopping: the daemon, then the VMs"
# shellcheck disable=SC2086
run $VMKEEPER_NSENTER systemctl stop vmkeeper-demo.service vmkeeper-vm-demo-web.service vmkeeper-vm-demo-db.service vmkeeper-vm-demo-new.service
echo
echo "demo: done; the harness is torn down next"
