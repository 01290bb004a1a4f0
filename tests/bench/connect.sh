#!/usr/bin/env bash
# Opening connections: 10 tenants x 1,000 connections on one instance joined by Redis, opened
# as fast as the load generator goes, with presence on (the default) and off; RUNS runs of each,
# each on a fresh instance and Redis.
#   tests/bench/connect.sh
#   CONNECTIONS=5000 RUNS=1 tests/bench/connect.sh
source "$(dirname "$0")/lib.sh"
CONNECTIONS=${CONNECTIONS:-10000}
RUNS=${RUNS:-3}
build
log "machine: $(machine)"
n=0
for run in $(seq "$RUNS"); do
  for presence in on off; do
    start_redis
    start_instance "connect-$presence-$run" REDIS_URL="$REDIS_URL" PRESENCE="$presence"
    log "run $run, presence $presence: $CONNECTIONS connections"
    "$LOADGEN" --ws "ws://$INSTANCE_URL" --connections "$CONNECTIONS" --connect-rate 50000 --tenants 10 \
      --sources 2 --server-pid "$INSTANCE_PID" >"$WORK/run$n.json"
    echo "$presence" >"$WORK/run$n.presence"
    n=$((n + 1))
    stop_all  # a fresh instance and Redis for the next run
  done
done
python3 - "$WORK" "$n" <<'PY' | tee "$OUT/connect.json"
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
runs = {"on": [], "off": []}
for i in range(n):
    presence = open(f"{work}/run{i}.presence").read().strip()
    runs[presence].append(json.load(open(f"{work}/run{i}.json")))
summary = lambda rs: {
    "seconds": [r["connections"]["seconds"] for r in rs],
    "per_sec": [r["connections"]["per_sec"] for r in rs],
    "established": [r["connections"]["established"] for r in rs],
    "failures": [r["connections"]["failures"] for r in rs],
    "rss_kib_per_connection": [r["server"]["rss_kib_per_connection"] for r in rs],
}
print(json.dumps({"benchmark": "connect", "presence_on": summary(runs["on"]), "presence_off": summary(runs["off"])}))
PY
