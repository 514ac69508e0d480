#!/usr/bin/env bash
# Installs what strata needs on one machine from Debian's packages
# (idempotent). Run as root. QEMU comes from bookworm-backports (10.x):
# launch images rely on its file: migration and socket reconnect options.
# The cluster's parts (etcd, Garage) are in deps-cluster.sh, the tests'
# (a browser) in deps-test.sh.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need_update=0
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/strata-backports.list
  need_update=1
fi
# Package lists are needed to resolve the packages strata installs into images.
if [ "$need_update" = 1 ] || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*bookworm-backports*Packages*' -mmin -1440 2>/dev/null)" ]; then
  apt-get update -q
fi

qemu_version() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'; }
if [ "$(qemu_version || true)" = "" ] || [ "$(qemu_version)" -lt 9 ]; then
  apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils
fi
missing=()
for pkg in mmdebstrap busybox-static e2fsprogs xz-utils apt-utils ca-certificates gcc pkg-config protobuf-compiler iproute2 nftables acl passwd; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get install -y -q "${missing[@]}"
fi
# VMs run as ids of their own: the subordinate ids of the system user
# `strata` (65536 of them, one per VM at a time). An operator may give it
# another range in /etc/subuid and /etc/subgid.
if ! id strata >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin strata
fi
if ! grep -q '^strata:' /etc/subuid 2>/dev/null || ! grep -q '^strata:' /etc/subgid 2>/dev/null; then
  usermod --add-subuids 2000000-2065535 --add-subgids 2000000-2065535 strata
fi
if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "strata: no Rust toolchain (cargo) found; install one with rustup" >&2
    exit 1
  fi
fi

# The web page's libraries (xterm.js) and its browser test's driver come from
# npm, pinned by web/package-lock.json.
if ! command -v npm >/dev/null; then
  apt-get install -y -q nodejs npm
fi
web_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/web"
if [ ! -f "$web_dir/node_modules/.package-lock.json" ] || ! cmp -s "$web_dir/package-lock.json" "$web_dir/node_modules/.strata-lock"; then
  (cd "$web_dir" && npm ci --no-audit --no-fund && cp package-lock.json node_modules/.strata-lock)
fi
