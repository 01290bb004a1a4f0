#!/usr/bin/env bash
# Chat-like load: client messages in 100 tenants of 10 connections each, with Redis, as fast as
# the load generator sends them. Every message costs a publish and only 10 deliveries, so what
# a message costs the instance beyond its frames shows. BINS lists the server binaries to
# compare (default: this build); RUNS alternates them.
#   tests/bench/chat.sh
#   BINS="/tmp/lq-before target/release/lq-realtime" RUNS=3 tests/bench/chat.sh
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-40000}
RATE=${RATE:-20000}
build
BINS=${BINS:-$SERVER}
log "machine: $(machine)"
n=0
for run in $(seq "$RUNS"); do
  for bin in $BINS; do
    start_redis
    SERVER=$bin start_instance "chat-$n" REDIS_URL="$REDIS_URL"
    log "run $run, $bin: $MESSAGES client messages at up to $RATE/s"
    "$LOADGEN" --ws "ws://$INSTANCE_URL" --connections 1000 --connect-rate 5000 --tenants 100 \
      --load message --messages "$MESSAGES" --publish-rate "$RATE" --server-pid "$INSTANCE_PID" \
      --drain 10 >"$WORK/chat$n.json"
    echo "$bin" >"$WORK/chat$n.bin"
    n=$((n + 1))
    stop_all
  done
done
python3 - "$WORK" "$n" <<'PY' | tee "$OUT/chat.json"
import json, sys
work, runs = sys.argv[1], int(sys.argv[2])
rows = []
for i in range(runs):
    report = json.load(open(f"{work}/chat{i}.json"))
    rows.append({"binary": open(f"{work}/chat{i}.bin").read().strip(),
                 "messages_per_sec": report["load"]["published_per_sec"],
                 "server_cpu_us_per_message": round(report["load"]["server_cpu_seconds"] * 1e6 / max(report["load"]["published"], 1), 2),
                 "deliveries_per_sec": report["load"]["deliveries_per_sec"],
                 "server_cpu_us_per_delivery": report["load"]["server_cpu_us_per_delivery"],
                 "p99_ms": report["latency_ms"]["p99"], "lost": report["lost"]})
print(json.dumps({"benchmark": "chat", "runs": rows}, indent=1))
PY
