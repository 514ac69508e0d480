#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that build real
# images and launch real packages in real QEMU (shared by all tests of a run;
# images already in the test store are reused by digest).
#   sudo ./test.sh
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (tests run QEMU and build images)" >&2; exit 1; }
source scripts/deps.sh
export STRATA_E2E=1
export STRATA_STATE="${STRATA_TEST_STATE:-/var/lib/strata-test}"
cargo build --release --locked
# Build the shipped packages' images once, up front, with progress; the tests
# share them (and skip nothing: what is already built is reused by digest).
for p in python3 bc htop lighttpd xeyes mousepad; do
  STRATA_AGENT="$PWD/target/release/strata-agent" ./target/release/strata build "$p"
done
# However the tests end, drop the images this run superseded (older
# generations, throwaway builds), so the test store does not grow run by run.
trap './target/release/strata images prune | tail -n 1' EXIT
cargo test --release --locked --workspace -- --test-threads=2
