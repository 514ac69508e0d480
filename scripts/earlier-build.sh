# The strata an upgrade starts from: the build of an earlier commit, kept
# by commit under /opt/strata-test (built once per machine). The upgrade
# test starts sessions with it and has the current build take them back.
# Sourced by test.sh; exports STRATA_EARLIER_BUILD (its directory of binaries)
# and STRATA_EARLIER_COMMIT.
# The last commit of the fourteenth session: the release before this one.
STRATA_EARLIER_COMMIT=7822e6d4f1db
earlier_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
earlier_dir="/opt/strata-test/earlier-$STRATA_EARLIER_COMMIT"
earlier_built() {
  [ -x "$earlier_dir/target/release/strata" ] && [ -x "$earlier_dir/target/release/strata-agent" ] &&
    [ -f "$earlier_dir/target/release/libstrata_qemu_preload.so" ]
}
if ! earlier_built; then
  echo "==> building strata at commit $STRATA_EARLIER_COMMIT, for the upgrade test (once per machine)"
  rm -rf "$earlier_dir/src"
  mkdir -p "$earlier_dir/src"
  git -C "$earlier_repo" archive "$STRATA_EARLIER_COMMIT" | tar -x -C "$earlier_dir/src"
  CARGO_TARGET_DIR="$earlier_dir/target" cargo build --release --locked --manifest-path "$earlier_dir/src/Cargo.toml" \
    -p strata-cli -p strata-agent -p strata-zygote-preload
fi
export STRATA_EARLIER_BUILD="$earlier_dir/target/release"
export STRATA_EARLIER_COMMIT
