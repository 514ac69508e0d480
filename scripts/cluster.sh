#!/usr/bin/env bash
# A whole strata cluster on this machine, for trying it out: etcd, an S3
# server (Garage), a control plane and N server agents, each agent with a
# store of its own (they share images through Garage).
#
#   sudo scripts/cluster.sh up 3 [PACKAGE...]   # start; PACKAGEs' images are published first
#   . /var/lib/strata-cluster/env               # STRATA_ADDR, STRATA_TOKEN for the CLI
#   strata run python3                          # placed on an agent; attached to it directly
#   strata servers ls; strata ps
#   sudo scripts/cluster.sh down                # stop everything (state is kept)
#
# Everything listens on 127.0.0.1: control plane 7100, agents 7101.., etcd
# 23790 (with authentication: user `strata`, its password in
# $dir/etcd-password), Garage 3900. STRATA_CLUSTER_DIR moves the state (default
# /var/lib/strata-cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
dir="${STRATA_CLUSTER_DIR:-/var/lib/strata-cluster}"
cmd="${1:-}"

stop_all() {
  for pidfile in "$dir"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    # Each runs in a session of its own: stop the whole group (agents' QEMUs too).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  [ -d "$dir/garage" ] && bash scripts/garage.sh "$dir/garage" stop || true
}

case "$cmd" in
  up) ;;
  down) stop_all; echo "cluster.sh: stopped (state kept in $dir)"; exit 0 ;;
  *) echo "usage: cluster.sh up N [PACKAGE...] | down" >&2; exit 2 ;;
esac
n="${2:-3}"
[[ "$n" =~ ^[1-9][0-9]?$ ]] || { echo "cluster.sh: N must be 1 to 99 agents, not '$n'" >&2; exit 2; }
shift 2 || shift $#
[ "$(id -u)" = 0 ] || { echo "cluster.sh: run as root (agents run QEMU)" >&2; exit 1; }
source scripts/deps-cluster.sh
cargo build --release --locked -q
strata="$repo/target/release/strata"
export STRATA_AGENT="$repo/target/release/strata-agent"
stop_all
mkdir -p "$dir/run" "$dir/logs"

# The cluster's secret, made once.
[ -f "$dir/secret" ] || (umask 077; "$strata" token secret > "$dir/secret")
export STRATA_CLUSTER_TOKEN="$(cat "$dir/secret")"
export STRATA_ETCD=http://127.0.0.1:23790

start() { # NAME COMMAND...: in the background, in a session of its own
  local name="$1"; shift
  setsid "$@" > "$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/run/$name.pid"
}
wait_port() { # PORT WHAT
  for _ in $(seq 1 150); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "cluster.sh: $2 did not start; see $dir/logs/" >&2
  exit 1
}

start etcd etcd --name strata --data-dir "$dir/etcd" \
  --listen-client-urls "$STRATA_ETCD" --advertise-client-urls "$STRATA_ETCD" \
  --listen-peer-urls http://127.0.0.1:23791 --initial-advertise-peer-urls http://127.0.0.1:23791 \
  --initial-cluster strata=http://127.0.0.1:23791
wait_port 23790 etcd

# etcd with authentication: a root user, and a user `strata` whose role reads
# and writes /strata/ only; agents, planes and the CLI connect as it. Passwords
# are made once and kept in files only root reads. Done once: with
# authentication on, an anonymous client cannot list users.
etcdctl_() { etcdctl --endpoints "$STRATA_ETCD" "$@" >/dev/null; }
for f in etcd-root-password etcd-password; do
  [ -s "$dir/$f" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$dir/$f")
done
if etcdctl_ user list 2>/dev/null; then
  etcdctl_ user add "root:$(cat "$dir/etcd-root-password")"
  etcdctl_ role add root
  etcdctl_ user grant-role root root
  etcdctl_ user add "strata:$(cat "$dir/etcd-password")"
  etcdctl_ role add strata
  etcdctl_ role grant-permission strata --prefix=true readwrite /strata/
  etcdctl_ user grant-role strata strata
  etcdctl_ auth enable
fi
export STRATA_ETCD_USER=strata STRATA_ETCD_PASSWORD_FILE="$dir/etcd-password"
eval "$(bash scripts/garage.sh "$dir/garage" 3900)"

# Packages asked for are built here (if need be) and published, so agents fetch them.
for p in "$@"; do
  "$strata" build "$p"
  "$strata" images push "$p"
done

for i in $(seq 1 "$n"); do
  port=$((7100 + i))
  STRATA_STATE="$dir/agent$i" STRATA_LOG="${STRATA_LOG:-info}" \
    start "agent$i" "$strata" serve --listen "127.0.0.1:$port" --server-id "agent$i"
  wait_port "$port" "agent$i"
done
STRATA_LOG="${STRATA_LOG:-info}" start control "$strata" control --listen 127.0.0.1:7100
wait_port 7100 "the control plane"

token="$("$strata" token create "${STRATA_TERMINAL:-local}")"
(umask 077; printf 'export STRATA_ADDR=http://127.0.0.1:7100 STRATA_TOKEN=%s\n' "$token" > "$dir/env")
echo "cluster.sh: etcd, Garage, a control plane (http://127.0.0.1:7100) and $n agents are up"
echo "cluster.sh: '. $dir/env' points the CLI at it; logs in $dir/logs; 'scripts/cluster.sh down' stops it"
