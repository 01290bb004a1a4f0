#!/usr/bin/env bash
# Topics: 10,000 connections over 10 tenants on one instance joined by Redis, each subscribed to
# 10 of its tenant's 100 topics (1,000 topics, 100 subscribers each): the memory of a connection
# and of a subscription, the subscribe rate, then the fan-out of messages PUBLISHed on Redis to
# the topics (each reaches 100 connections), moderate then as fast as the instance goes.
#   tests/bench/topics.sh
#   MESSAGES=20000 RATE=5000 HOLD=15 tests/bench/topics.sh   (HOLD: seconds before each memory reading)
source "$(dirname "$0")/lib.sh"
MESSAGES=${MESSAGES:-20000}
RATE=${RATE:-10000}
build
log "machine: $(machine)"
start_redis
start_instance topics REDIS_URL="$REDIS_URL"
common=(--ws "ws://$INSTANCE_URL" --connections 10000 --connect-rate 5000 --tenants 10 --sources 2
        --topics 100 --subscriptions 10 --load topic --redis "$REDIS_URL" --payload-bytes 64
        --server-pid "$INSTANCE_PID" --drain 10 --hold "${HOLD:-15}")
log "moderate: 300 messages/s x 100 subscribers = 30,000 deliveries/s for 10 s"
"$LOADGEN" "${common[@]}" --messages 3000 --publish-rate 300 >"$WORK/moderate.json"
log "saturated: $MESSAGES messages at $RATE/s"
"$LOADGEN" "${common[@]}" --messages "$MESSAGES" --publish-rate "$RATE" >"$WORK/saturated.json"
python3 - "$WORK" <<'PY' | tee "$OUT/topics.json"
import json, sys
work = sys.argv[1]
moderate, saturated = (json.load(open(f"{work}/{n}.json")) for n in ("moderate", "saturated"))
first = lambda r: {
    "connections": r["connections"]["established"],
    "rss_kib_per_connection": r["server"]["rss_kib_per_connection"],
    "subscriptions": r["subscriptions"]["subscribed"],
    "subscribe_seconds": r["subscriptions"]["seconds"],
    "subscribed_per_sec": r["subscriptions"]["per_sec"],
    "rss_bytes_per_subscription": r["server"].get("rss_bytes_per_subscription"),
}
print(json.dumps({
    "benchmark": "topics",
    "opening": [first(moderate), first(saturated)],
    "moderate": {"deliveries_per_sec": moderate["load"]["deliveries_per_sec"], "latency_ms": moderate["latency_ms"],
                 "lost": moderate["lost"], "duplicated": moderate["duplicated"]},
    "saturated": {"deliveries_per_sec": saturated["load"]["deliveries_per_sec"],
                  "server_cpu_us_per_delivery": saturated["load"]["server_cpu_us_per_delivery"],
                  "latency_ms": saturated["latency_ms"], "lost": saturated["lost"], "duplicated": saturated["duplicated"]},
    "runs": {"moderate": moderate, "saturated": saturated},
}))
PY
