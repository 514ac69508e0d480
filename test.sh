#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests that build real
# images and launch real packages in real QEMU (shared by all tests of a run;
# images already in the test store are reused by digest).
#   sudo ./test.sh
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (tests run QEMU and build images)" >&2; exit 1; }
source scripts/deps-test.sh
source scripts/e2b-sdk.sh
source scripts/earlier-build.sh
export STRATA_E2E=1
export STRATA_STATE="${STRATA_TEST_STATE:-/var/lib/strata-test}"
cargo build --release --locked
# Build the shipped packages' images once, up front, with progress; the tests
# share them (and skip nothing: what is already built is reused by digest).
for p in python3 bc htop lighttpd xeyes mousepad libreoffice-writer libreoffice-calc gimp; do
  STRATA_AGENT="$PWD/target/release/strata-agent" ./target/release/strata build "$p"
done
# The second OS: its base image and the package the OS tests launch on it.
STRATA_AGENT="$PWD/target/release/strata-agent" ./target/release/strata --os debian-13 build python3
# However the tests end, drop the images this run superseded (older
# generations, throwaway builds), so the test store does not grow run by run.
trap './target/release/strata images prune | tail -n 1' EXIT
# Every test binary runs even when one fails; then the failures are named.
log="$(mktemp /tmp/strata-test.XXXXXX)"
set +e
cargo test --release --locked --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  echo "==> test.sh: the suite failed; failed tests (binary: test):" >&2
  awk '/^ *Running /{n=split($NF,p,"/"); bin=p[n]; gsub(/[()]/,"",bin); sub(/-[0-9a-f]+$/,"",bin)} /^test .* \.\.\. FAILED$/{sub(/^test /,""); sub(/ \.\.\. FAILED$/,""); print "    " bin ": " $0}' "$log" >&2
  grep -A50 -E '^error: [0-9]+ targets? failed:|^error: test failed' "$log" | grep -E '^ +`' >&2 || true
  echo "==> the whole output is in $log" >&2
else
  rm -f "$log"
fi
exit "$status"
