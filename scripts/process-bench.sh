#!/usr/bin/env bash
# A benchmark, not a test: N arw-server processes federating on loopback (mDNS off; node 0
# first, every other node bootstrapping to it), measured as an operator would see them.
#
#   scripts/process-bench.sh [N] [WATCH_SECS]      (defaults: 50 nodes, 60 s)
#
# Prints: how long until every node sees all N `ok` (from the first start); then, over
# WATCH_SECS with nobody polling, every health change any node journaled, and each process's
# CPU (utime + stime, % of one core) and RSS. Binaries come from ARW_BIN (default
# target/release: `cargo build --release`). State and logs stay in the printed directory.
set -euo pipefail
n=${1:-50}
watch=${2:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${ARW_BIN:-$root/target/release}
dir=$(mktemp -d /tmp/arw-process-bench.XXXXXX)
pids=()

cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

start_node() { # start_node <i> [bootstrap multiaddr]
  local i=$1 boot=${2:-}
  mkdir -p "$dir/$i"
  {
    printf '[cluster]\nenabled = true\nmdns = false\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n'
    [ -z "$boot" ] || printf 'bootstrap = ["%s"]\n' "$boot"
  } >"$dir/$i/config.toml"
  ARW_NODE_ID=n$i ARW_STATE_DIR=$dir/$i ARW_PORT=0 ARW_CONFIG_DIR=$dir/$i \
    "$bin/arw-server" >"$dir/$i/server.log" 2>&1 &
  pids+=($!)
}

ready() { # wait up to 60 s for node i's endpoints.json
  for _ in $(seq 600); do
    [ -f "$dir/$1/endpoints.json" ] && return 0
    sleep 0.1
  done
  echo "n$1 not ready after 60 s; see $dir/$1/server.log" >&2
  exit 1
}

get() { # get <i> <path>
  curl -fsS "http://$(jq -r .http "$dir/$1/endpoints.json")$2" \
    -H "Authorization: Bearer $(cat "$dir/$1/admin-token")"
}

began=$(date +%s%N)
start_node 0
ready 0
boot=$(jq -r '.p2p[0]' "$dir/0/endpoints.json")
for i in $(seq 1 $((n - 1))); do start_node "$i" "$boot"; done
for i in $(seq 0 $((n - 1))); do ready "$i"; done

# Every node sees all n ok: poll each node in turn until it does (at most 120 s in all).
deadline=$(($(date +%s) + 120))
for i in $(seq 0 $((n - 1))); do
  until [ "$(get "$i" /state/cluster | jq '[.nodes[] | select(.health == "ok")] | length')" = "$n" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "not formed within 120 s: n$i sees $(get "$i" /state/cluster | jq '[.nodes[] | select(.health == "ok")] | length') ok" >&2
      exit 1
    fi
    sleep 0.5
  done
done
formed=$((($(date +%s%N) - began) / 1000000))
echo "formation: every node sees all $n ok after $formed ms (from the first start)"

# The watch: nobody polls; CPU and journals are read before and after.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
last_ids=()
cpu_before=()
for i in $(seq 0 $((n - 1))); do
  last_ids+=("$(get "$i" '/admin/events/journal?limit=1' | jq '.entries[-1].id // 0')")
  cpu_before+=("$(ticks "${pids[$i]}")")
done
sleep "$watch"
hz=$(getconf CLK_TCK)
changes=0
cpu=()
for i in $(seq 0 $((n - 1))); do
  after=${last_ids[$i]}
  seen=$(get "$i" "/admin/events/journal?prefix=cluster.node.changed&after=$after&limit=1000" |
    jq '[.entries[] | select(.payload.previous_health != null)] | length')
  if [ "$seen" != 0 ]; then
    get "$i" "/admin/events/journal?prefix=cluster.node.changed&after=$after&limit=1000" |
      jq -r --arg me "n$i" '.entries[] | select(.payload.previous_health != null) | "  \($me) saw \(.payload.id) \(.payload.previous_health) -> \(.payload.health)"'
  fi
  changes=$((changes + seen))
  cpu+=("$(( ($(ticks "${pids[$i]}") - ${cpu_before[$i]}) ))")
done
echo "watch: $watch s, health changes seen by any node: $changes"
printf '%s\n' "${cpu[@]}" | awk -v hz="$hz" -v w="$watch" '
  { pct = 100 * $1 / (hz * w); s += pct; if (pct > m) m = pct; c++ }
  END { printf "CPU per process: mean %.2f %%, max %.2f %% of one core\n", s / c, m }'
for pid in "${pids[@]}"; do grep VmRSS "/proc/$pid/status" | awk '{print $2}'; done |
  awk '{ s += $1; if ($1 > m) m = $1; c++ } END { printf "RSS per process: mean %.1f MiB, max %.1f MiB\n", s / c / 1024, m / 1024 }'
echo "state and logs: $dir"
