# E2B's Python SDK, from PyPI, pinned by scripts/e2b-sdk-requirements.txt:
# the tests of strata's E2B API drive it with the official client, unchanged.
# Sourced by test.sh; exports STRATA_E2B_PYTHON (the venv's python).
e2b_sdk_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
e2b_sdk_venv="/opt/strata-test/e2b-sdk-$(sha256sum "$e2b_sdk_dir/e2b-sdk-requirements.txt" | cut -c1-12)"
if ! "$e2b_sdk_venv/bin/python" -c 'import e2b' 2>/dev/null; then
  dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'ok installed' || apt-get install -y -q python3-venv
  echo "==> installing E2B's Python SDK into $e2b_sdk_venv"
  rm -rf "$e2b_sdk_venv"
  python3 -m venv "$e2b_sdk_venv"
  "$e2b_sdk_venv/bin/pip" install -q --disable-pip-version-check -r "$e2b_sdk_dir/e2b-sdk-requirements.txt"
fi
export STRATA_E2B_PYTHON="$e2b_sdk_venv/bin/python"
