#!/usr/bin/env bash
# demo.sh: install what is needed, build vmkeeper, bring up the harness (real systemd, Ceph,
# QEMU) and show vmkeeper on the example configuration of two small VMs; everything is torn
# down at the end. As root on Debian 12.
#
# What it shows (more as features land): the configuration check, the next maintenance
# windows, the plan, and the two VMs running as QEMU units of the harness systemd on their
# RBD disks, each guest printing the size of its disk.
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
cfg["ceph"]["pool"] = os.environ["VMKEEPER_CEPH_POOL"]
cfg["qemu"]["accel"] = os.environ["VMKEEPER_QEMU_ACCEL"]
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

# Until the daemon lands, the demo starts the QEMU units itself, the way the daemon will:
# one transient unit per VM in the harness systemd, disk on RBD through QEMU's rbd driver.
step "Starting the VMs as QEMU units of the harness systemd, disks on Ceph RBD"
mapfile -t VMS < <(python3 -c 'import json,sys
for n, v in json.load(open(sys.argv[1]))["vms"].items():
    print(n, v["cores"], v["memoryMiB"], v["diskGiB"], v["boot"]["append"])' "$CONFIG")
for row in "${VMS[@]}"; do
  read -r name cores mem disk append <<< "$row"
  dir=$DEMO/run/$name
  mkdir -p "$dir"
  run rbd --conf "$CEPH_CONF" --id "$VMKEEPER_CEPH_CLIENT" create --size "${disk}G" "$VMKEEPER_CEPH_POOL/$name"
  blockdev=$(printf '{"driver":"rbd","node-name":"root0","pool":"%s","image":"%s","conf":"%s","user":"%s","cache":{"direct":false}}' \
    "$VMKEEPER_CEPH_POOL" "$name" "$CEPH_CONF" "$VMKEEPER_CEPH_CLIENT")
  cpu=()
  [ "$VMKEEPER_QEMU_ACCEL" = kvm ] && cpu=(-cpu host)
  # shellcheck disable=SC2086 # VMKEEPER_NSENTER is a command prefix
  $VMKEEPER_NSENTER systemd-run --quiet --unit="demo-qemu-$name.service" \
    --description="demo VM $name" --property=KillSignal=SIGTERM -- \
    /usr/bin/qemu-system-x86_64 -name "$name" -nodefaults -no-user-config -display none \
    -machine q35 -accel "$VMKEEPER_QEMU_ACCEL" "${cpu[@]}" -m "$mem" -smp "$cores" \
    -kernel "$VMKEEPER_GUEST_KERNEL" -initrd "$VMKEEPER_GUEST_INITRD" -append "$append" \
    -blockdev "$blockdev" -device virtio-blk-pci,drive=root0,id=disk0 \
    -serial "file:$dir/console.log" -qmp "unix:$dir/qmp.sock,server=on,wait=off"
  echo "  started demo-qemu-$name.service"
done

# shellcheck disable=SC2086
run $VMKEEPER_NSENTER systemctl list-units --no-pager --no-legend 'demo-qemu-*'

step "Each guest prints the size of its disk every 200 ms"
for row in "${VMS[@]}"; do
  read -r name _ _ disk _ <<< "$row"
  log=$DEMO/run/$name/console.log
  line=
  for _ in $(seq 1 1200); do
    line=$(grep -a '^VMSIZE' "$log" 2> /dev/null | tail -n 1 | tr -d '\r') || true
    [ -n "$line" ] && break
    sleep 0.1
  done
  [ -n "$line" ] || { echo "demo: $name printed no VMSIZE line; console:" >&2; tail "$log" >&2; exit 1; }
  sectors=${line#*vda=}
  sectors=${sectors%% *}
  [[ $sectors =~ ^[0-9]+$ ]] || { echo "demo: $name printed a bad VMSIZE line: $line" >&2; exit 1; }
  echo "  $name: \"$line\" = $((sectors * 512 / 1024 / 1024 / 1024)) GiB (configured: $disk GiB)"
  [ "$sectors" -eq $((disk * 1024 * 1024 * 2)) ] || { echo "demo: $name sees the wrong disk size" >&2; exit 1; }
done

step "Stopping the VMs"
for row in "${VMS[@]}"; do
  read -r name _ <<< "$row"
  # shellcheck disable=SC2086
  run $VMKEEPER_NSENTER systemctl stop "demo-qemu-$name.service"
done
echo
echo "demo: done; the harness is torn down next"
