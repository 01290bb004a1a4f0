# Shared by the benchmark scripts: build once, start Redis and instances on free ports, clean up.
# Every process started here is stopped when the script exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SERVER="$ROOT/target/release/lq-realtime"
LOADGEN="$ROOT/target/release/lq-loadgen"
OUT="$ROOT/target/bench"
JWT_SECRET_KEY="bench-jwt-secret-0123456789abcdef0123"
WEBHOOK_SECRET="bench-webhook-secret"
export JWT_SECRET_KEY WEBHOOK_SECRET
mkdir -p "$OUT"
PIDS=()
WORK="$(mktemp -d)"

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[bench] $*" >&2; }

build() {
  for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed by the benchmark scripts" >&2; exit 1; }
  done
  if [[ ! -x "$SERVER" || ! -x "$LOADGEN" || "${REBUILD:-0}" == 1 ]]; then
    log "building release binaries (slow on 2 cores; reused afterwards; REBUILD=1 to force)"
    (cd "$ROOT" && cargo build --release -p bootstrap --bin lq-realtime -p tests --bin lq-loadgen >&2)
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Webhook secrets for the tenants bench0..bench{n-1}.
bench_secrets() {
  python3 -c "import json,sys; print(json.dumps({f'bench{i}': sys.argv[2] for i in range(int(sys.argv[1]))}))" \
    "$1" "$WEBHOOK_SECRET"
}

# start_redis: sets REDIS_URL.
start_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "redis-server and redis-cli are needed: apt-get install -y redis-server" >&2
    exit 1
  fi
  local port; port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
    --loglevel warning >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  REDIS_URL="redis://127.0.0.1:$port"
  log "redis on $REDIS_URL"
}

# start_instance NAME [VAR=VALUE…]: sets INSTANCE_URL, INSTANCE_PID (and <NAME> in the logs).
start_instance() {
  local name=$1; shift
  local port; port=$(free_port)
  env -i PATH="$PATH" BIND_ADDR="127.0.0.1:$port" JWT_SECRET_KEY="$JWT_SECRET_KEY" \
    WEBHOOK_SECRETS="$(bench_secrets 64)" MAX_CONNECTIONS=20000 RUST_LOG=warn PRESENCE=off "$@" \
    "$SERVER" >"$WORK/$name.log" 2>&1 &
  INSTANCE_PID=$!
  PIDS+=("$INSTANCE_PID")
  INSTANCE_URL="127.0.0.1:$port"
  for _ in $(seq 200); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$INSTANCE_URL/ready")" == 200 ]] && break
    sleep 0.05
  done
  log "$name on $INSTANCE_URL (pid $INSTANCE_PID)"
}

# machine: one line describing where the numbers come from.
machine() {
  echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), open files $(ulimit -n)"
}
