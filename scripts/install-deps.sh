#!/usr/bin/env bash
# install-deps.sh: install what building, testing and the demo need, and nothing that is
# already there (a second run does no apt or cargo work). Debian 12, as root.
#
#   apt: Ceph (mon, osd, CLI, librbd/librados headers), QEMU with its rbd block driver,
#        systemd, dbus, util-linux (unshare, nsenter), the tools the harness uses, and
#        Prometheus (with promtool) and Alertmanager, which the monitoring tests run on
#        loopback. `apt-get update` runs at most once, and only when a package is missing.
#        Packages never start their services here (policy-rc.d; see below).
#   cargo: cargo-nextest when `cargo nextest` is missing; rustfmt and clippy components when
#        rustup manages the toolchain and they are missing.
set -euo pipefail

APT_PACKAGES=(
  ceph-mon ceph-osd ceph-common librbd-dev librados-dev python3-rados python3-rbd
  qemu-system-x86 qemu-block-extra
  systemd dbus util-linux uuid-runtime procps iproute2
  busybox-static cpio gzip curl
  gcc pkg-config ca-certificates
  prometheus prometheus-alertmanager
)

[ "$(id -u)" = 0 ] || { echo "install-deps: run as root (apt-get, the harness)" >&2; exit 1; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Debian's prometheus and prometheus-alertmanager start their services on install; tests
  # run their own instances on loopback ports instead, so nothing may start here (a system
  # Prometheus would listen on :9090 and Alertmanager on :9093 and :9094 for everyone).
  # policy-rc.d exiting 101 tells invoke-rc.d to start nothing; one the machine already has
  # is left alone.
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# install-deps.sh: start no service while installing\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get -q -o DPkg::Lock::Timeout=600 update
  apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends "${missing[@]}"
  if [ -n "$own_policy" ]; then
    rm -f "$policy"
    trap - EXIT
  fi
fi
# A machine booted with systemd starts units through systemd, which policy-rc.d does not
# govern: stop and disable what the packages enabled there.
if [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ]; then
  for unit in prometheus.service prometheus-alertmanager.service; do
    if systemctl is-enabled --quiet "$unit" 2> /dev/null || systemctl is-active --quiet "$unit" 2> /dev/null; then
      echo "install-deps: stopping and disabling $unit (tests run their own on loopback)" >&2
      systemctl disable --now "$unit" || true
    fi
  done
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
