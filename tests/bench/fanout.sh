#!/usr/bin/env bash
# Fan-out: 10 tenants x 1,000 connections on one instance, messages PUBLISHed on Redis.
# Two runs: a moderate 30,000 deliveries/s for latency, then as fast as the instance goes.
#   tests/bench/fanout.sh
#   MESSAGES=3000 RATE=1000 tests/bench/fanout.sh
source "$(dirname "$0")/lib.sh"
MESSAGES=${MESSAGES:-3000}
RATE=${RATE:-1000}
PAYLOAD=${PAYLOAD:-64}
build
log "machine: $(machine)"
start_redis
start_instance fanout REDIS_URL="$REDIS_URL"
common=(--ws "ws://$INSTANCE_URL" --connections 10000 --connect-rate 5000 --tenants 10 --sources 2
        --load redis --redis "$REDIS_URL" --payload-bytes "$PAYLOAD" --server-pid "$INSTANCE_PID" --drain 10)
log "moderate: 30 messages/s x 1,000 recipients = 30,000 deliveries/s for 10 s"
"$LOADGEN" "${common[@]}" --messages 300 --publish-rate 30 >"$WORK/moderate.json"
log "saturated: $MESSAGES messages at $RATE/s"
"$LOADGEN" "${common[@]}" --messages "$MESSAGES" --publish-rate "$RATE" >"$WORK/saturated.json"
python3 - "$WORK" <<'PY' | tee "$OUT/fanout.json"
import json, sys
work = sys.argv[1]
moderate, saturated = (json.load(open(f"{work}/{n}.json")) for n in ("moderate", "saturated"))
print(json.dumps({
    "benchmark": "fanout",
    "moderate": {"deliveries_per_sec": moderate["load"]["deliveries_per_sec"], "latency_ms": moderate["latency_ms"],
                 "lost": moderate["lost"], "duplicated": moderate["duplicated"]},
    "saturated": {"deliveries_per_sec": saturated["load"]["deliveries_per_sec"],
                  "server_cpu_us_per_delivery": saturated["load"]["server_cpu_us_per_delivery"],
                  "latency_ms": saturated["latency_ms"], "lost": saturated["lost"], "duplicated": saturated["duplicated"]},
    "runs": {"moderate": moderate, "saturated": saturated},
}))
PY
