#!/usr/bin/env bash
# Three federating arw-server nodes on this machine, on loopback only (no mDNS): node-a, and
# node-b and node-c bootstrapping to it. Each picks free ports and keeps its state in DIR/<name>.
#
#   scripts/local-cluster.sh start  [DIR]   start the three nodes (default DIR /tmp/arw-local-cluster)
#   scripts/local-cluster.sh status [DIR]   every node's view of the cluster (arw-cli state cluster,
#                                           with that node's own admin token from DIR/<n>/admin-token)
#   scripts/local-cluster.sh stop   [DIR]   stop them gracefully (SIGTERM)
#
# Binaries come from ARW_BIN (default: target/release, built with `cargo build --release`).
set -euo pipefail
cmd=${1:-}
dir=${2:-/tmp/arw-local-cluster}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${ARW_BIN:-$root/target/release}
nodes=(a b c)

ready() { # wait up to 30 s for DIR/<n>/endpoints.json written by the current process
  local n=$1 pid=$2
  for _ in $(seq 300); do
    if [ -f "$dir/$n/endpoints.json" ] && [ "$(jq -r .pid "$dir/$n/endpoints.json")" = "$pid" ]; then return 0; fi
    kill -0 "$pid" 2>/dev/null || { echo "node-$n exited; see $dir/$n/server.log" >&2; return 1; }
    sleep 0.1
  done
  echo "node-$n not ready after 30 s; see $dir/$n/server.log" >&2
  return 1
}

start_node() { # start_node <n> [bootstrap multiaddr]
  local n=$1 boot=${2:-}
  mkdir -p "$dir/$n"
  {
    printf '[cluster]\nenabled = true\nmdns = false\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n'
    [ -z "$boot" ] || printf 'bootstrap = ["%s"]\n' "$boot"
  } >"$dir/$n/config.toml"
  # Each node generates its own admin token into DIR/<n>/admin-token, whatever the shell exports.
  env -u ARW_ADMIN_TOKEN -u ARW_ADMIN_TOKEN_SHA256 \
    ARW_NODE_ID=node-$n ARW_STATE_DIR=$dir/$n ARW_PORT=0 ARW_CONFIG_DIR=$dir/$n \
    nohup "$bin/arw-server" >"$dir/$n/server.log" 2>&1 &
  ready "$n" $!
}

base() { echo "http://$(jq -r .http "$dir/$1/endpoints.json")"; }

case "$cmd" in
start)
  start_node a
  boot=$(jq -r '.p2p[0]' "$dir/a/endpoints.json")
  start_node b "$boot"
  start_node c "$boot"
  for n in "${nodes[@]}"; do echo "node-$n  $(base "$n")  state: $dir/$n"; done
  echo "see the cluster: $0 status $dir"
  ;;
status)
  # Each node has its own admin token (DIR/<n>/admin-token), whatever ARW_ADMIN_TOKEN says.
  failed=0
  for n in "${nodes[@]}"; do
    echo "== node-$n"
    if [ ! -f "$dir/$n/endpoints.json" ]; then
      echo "not started (no $dir/$n/endpoints.json): $0 start $dir"; failed=1; continue
    fi
    pid=$(jq -r .pid "$dir/$n/endpoints.json")
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "not running: pid $pid in $dir/$n/endpoints.json is gone (crashed or killed; see $dir/$n/server.log)"
      failed=1; continue
    fi
    "$bin/arw-cli" state cluster --base "$(base "$n")" --admin-token "$(cat "$dir/$n/admin-token")" || failed=1
  done
  exit "$failed"
  ;;
stop)
  for n in "${nodes[@]}"; do
    [ -f "$dir/$n/endpoints.json" ] && kill -TERM "$(jq -r .pid "$dir/$n/endpoints.json")" 2>/dev/null || true
  done
  ;;
*)
  sed -n '2,10p' "$0" >&2
  exit 64
  ;;
esac
