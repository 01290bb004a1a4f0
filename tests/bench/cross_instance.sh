#!/usr/bin/env bash
# Cross-instance: 2 instances + Redis, webhooks into one tenant of 5,000 connections split over
# both instances; latency from the webhook being sent to the client receiving it.
#   tests/bench/cross_instance.sh            1,000 webhooks/s for 5 s
#   RATE=100 DURATION=10 tests/bench/cross_instance.sh
source "$(dirname "$0")/lib.sh"
RATE=${RATE:-1000}
DURATION=${DURATION:-5}
build
log "machine: $(machine)"
start_redis
start_instance a REDIS_URL="$REDIS_URL"; A_URL=$INSTANCE_URL; A_PID=$INSTANCE_PID
start_instance b REDIS_URL="$REDIS_URL"; B_URL=$INSTANCE_URL; B_PID=$INSTANCE_PID
"$LOADGEN" --ws "ws://$A_URL" --ws "ws://$B_URL" --connections 5000 --connect-rate 5000 --tenants 1 \
  --load webhook --webhook "http://$A_URL" --webhook "http://$B_URL" \
  --messages $((RATE * DURATION)) --publish-rate "$RATE" --server-pid "$A_PID" --server-pid "$B_PID" \
  --drain 30 | tee "$OUT/cross_instance.json"
