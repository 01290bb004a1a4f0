#!/usr/bin/env bash
# One Redis versus a three-master Redis Cluster (sharded Pub/Sub), same instance, same load:
# 10 tenants x 500 connections, messages published on Redis (PUBLISH / SPUBLISH) and through
# signed webhooks (the instance's publish-with-history script), each as fast as it goes.
#   tests/bench/cluster.sh
#   MESSAGES=4000 RATE=2000 tests/bench/cluster.sh
source "$(dirname "$0")/lib.sh"
MESSAGES=${MESSAGES:-4000}
RATE=${RATE:-2000}
build
log "machine: $(machine)"

# start_cluster: three masters on free ports; sets CLUSTER_NODES (host:port,…).
start_cluster() {
  local nodes=()
  for i in 1 2 3; do
    local port; port=$(free_port)
    mkdir -p "$WORK/cluster-$i"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK/cluster-$i" \
      --cluster-enabled yes --cluster-require-full-coverage no --loglevel warning \
      >"$WORK/cluster-$i.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    nodes+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-yes >"$WORK/cluster-create.log" 2>&1
  local first=${nodes[0]##*:}
  for _ in $(seq 200); do
    redis-cli -p "$first" cluster info | grep -q cluster_state:ok && break
    sleep 0.05
  done
  CLUSTER_NODES=$(IFS=,; echo "${nodes[*]}")
  log "cluster on $CLUSTER_NODES"
}

run() { # NAME LOAD-ARGS…
  local name=$1; shift
  "$LOADGEN" --ws "ws://$INSTANCE_URL" --connections 5000 --connect-rate 5000 --tenants 10 \
    --messages "$MESSAGES" --publish-rate "$RATE" --server-pid "$INSTANCE_PID" --drain 10 "$@" \
    >"$WORK/$name.json"
}

start_redis
start_instance single REDIS_URL="$REDIS_URL"
log "one Redis: PUBLISH"
run single-redis --load redis --redis "$REDIS_URL"
log "one Redis: webhooks"
run single-webhook --load webhook --webhook "http://$INSTANCE_URL"
kill "$INSTANCE_PID"

start_cluster
start_instance cluster REDIS_CLUSTER_NODES="$CLUSTER_NODES"
log "cluster: SPUBLISH"
run cluster-redis --load redis --redis "redis+cluster://$CLUSTER_NODES"
log "cluster: webhooks"
run cluster-webhook --load webhook --webhook "http://$INSTANCE_URL"

python3 - "$WORK" <<'PY' | tee "$OUT/cluster.json"
import json, sys
work = sys.argv[1]
runs = {n: json.load(open(f"{work}/{n}.json")) for n in ("single-redis", "single-webhook", "cluster-redis", "cluster-webhook")}
def summary(r):
    return {"deliveries_per_sec": r["load"]["deliveries_per_sec"],
            "server_cpu_us_per_delivery": r["load"]["server_cpu_us_per_delivery"],
            "latency_ms": r["latency_ms"], "lost": r["lost"], "duplicated": r["duplicated"]}
print(json.dumps({"benchmark": "cluster", **{n: summary(r) for n, r in runs.items()}, "runs": runs}))
PY
