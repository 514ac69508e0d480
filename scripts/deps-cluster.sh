#!/usr/bin/env bash
# What a cluster needs beside one machine's strata (idempotent; run as root):
# etcd for the cluster's state and Garage, the S3-compatible object store
# that shares images between servers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/deps.sh"
missing=()
for pkg in etcd-server etcd-client; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get install -y -q "${missing[@]}"
fi

# Garage: Debian has no package; built from crates.io once (about 11 minutes
# on 2 cores), pinned.
garage_version=2.5.0
if ! /opt/strata-tools/bin/garage --version 2>/dev/null | grep -q ":$garage_version "; then
  echo "strata: building Garage $garage_version (once)" >&2
  cargo install --locked "garage@$garage_version" --no-default-features --features bundled-libs,sqlite \
    --root /opt/strata-tools
fi
