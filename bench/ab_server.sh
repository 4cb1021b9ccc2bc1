#!/usr/bin/env bash
# Alternating A/B of the whole default server: `evd serve --workers 1` (every stage
# on) pinned to core 0, bench.seedload on core 1 (batch 100, 32 connections, 10 s),
# three runs of each, alternating. Prints events/s accepted and the server's CPU
# (centiseconds, over the load and 5 s after it, so the stages' catch-up counts).
# Usage: bench/ab_server.sh BEFORE_CHECKOUT AFTER_CHECKOUT   (each with a .venv)
set -u
BEFORE=${1:?usage: bench/ab_server.sh BEFORE_CHECKOUT AFTER_CHECKOUT}
AFTER=${2:?usage: bench/ab_server.sh BEFORE_CHECKOUT AFTER_CHECKOUT}
PORT=${PORT:-18123}
cpu_of() {  # utime + stime of a process and its children, in clock ticks
  local total=0 p
  for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
  echo "$total"
}
for i in 1 2 3; do
  for side in before after; do
    if [ "$side" = before ]; then repo=$BEFORE; else repo=$AFTER; fi
    data=$(mktemp -d)
    (cd "$repo" && exec taskset -c 0 .venv/bin/python -m evd serve --workers 1 --port "$PORT" \
        --data-dir "$data/data" > "$data/log" 2>&1) &
    sp=$!
    for _ in $(seq 100); do curl -sf "localhost:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    procs="$sp $(pgrep -P "$sp" | tr '\n' ' ')"
    cpu0=$(cpu_of $procs)
    out=$(cd "$repo" && taskset -c 1 .venv/bin/python -m bench.seedload \
        --target "http://127.0.0.1:$PORT" --batch 100 --connections 32 --duration 10 --json)
    sleep 5
    cpu1=$(cpu_of $procs)
    kill "$sp"; wait "$sp" 2>/dev/null
    rate=$(echo "$out" | python3 -c "import json, sys; print(json.load(sys.stdin)['events_per_s'])")
    echo "$side run$i events/s=$rate server_cpu=$((cpu1 - cpu0))cs"
    rm -rf "$data"
  done
done
