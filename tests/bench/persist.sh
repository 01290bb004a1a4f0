#!/usr/bin/env bash
# Persistence: webhooks into one instance with Redis, 10 tenants × 100 connections, with
# PostgreSQL (DATABASE_URL: every message kept before its webhook is answered) and without;
# RUNS runs of each, at a moderate rate (latency) and as fast as the load generator sends
# (throughput). Then the outbox: OUTBOX_ROWS rows inserted at once, and the time the instance
# takes to publish them all.
#   tests/bench/persist.sh
#   RUNS=1 OUTBOX_ROWS=5000 tests/bench/persist.sh
#   RUNS=0 tests/bench/persist.sh      the outbox only
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
OUTBOX_ROWS=${OUTBOX_ROWS:-20000}
build
log "machine: $(machine)"
command -v psql >/dev/null || { echo "psql is needed: apt-get install -y postgresql-client" >&2; exit 1; }
n=0
for run in $(seq "$RUNS"); do
  for persist in off on; do
    start_redis
    config=(REDIS_URL="$REDIS_URL")
    if [[ $persist == on ]]; then start_postgres; config+=(DATABASE_URL="$DATABASE_URL"); fi
    start_instance "persist-$persist-$run" "${config[@]}"
    common=(--ws "ws://$INSTANCE_URL" --connections 1000 --connect-rate 5000 --tenants 10 --load webhook
            --webhook "http://$INSTANCE_URL" --webhook-secrets "$WEBHOOK_SECRETS" --server-pid "$INSTANCE_PID" --drain 10)
    log "run $run, persistence $persist: 1,000 webhooks/s for 10 s, then 20,000 as fast as they go"
    "$LOADGEN" "${common[@]}" --messages 10000 --publish-rate 1000 >"$WORK/moderate$n.json"
    "$LOADGEN" "${common[@]}" --messages 20000 --publish-rate 20000 >"$WORK/saturated$n.json"
    echo "$persist" >"$WORK/run$n.persist"
    n=$((n + 1))
    stop_all
  done
done
# The outbox.
start_redis
start_postgres
start_instance outbox REDIS_URL="$REDIS_URL" DATABASE_URL="$DATABASE_URL" OUTBOX_TABLE=lq_outbox
log "outbox: $OUTBOX_ROWS rows over 10 tenant channels, inserted in one transaction"
started=$(date +%s.%N)
psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c \
  "INSERT INTO lq_outbox (channel, type, payload) SELECT 'tenant:bench' || (i % 10), 'bench', json_build_object('n', i) FROM generate_series(1, $OUTBOX_ROWS) i"
while [[ $(psql -qtA -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "SELECT count(*) FROM lq_outbox") != 0 ]]; do sleep 0.1; done
ended=$(date +%s.%N)
python3 - "$WORK" "$n" "$started" "$ended" "$OUTBOX_ROWS" <<'PY' | tee "$OUT/persist.json"
import json, sys
work, n, started, ended, rows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
runs = {"on": [], "off": []}
for i in range(n):
    mode = open(f"{work}/run{i}.persist").read().strip()
    moderate, saturated = (json.load(open(f"{work}/{kind}{i}.json")) for kind in ("moderate", "saturated"))
    runs[mode].append({
        "moderate_p50_ms": moderate["latency_ms"]["p50"], "moderate_p99_ms": moderate["latency_ms"]["p99"],
        "moderate_lost": moderate["lost"], "saturated_webhooks_per_sec": saturated["load"]["published_per_sec"],
        "saturated_failures": saturated["load"]["publish_failures"], "saturated_p99_ms": saturated["latency_ms"]["p99"],
        "saturated_lost": saturated["lost"],
    })
seconds = ended - started
print(json.dumps({"benchmark": "persist", "persistence_off": runs["off"], "persistence_on": runs["on"],
                  "outbox": {"rows": rows, "seconds": round(seconds, 2), "rows_per_sec": round(rows / seconds, 1)}}))
PY
