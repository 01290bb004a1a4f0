#!/usr/bin/env bash
# Idle connections: how many one instance holds and what each costs.
#   tests/bench/idle.sh                     15,000 connections on one instance, held 60 s
#   INSTANCES=2 tests/bench/idle.sh          15,000 on each of two instances (one load generator each)
#   CONNECTIONS=5000 HOLD=10 tests/bench/idle.sh
#   BROKER=redis PRESENCE=on TENANTS=100 tests/bench/idle.sh   joined by Redis, presence on
source "$(dirname "$0")/lib.sh"
CONNECTIONS=${CONNECTIONS:-15000}
INSTANCES=${INSTANCES:-1}
HOLD=${HOLD:-60}
BROKER=${BROKER:-memory}
PRESENCE=${PRESENCE:-off}
build
log "machine: $(machine)"
config=(PRESENCE="$PRESENCE")
case "$BROKER" in
  memory) ;;
  redis) start_redis; config+=(REDIS_URL="$REDIS_URL") ;;
  *) echo "BROKER: memory or redis, not $BROKER" >&2; exit 2 ;;
esac
log "broker: $BROKER, presence: $PRESENCE"
runs=()
for i in $(seq "$INSTANCES"); do
  start_instance "instance$i" "${config[@]}"
  # Ports beyond one source address's ~28k: spread over 127.0.0.1-8.
  "$LOADGEN" --ws "ws://$INSTANCE_URL" --connections "$CONNECTIONS" --connect-rate 5000 --tenants "${TENANTS:-10}" \
    --sources 8 --hold "$HOLD" --server-pid "$INSTANCE_PID" --metrics "http://$INSTANCE_URL/metrics" \
    >"$WORK/idle$i.json" &
  runs+=($!)
done
for run in "${runs[@]}"; do wait "$run"; done
python3 - "$WORK" "$INSTANCES" "$BROKER" "$PRESENCE" <<'PY' | tee "$OUT/idle.json"
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{work}/idle{i}.json")) for i in range(1, n + 1)]
print(json.dumps({
    "benchmark": "idle",
    "broker": sys.argv[3],
    "presence": sys.argv[4],
    "instances": n,
    "connections_per_instance": [r["connections"]["established"] for r in runs],
    "open_after_hold": [r["connections"]["open_after_hold"] for r in runs],
    "hold_seconds": runs[0]["connections"]["hold_seconds"],
    "connections_per_sec": [r["connections"]["per_sec"] for r in runs],
    "rss_kib_per_connection": [r["server"]["rss_kib_per_connection"] for r in runs],
    "failures": [r["connections"]["failures"] for r in runs],
    "runs": runs,
}))
PY
