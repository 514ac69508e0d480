#!/usr/bin/env bash
# Starts a one-node Garage (an S3-compatible object store) for strata's shared
# images, configured with one bucket and one key, and prints the settings
# strata reads, as shell assignments:
#   eval "$(scripts/garage.sh /var/lib/strata-garage 3900)"
# Idempotent: a Garage already running from DIR is reused. `garage.sh DIR stop`
# stops it. A third argument runs one step: `config` (write garage.toml) or
# `setup` (layout, key, bucket, print the settings) around a server started
# by the caller (`garage -c DIR/garage.toml server`), as the tests do.
# GARAGE_ADDR (default 127.0.0.1) is the address it listens on.
set -euo pipefail
dir="${1:?usage: garage.sh DIR [S3_PORT|stop] [config|setup]}"
arg="${2:-3900}"
step="${3:-all}"
garage="${STRATA_GARAGE:-/opt/strata-tools/bin/garage}"
[ -x "$garage" ] || { echo "garage.sh: no Garage at $garage (scripts/deps-cluster.sh installs it)" >&2; exit 1; }
cfg="$dir/garage.toml"
if [ "$arg" = stop ]; then
  [ -f "$dir/garage.pid" ] && kill "$(cat "$dir/garage.pid")" 2>/dev/null || true
  rm -f "$dir/garage.pid"
  exit 0
fi
s3_port="$arg"
addr="${GARAGE_ADDR:-127.0.0.1}"
rpc_port=$((s3_port + 1))
admin_port=$((s3_port + 3))
mkdir -p "$dir/meta" "$dir/data"
if [ ! -f "$cfg" ]; then
  cat > "$cfg.tmp" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "$addr:$rpc_port"
rpc_public_addr = "$addr:$rpc_port"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "$addr:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "$addr:$admin_port"
TOML
  mv "$cfg.tmp" "$cfg"
fi
[ "$step" = config ] && exit 0
g() { "$garage" -c "$cfg" "$@"; }
if [ "$step" = all ] && ! { [ -f "$dir/garage.pid" ] && kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null; }; then
  setsid "$garage" -c "$cfg" server > "$dir/garage.log" 2>&1 < /dev/null &
  echo $! > "$dir/garage.pid"
fi
# Bounded wait for the node to answer.
for _ in $(seq 1 100); do
  g status > /dev/null 2>&1 && break
  sleep 0.1
done
g status > /dev/null 2>&1 || { echo "garage.sh: Garage did not start; see $dir/garage.log" >&2; exit 1; }
if [ ! -f "$dir/configured" ]; then
  node="$(g node id -q | cut -d@ -f1)"
  g layout assign -z local -c 10G "$node" > /dev/null
  g layout apply --version 1 > /dev/null
  # Fixed credentials per directory, so a restart keeps them.
  key_id="GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  g key import --yes -n strata "$key_id" "$secret" > /dev/null
  g bucket create strata > /dev/null
  g bucket allow --read --write --owner strata --key strata > /dev/null
  printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$key_id" "$secret" > "$dir/credentials"
  touch "$dir/configured"
fi
# shellcheck disable=SC1091
. "$dir/credentials"
echo "export STRATA_S3_ENDPOINT=http://$addr:$s3_port STRATA_S3_BUCKET=strata STRATA_S3_REGION=garage AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
