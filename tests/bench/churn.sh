#!/usr/bin/env bash
# Churn: connections opened and closed at 2,000/s for 60 s against one instance; memory must
# return to its baseline and lq_connections to 0.
#   tests/bench/churn.sh
#   RATE=500 DURATION=10 tests/bench/churn.sh
source "$(dirname "$0")/lib.sh"
RATE=${RATE:-2000}
DURATION=${DURATION:-60}
build
log "machine: $(machine)"
start_redis
start_instance churn REDIS_URL="$REDIS_URL"
# A first 30 s round grows allocator pools and maps to their steady size, so the baseline is the
# steady state.
"$LOADGEN" --ws "ws://$INSTANCE_URL" --connections 20000 --churn 30 --connect-rate "$RATE" --sources 4 >/dev/null
"$LOADGEN" --ws "ws://$INSTANCE_URL" --connections 20000 --churn "$DURATION" --connect-rate "$RATE" --sources 4 \
  --server-pid "$INSTANCE_PID" --metrics "http://$INSTANCE_URL/metrics" | tee "$OUT/churn.json"
