#!/usr/bin/env bash
# install-deps.sh: install what building, testing and the demo need, and nothing that is
# already there (a second run does no apt or cargo work). Debian 12, as root.
#
#   apt: Ceph (mon, osd, CLI, librbd/librados headers), QEMU with its rbd block driver,
#        systemd, dbus, util-linux (unshare, nsenter), the tools the harness uses.
#        `apt-get update` runs at most once, and only when a package is missing.
#   cargo: cargo-nextest when `cargo nextest` is missing; rustfmt and clippy components when
#        rustup manages the toolchain and they are missing.
set -euo pipefail

APT_PACKAGES=(
  ceph-mon ceph-osd ceph-common librbd-dev librados-dev python3-rados python3-rbd
  qemu-system-x86 qemu-block-extra
  systemd dbus util-linux uuid-runtime procps iproute2
  busybox-static cpio gzip
  gcc pkg-config ca-certificates
)

[ "$(id -u)" = 0 ] || { echo "install-deps: run as root (apt-get, the harness)" >&2; exit 1; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -q -o DPkg::Lock::Timeout=600 update
  apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends "${missing[@]}"
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo > /dev/null; then
  echo "install-deps: no Rust toolchain: install one with rustup (https://rustup.rs), edition 2024 needs Rust >= 1.85" >&2
  exit 1
fi
if command -v rustup > /dev/null; then
  for c in rustfmt clippy; do
    rustup component list --installed 2> /dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
if ! cargo nextest --version > /dev/null 2>&1; then
  echo "install-deps: cargo install cargo-nextest (a few minutes, once)" >&2
  cargo install --locked cargo-nextest
fi
