#!/usr/bin/env bash
# What the test suite needs beside a cluster's parts (idempotent; run as
# root): a browser for the web page's tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/deps-cluster.sh"
if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'ok installed'; then
  apt-get install -y -q chromium
fi
