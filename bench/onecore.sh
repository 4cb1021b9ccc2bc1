#!/usr/bin/env bash
# Per-core throughput, latency at half load and the spike, as quoted in the
# README's performance section. Needs a Linux machine with >= 4 cores: one evd
# worker is pinned to core 0 (fsync: always), the load generator runs on the
# others. Usage: bench/onecore.sh OUTDIR   (env: GEN_CORES=2-15 PROCS=12 DUR=10)
set -u
OUT=${1:?usage: bench/onecore.sh OUTDIR}
mkdir -p "$OUT"
GEN_CORES=${GEN_CORES:-2-$(($(nproc) - 1))}
PROCS=${PROCS:-12}
DUR=${DUR:-10}
PORT=${PORT:-8080}
SEED="--duplicate-rate 0 --invalid-rate 0 --late-rate 0"

accepted() { python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['totals']['accepted_events_per_s']))" "$1"; }
median() { for i in 1 2 3; do accepted "$OUT/$1$i/report.json"; done | sort -n | sed -n 2p; }

run() { # name server-config-yaml bench-args...
  local name=$1 cfg=$2 w sp; shift 2
  local data; data=$(mktemp -d)
  local args=(serve --port "$PORT" --data-dir "$data")
  if [ -n "$cfg" ]; then printf "$cfg" > "$data.yaml"; args+=(--config "$data.yaml"); fi
  taskset -c 0 python3 -m evd "${args[@]}" > "$OUT/$name-server.log" 2>&1 &
  sp=$!
  for w in $(seq 50); do curl -sf "localhost:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  taskset -c "$GEN_CORES" python3 -m evd bench --target "http://127.0.0.1:$PORT" --no-progress \
    --procs "$PROCS" --out "$OUT/$name" "$@" > "$OUT/$name.txt" 2>&1
  kill "$sp"; wait "$sp"
  rm -rf "$data" "$data.yaml"
  echo "== $name"; grep -E "sent|accepted|latency|statuses|spike " "$OUT/$name.txt"
}

for i in 1 2 3; do
  run seed100max$i "" --rate max --batch 100 --connections 128 --duration "$DUR" $SEED
  run seed1max$i "" --rate max --batch 1 --connections 256 --duration "$DUR" $SEED
  run mix100max$i "" --rate max --batch 100 --connections 128 --duration "$DUR"
done
SMAX=$(median seed100max); MMAX=$(median mix100max)
echo "median max: seed-shaped $SMAX ev/s, realistic mix $MMAX ev/s"
run seed100half "" --rate $((SMAX / 2)) --batch 100 --connections 256 --duration 15 $SEED
BASE=$((MMAX / 4)); LIMIT=$((MMAX * 6 / 10))
SPIKE=(--rate "$BASE" --batch 100 --connections 128 --duration 20 --spike-at 6 --spike-duration 5 --spike-factor 8)
run spike "limits:\n  rate_limit_events_per_s: $LIMIT\n  rate_limit_burst: $LIMIT\n" "${SPIKE[@]}"
run spikefree "" "${SPIKE[@]}"
