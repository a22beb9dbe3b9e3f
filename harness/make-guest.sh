#!/usr/bin/env bash
# make-guest.sh: build (or find in the cache) the tiny test guest and print its directory.
#
# The guest is a Debian cloud kernel plus a busybox-static initramfs whose /init is
# harness/guest/init. Both packages are fetched with `apt-get download` and unpacked with
# `dpkg -x`: nothing is installed on the host and /boot is untouched.
#
# Output: one line on stdout, the directory holding vmlinuz, initrd.img and manifest.txt.
# Cache: $VMKEEPER_HARNESS_CACHE (default /var/cache/vmkeeper-harness). The guest directory
# is keyed by the hash of this script, the init script and the kernel package, so a second
# run costs nothing and an edited init is rebuilt. Downloaded .debs are kept in debs/.
#
# Env: VMKEEPER_GUEST_KERNEL_PKG  pin a kernel package (default: what linux-image-cloud-amd64
#                                 depends on)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VMKEEPER_HARNESS_CACHE:-/var/cache/vmkeeper-harness}
INIT=$HERE/guest/init
MODULES="virtio_pci virtio_blk button evdev"
mkdir -p "$CACHE/debs"

resolve_kernel() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# apt-cache takes seconds: remember its answer until the package lists change.
LISTS_STAMP=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo none)
KPKG=${VMKEEPER_GUEST_KERNEL_PKG:-}
if [ -z "$KPKG" ] && [ -r "$CACHE/kernel-pkg" ]; then
  read -r stamp pkg < "$CACHE/kernel-pkg" || true
  [ "${stamp:-}" = "$LISTS_STAMP" ] && KPKG=${pkg:-}
fi
if [ -z "$KPKG" ]; then
  KPKG=$(resolve_kernel)
  if [ -z "$KPKG" ]; then
    # A fresh machine may have no package lists yet.
    apt-get -q -o DPkg::Lock::Timeout=600 update >&2
    KPKG=$(resolve_kernel)
  fi
fi
[ -n "$KPKG" ] || { echo "make-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
[ -n "${VMKEEPER_GUEST_KERNEL_PKG:-}" ] || echo "$(stat -c %Y /var/lib/apt/lists) $KPKG" > "$CACHE/kernel-pkg"

KEY=$(cat "$0" "$INIT" <(echo "$KPKG $MODULES") | sha256sum | cut -c1-16)
OUT=$CACHE/guest-$KEY
# $CACHE/guest points at the newest guest, for hand-written configs (examples/demo.json).
current() {
  ln -sfn "guest-$KEY" "$CACHE/guest.new" && mv -T "$CACHE/guest.new" "$CACHE/guest"
  echo "$OUT"
}
if [ -e "$OUT/initrd.img" ]; then current; exit 0; fi

# Several harnesses may start at once (tests and demo): one builds, the others wait.
exec 9>"$CACHE/guest.lock"
flock -w 600 9
if [ -e "$OUT/initrd.img" ]; then current; exit 0; fi

T0=$(date +%s%N)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmkeeper-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

DEBS=$CACHE/debs
need=()
ls "$DEBS/${KPKG}"_*.deb >/dev/null 2>&1 || need+=("$KPKG")
ls "$DEBS"/busybox-static_*.deb >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  # Sandbox user root: the _apt user cannot write into a root-owned cache directory.
  (cd "$DEBS" && apt-get -q -o APT::Sandbox::User=root download "${need[@]}" >&2)
fi
KDEB=$(ls "$DEBS/${KPKG}"_*.deb | tail -1)
BDEB=$(ls "$DEBS"/busybox-static_*.deb | tail -1)

X=$WORK/x
mkdir -p "$X"
dpkg -x "$KDEB" "$X"
dpkg -x "$BDEB" "$X"
KVER=$(ls "$X/lib/modules")
MD=$X/lib/modules/$KVER

R=$WORK/root
mkdir -p "$R"/{bin,dev,proc,sys,tmp,run,lib/modules}
cp "$X/bin/busybox" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
cp "$INIT" "$R/init"
chmod 755 "$R/init"

# Load order: depth first over each module's `depends=` field, so no modules.dep is needed.
declare -A KO=() SEEN=()
while IFS= read -r f; do n=${f##*/}; n=${n%.ko}; KO[${n//-/_}]=$f; done \
  < <(find "$MD/kernel" -name '*.ko')
ORDER=()
add_module() {
  local m=${1//-/_} deps d
  [ -n "${SEEN[$m]:-}" ] && return 0
  SEEN[$m]=1
  if [ -z "${KO[$m]:-}" ]; then
    grep -q "/$m.ko\$" "$MD/modules.builtin" 2>/dev/null && return 0
    echo "make-guest: module $1 not found in $KVER" >&2
    exit 1
  fi
  deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "${KO[$m]}" | head -1 | cut -d= -f2)
  for d in ${deps//,/ }; do add_module "$d"; done
  ORDER+=("$m")
}
for m in $MODULES; do add_module "$m"; done
for m in "${ORDER[@]}"; do
  cp "${KO[$m]}" "$R/lib/modules/$m.ko"
  echo "$m" >> "$R/lib/modules/load.order"
done

NEW=$WORK/out
mkdir -p "$NEW"
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . | LC_ALL=C sort | "$X/bin/busybox" cpio -o -H newc 2>/dev/null) \
  | gzip -9 -n > "$NEW/initrd.img"
cp "$X/boot/vmlinuz-$KVER" "$NEW/vmlinuz"
{
  echo "kernel_pkg: $(basename "$KDEB")"
  echo "busybox_pkg: $(basename "$BDEB")"
  echo "kernel_release: $KVER"
  echo "modules: ${ORDER[*]}"
  echo "build_ms: $((($(date +%s%N) - T0) / 1000000))"
} > "$NEW/manifest.txt"
rm -rf "$OUT"
mv "$NEW" "$OUT"
echo "make-guest: built $OUT in $((($(date +%s%N) - T0) / 1000000)) ms" >&2
current
