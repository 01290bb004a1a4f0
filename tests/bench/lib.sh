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

# stop_all: stops every process started so far.
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

cleanup() {
  stop_all
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

# The instances' WEBHOOK_SECRETS, which lq-loadgen reads too.
WEBHOOK_SECRETS="$(bench_secrets 64)"
export WEBHOOK_SECRETS

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
    WEBHOOK_SECRETS="$WEBHOOK_SECRETS" MAX_CONNECTIONS=20000 RUST_LOG=warn PRESENCE=off "$@" \
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

# start_postgres: an initialised PostgreSQL on a free port, as user postgres when root (it
# refuses root); sets DATABASE_URL and PG_PORT.
start_postgres() {
  local bin
  if command -v initdb >/dev/null; then bin=$(dirname "$(command -v initdb)")
  else bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1); fi
  [[ -x "$bin/initdb" ]] || { echo "PostgreSQL's server binaries are needed: apt-get install -y postgresql" >&2; exit 1; }
  local as=()
  [[ $(id -u) == 0 ]] && as=(setpriv --reuid=postgres --regid=postgres --init-groups)
  PG_PORT=$(free_port)
  local dir="$WORK/pg-$PG_PORT"
  mkdir -p "$dir"
  if [[ $(id -u) == 0 ]]; then chmod 755 "$WORK"; chown -R postgres:postgres "$dir"; fi
  "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$WORK/initdb.log" 2>&1
  "${as[@]}" "$bin/postgres" -D "$dir/data" -p "$PG_PORT" -k "$dir" -c listen_addresses=127.0.0.1 \
    -c max_connections=200 >"$WORK/postgres.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null && break; sleep 0.05; done
  DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  log "postgres on $DATABASE_URL"
}
