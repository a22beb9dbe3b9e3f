#!/usr/bin/env bash
# up.sh DIR: bring up the real components the integration tests and the demo run against,
# with every piece of state under DIR, and write DIR/env (shell-sourceable KEY=VALUE lines).
#
#   systemd  A private systemd manager as PID 1 of its own pid, mount, uts, ipc and cgroup
#            namespaces (the network is shared so units reach Ceph on 127.0.0.1), with journald
#            and a dbus-daemon system bus. Its /run is DIR/run, so its sockets are reachable
#            from the host; everything else of the host's file system is visible inside.
#            On a host booted with systemd, that one is used instead
#            (VMKEEPER_HARNESS_SYSTEMD=auto|private|host; see docs/development/testing.md).
#   Ceph     One mon and one memstore OSD on 127.0.0.1 with cephx, pool `rbd` initialised.
#   QEMU     VM units run QEMU as the system user vmkeeper-qemu (made here once per machine
#            when missing), with a Ceph client of its own (client.vmkeeper-qemu, `profile rbd`
#            on the pool) whose bare key is DIR/ceph/qemu.key (0400, QEMU's user's). Inside the private manager's namespaces /dev/net/tun and /dev/kvm
#            are nodes of our own, 0660 root:vmkeeper-qemu, as a host's udev would make them
#            usable; the host's nodes are not touched.
#   guest    The tiny test guest (harness/make-guest.sh, cached) and the QEMU accelerator
#            to use: VMKEEPER_QEMU_ACCEL=kvm|tcg, or auto (default): KVM only when a short
#            probe boot reaches the guest's first VMSIZE line, cached per host boot.
#
# Tear down with harness/down.sh DIR (harness/run.sh does both around a command).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${1:?usage: harness/up.sh DIR}
[ "$(id -u)" = 0 ] || { echo "harness/up.sh: must run as root" >&2; exit 1; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
[ ! -e "$DIR/env" ] || { echo "harness/up.sh: $DIR is already up (harness/down.sh $DIR first)" >&2; exit 1; }
CACHE=${VMKEEPER_HARNESS_CACHE:-/var/cache/vmkeeper-harness}
TIMEOUT=${VMKEEPER_HARNESS_TIMEOUT:-60}
T0=$(date +%s%N)
ms() { echo $((($(date +%s%N) - T0) / 1000000)); }
say() { echo "harness: $* ($(ms) ms)" >&2; }
die() {
  echo "harness/up.sh: $*" >&2
  exit 1
}

mkdir -p "$DIR/log"

# ---------------------------------------------------------------------------- guest
GUEST=$("$HERE/make-guest.sh")
say "guest ready in $GUEST"

# ---------------------------------------------------------------------------- QEMU's user
QEMU_USER=vmkeeper-qemu
if ! id "$QEMU_USER" > /dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "vmkeeper QEMU (harness)" "$QEMU_USER" \
    || die "cannot create the user $QEMU_USER"
fi
QEMU_GID=$(id -g "$QEMU_USER")

# The probe runs in the background while systemd and Ceph come up.
ACCEL=${VMKEEPER_QEMU_ACCEL:-auto}
PROBE_PID=
PROBE_CACHE=$CACHE/accel-probe
BOOT_ID=$(cat /proc/sys/kernel/random/boot_id)
if [ "$ACCEL" = auto ]; then
  if [ -r "$PROBE_CACHE" ] && [ "$(cut -d' ' -f1 "$PROBE_CACHE")" = "$BOOT_ID" ]; then
    ACCEL=$(cut -d' ' -f2 "$PROBE_CACHE")
  elif [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    mkdir -p "$DIR/probe"
    # Started from a throw-away shell, so that its death is not reported as one of our jobs.
    PROBE_PID=$(sh -c 'qemu-system-x86_64 -nodefaults -no-user-config -display none \
      -machine q35 -accel kvm -cpu host -m 128 -kernel "$1/vmlinuz" -initrd "$1/initrd.img" \
      -append "console=ttyS0 quiet" -serial "file:$2/probe/console.log" \
      > "$2/log/kvm-probe.log" 2>&1 & echo $!' probe "$GUEST" "$DIR")
  else
    ACCEL=tcg
  fi
fi
case $ACCEL in auto | kvm | tcg) ;; *) die "VMKEEPER_QEMU_ACCEL must be auto, kvm or tcg" ;; esac

# -------------------------------------------------------------------------- systemd
# auto: the host's manager when it was booted with systemd (sd_booted(3) and PID 1 is
# systemd), else a private one.
SYSTEMD_MODE=${VMKEEPER_HARNESS_SYSTEMD:-auto}
if [ "$SYSTEMD_MODE" = auto ]; then
  SYSTEMD_MODE=private
  [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ] && SYSTEMD_MODE=host
fi
case $SYSTEMD_MODE in
  host)
    [ -d /run/systemd/system ] || die "VMKEEPER_HARNESS_SYSTEMD=host, but PID 1 is not systemd"
    SDPID=1
    NSENTER=
    DBUS_ADDRESS=unix:path=/run/dbus/system_bus_socket
    JOURNAL_DIR=/var/log/journal
    [ -d "$JOURNAL_DIR" ] || JOURNAL_DIR=/run/log/journal
    ;;
  private)
    # A cgroup2 subtree becomes the root of the manager's cgroup namespace, so systemd runs
    # in unified mode and never touches the host's hierarchy (hybrid hosts: .../unified).
    if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
      CG2=/sys/fs/cgroup
    elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then
      CG2=/sys/fs/cgroup/unified
    else
      die "no cgroup2 hierarchy mounted (need /sys/fs/cgroup or /sys/fs/cgroup/unified)"
    fi
    CGDIR=$CG2/vmkeeper-harness-$(basename "$DIR")
    mkdir "$CGDIR"
    echo "$CGDIR" > "$DIR/cgroup"

    UNITS=$DIR/systemd/units
    mkdir -p "$DIR/run" "$UNITS"
    chmod 755 "$DIR/run"
    # Volatile journal only: the host's /var/log/journal must stay untouched.
    mkdir -p "$DIR/run/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nReadKMsg=no\nRateLimitBurst=0\n' \
      > "$DIR/run/systemd/journald.conf.d/harness.conf"
    # A minimal unit set, so none of the host's services and none of sysinit.target's jobs run.
    for f in systemd-journald.service systemd-journald.socket systemd-journald-dev-log.socket \
      dbus.service dbus.socket shutdown.target umount.target final.target \
      poweroff.target systemd-poweroff.service halt.target systemd-halt.service \
      exit.target systemd-exit.service sockets.target timers.target paths.target \
      slices.target time-set.target time-sync.target; do
      [ -e "/lib/systemd/system/$f" ] && cp "/lib/systemd/system/$f" "$UNITS/$f"
    done
    # Transient units (DefaultDependencies=yes) need sysinit.target and basic.target: empty ones.
    cat > "$UNITS/sysinit.target" << 'UNIT'
[Unit]
Description=System Initialization (vmkeeper harness: journald only)
DefaultDependencies=no
Wants=systemd-journald.service systemd-journald.socket systemd-journald-dev-log.socket
After=systemd-journald.service
UNIT
    cat > "$UNITS/basic.target" << 'UNIT'
[Unit]
Description=Basic System (vmkeeper harness: empty)
DefaultDependencies=no
Requires=sysinit.target
Wants=sockets.target timers.target paths.target slices.target
After=sysinit.target sockets.target timers.target paths.target slices.target
UNIT
    cat > "$UNITS/harness.target" << 'UNIT'
[Unit]
Description=vmkeeper harness manager ready
Requires=basic.target
Wants=dbus.socket dbus.service
After=basic.target dbus.service
AllowIsolate=yes
UNIT
    ln -s harness.target "$UNITS/default.target"
    ln -s dbus.service "$UNITS/dbus-org.freedesktop.DBus.service"

    # PID 1 of the new pid namespace: set up the private mounts, then become systemd.
    # The devices QEMU's user opens, as nodes of our own that the namespace binds over the
    # host's (which are root-only on our machines): 0660 for root and QEMU's group.
    mkdir -p "$DIR/dev"
    mknod -m 0660 "$DIR/dev/tun" c 10 200
    mknod -m 0660 "$DIR/dev/kvm" c 10 232
    chgrp "$QEMU_GID" "$DIR/dev/tun" "$DIR/dev/kvm"
    : > "$DIR/systemd/console.log"
    cat > "$DIR/systemd/ns-init.sh" << INIT
#!/bin/sh
set -e
mount --make-rprivate /
# read-only /proc/sys and /sys as in a container: systemd then skips sysctl tweaks
mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys
mount --bind /sys /sys; mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind "$DIR/run" /run
# PID 1 writes status to /dev/console: keep it off the host's console
mount --bind "$DIR/systemd/console.log" /dev/console
[ ! -e /dev/net/tun ] || mount --bind "$DIR/dev/tun" /dev/net/tun
[ ! -e /dev/kvm ] || mount --bind "$DIR/dev/kvm" /dev/kvm
mount -t tmpfs -o mode=2755 tmpfs /var/log/journal 2>/dev/null || true
export container=vmkeeper-harness
export SYSTEMD_UNIT_PATH="$UNITS:/run/systemd/transient"
exec /lib/systemd/systemd --system --unit=harness.target --log-target=journal --show-status=0
INIT
    chmod +x "$DIR/systemd/ns-init.sh"

    # The subshell enters the cgroup first, so unshare --cgroup makes it the namespace root.
    (
      echo "$BASHPID" > "$CGDIR/cgroup.procs"
      exec unshare --pid --fork --kill-child --mount --uts --ipc --cgroup --mount-proc \
        --propagation private "$DIR/systemd/ns-init.sh"
    ) < /dev/null > "$DIR/log/unshare.log" 2>&1 &
    echo $! > "$DIR/systemd/unshare.pid"
    UNSHARE_PID=$!

    SDPID=
    for _ in $(seq 1 $((TIMEOUT * 10))); do
      SDPID=$(awk '{print $1}' "/proc/$UNSHARE_PID/task/$UNSHARE_PID/children" 2>/dev/null) || true
      [ -n "$SDPID" ] && break
      kill -0 "$UNSHARE_PID" 2>/dev/null || break
      sleep 0.1
    done
    [ -n "$SDPID" ] || die "systemd did not start: $(cat "$DIR/log/unshare.log")"
    echo "$SDPID" > "$DIR/systemd/pid"
    NSENTER="nsenter -t $SDPID -m -p -u -i -C"
    DBUS_ADDRESS=unix:path=$DIR/run/dbus/system_bus_socket
    JOURNAL_DIR=$DIR/run/log/journal

    ready=
    for _ in $(seq 1 $((TIMEOUT * 10))); do
      if [ -S "$DIR/run/dbus/system_bus_socket" ] \
        && [ "$(SYSTEMD_LOG_LEVEL=err $NSENTER systemctl is-active harness.target 2> /dev/null)" = active ] \
        && DBUS_SYSTEM_BUS_ADDRESS=$DBUS_ADDRESS busctl --system get-property \
          org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \
          SystemState > /dev/null 2>&1; then
        ready=1
        break
      fi
      kill -0 "$SDPID" 2>/dev/null || break
      sleep 0.1
    done
    [ -n "$ready" ] || die "systemd manager not ready: $(tail -n 30 "$DIR/systemd/console.log")"
    ;;
  *) die "VMKEEPER_HARNESS_SYSTEMD must be auto, private or host" ;;
esac
say "systemd up ($SYSTEMD_MODE, pid $SDPID)"

# ----------------------------------------------------------------------------- Ceph
CEPH=$DIR/ceph
CONF=$CEPH/ceph.conf
KEYRING=$CEPH/keyring
mkdir -p "$CEPH"/{run,log,mon/ceph-a,osd/ceph-0,crash}
PY=/usr/bin/python3 # the distro python carries the rados and rbd modules
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
FSID=$(uuidgen)
OSD_UUID=$(uuidgen)
cat > "$CONF" << EOF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$PORT]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $KEYRING
run dir = $CEPH/run
admin socket = $CEPH/run/\$cluster-\$name.asok
pid file = $CEPH/run/\$cluster-\$name.pid
log file = $CEPH/log/\$cluster-\$name.log
crash dir = $CEPH/crash
mon data = $CEPH/mon/\$cluster-\$id
osd data = $CEPH/osd/\$cluster-\$id
log to stderr = false
err to stderr = true
log to syslog = false
debug ms = 0/0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
# commit map changes quickly; a new pool leaves "creating" on the next mon tick
paxos propose interval = 0.05
paxos min wait = 0.01
mon tick interval = 1

[client.vmkeeper-qemu]
# QEMU's client runs in a private /tmp and cannot reach DIR: no admin socket, no log file
admin socket =
log to file = false

[client]
# many clients at once (rbd CLI, QEMU, vmkeeper): one admin socket per process
admin socket = $CEPH/run/\$cluster-\$name.\$pid.asok
log file = $CEPH/log/\$cluster-\$name.log

[mon]
mon cluster log file = $CEPH/log/\$cluster.log

[osd]
osd objectstore = memstore
memstore device bytes = 20G
osd memory target = 512M
osd op num shards = 1
osd op num threads per shard = 2
EOF
{
  ceph-authtool --create-keyring "$KEYRING" --gen-key -n mon. --cap mon 'allow *'
  ceph-authtool "$KEYRING" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
  ceph-authtool "$KEYRING" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
} > /dev/null
OSD_KEY=$(ceph-authtool -p -n osd.0 "$KEYRING")
monmaptool -c "$CONF" --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$PORT]" "$CEPH/monmap" > /dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$CEPH/monmap" --keyring "$KEYRING"
DERR=$CEPH/log/daemons.err
ceph-mon -c "$CONF" -i a 2>> "$DERR" || die "ceph-mon failed: $(cat "$DERR")"
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" --key "$OSD_KEY" 2> "$CEPH/log/osd-mkfs.err" \
  || die "ceph-osd --mkfs failed: $(cat "$CEPH/log/osd-mkfs.err")"

# One librados client registers the OSD, creates the pool, waits for the OSD to be up (a
# write sent while no OSD is up waits for the objecter's 5 s tick) and initialises the pool.
$PY - "$CONF" "$OSD_UUID" "$TIMEOUT" "$CEPH/run/osd-registered" << 'PY' &
import json, sys, time, rados, rbd
conf, osd_uuid, timeout, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = rados.Rados(conffile=conf, name="client.admin",
                conf={"client_mount_timeout": str(timeout), "rados_mon_op_timeout": str(timeout)})
c.connect(timeout=timeout)
def mon(cmd):
    ret, out, err = c.mon_command(json.dumps(cmd), b"", timeout=timeout)
    if ret != 0:
        sys.exit("mon_command %s failed: %d %s" % (cmd["prefix"], ret, err))
    return out
mon({"prefix": "osd new", "uuid": osd_uuid, "id": 0})
open(marker, "w").close()
mon({"prefix": "osd pool create", "pool": "rbd", "pg_num": 8, "pgp_num": 8})
deadline = time.monotonic() + timeout
while json.loads(mon({"prefix": "osd stat", "format": "json"})).get("num_up_osds", 0) < 1:
    if time.monotonic() > deadline:
        sys.exit("osd.0 did not come up")
    time.sleep(0.05)
c.wait_for_latest_osdmap()
with c.open_ioctx("rbd") as io:
    rbd.RBD().pool_init(io, True)
# QEMU's own client: the rbd profile on this pool only
mon({"prefix": "auth get-or-create", "entity": "client.vmkeeper-qemu",
     "caps": ["mon", "profile rbd", "osd", "profile rbd pool=rbd"]})
c.shutdown()
PY
HELPER=$!
for _ in $(seq 1 $((TIMEOUT * 20))); do
  [ -e "$CEPH/run/osd-registered" ] && break
  kill -0 "$HELPER" 2> /dev/null || break
  sleep 0.05
done
[ -e "$CEPH/run/osd-registered" ] || die "the mon did not register osd.0 (see $CEPH/log)"
ceph-osd -c "$CONF" -i 0 2>> "$DERR" || die "ceph-osd failed: $(cat "$DERR")"
wait "$HELPER" || die "pool setup failed (see $CEPH/log)"
# Its bare key, as `-object secret` reads it: readable by QEMU's user only.
(umask 077 && ceph --conf "$CONF" --id admin auth get-key client.vmkeeper-qemu -o "$CEPH/qemu.key" 2> /dev/null) \
  || die "cannot read the key of client.vmkeeper-qemu"
chown "$QEMU_USER:$QEMU_GID" "$CEPH/qemu.key"
chmod 0400 "$CEPH/qemu.key"
say "ceph up (mon on 127.0.0.1:$PORT)"

# ------------------------------------------------------------------------ accelerator
if [ -n "$PROBE_PID" ]; then
  ACCEL=tcg
  for _ in $(seq 1 $((${VMKEEPER_KVM_PROBE_S:-10} * 20))); do
    if grep -q '^VMSIZE' "$DIR/probe/console.log" 2> /dev/null; then
      ACCEL=kvm
      break
    fi
    grep -qs "^State:[[:space:]]*[^Z]" "/proc/$PROBE_PID/status" || break
    sleep 0.05
  done
  kill -KILL "$PROBE_PID" 2> /dev/null || true
  echo "$BOOT_ID $ACCEL" > "$PROBE_CACHE"
  say "KVM probe: using $ACCEL"
fi

cat > "$DIR/env" << EOF
VMKEEPER_HARNESS_DIR=$DIR
DBUS_SYSTEM_BUS_ADDRESS=$DBUS_ADDRESS
VMKEEPER_SYSTEMD_PID=$SDPID
VMKEEPER_NSENTER='$NSENTER'
VMKEEPER_JOURNAL_DIR=$JOURNAL_DIR
CEPH_CONF=$CONF
VMKEEPER_CEPH_POOL=rbd
VMKEEPER_CEPH_CLIENT=admin
VMKEEPER_CEPH_QEMU_CLIENT=vmkeeper-qemu
VMKEEPER_CEPH_QEMU_KEY=$CEPH/qemu.key
VMKEEPER_QEMU_USER=$QEMU_USER
VMKEEPER_GUEST_KERNEL=$GUEST/vmlinuz
VMKEEPER_GUEST_INITRD=$GUEST/initrd.img
VMKEEPER_QEMU_ACCEL=$ACCEL
EOF
say "up in $DIR"
