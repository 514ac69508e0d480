#!/usr/bin/env bash
# One command from a fresh Debian 12 clone to a program running in a strata VM:
# installs what is missing, builds strata, builds the images of a package and
# launches it with this terminal attached.
#   sudo ./setup.sh [PACKAGE]        (default: python3)
set -euo pipefail
cd "$(dirname "$0")"
package="${1:-python3}"
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (strata builds images and runs QEMU)" >&2; exit 1; }
source scripts/deps.sh
echo "==> building strata"
cargo build --release --locked
ln -sf "$PWD/target/release/strata" /usr/local/bin/strata
echo "==> building the images of $package (base, install, launch)"
strata build "$package"
echo "==> launching $package (Ctrl-P Ctrl-Q detaches; the program's exit ends the session)"
if [ -t 0 ]; then
  exec strata run "$package"
else
  # No terminal (a script or CI): show the launch working with piped input.
  case "$package" in
    python3) printf 'print(6*7)\n' | strata run python3 ;;
    *) strata run "$package" </dev/null ;;
  esac
fi
