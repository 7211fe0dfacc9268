#!/usr/bin/env bash
# Install (when missing) and start on localhost what development and tests need,
# on a Debian machine without Docker: RabbitMQ (management + prometheus plugins),
# Redis, SecantusDB (a MongoDB-wire server on WiredTiger, in a virtual environment of its
# own, data kept across restarts), grpcurl, Prometheus with promtool, and redis_exporter.
# Idempotent: a server that already answers is left alone, so a second run is fast.
#
#   services.sh              install and start (make services)
#   services.sh stop         stop the servers it starts, data kept (make services-stop)
#   services.sh delete-data  stop them, then delete SecantusDB's data, Prometheus' history
#                            and RabbitMQ's queues, messages and users (make services-delete-data)
set -euo pipefail
ACTION=${1:-start}

STATE_DIR=${ENERGY_STATE_DIR:-$HOME/.local/state/energy-platform}
GOBIN=${GOBIN:-$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin}
GRPCURL_VERSION=v1.9.3
REDIS_EXPORTER_VERSION=v1.74.0
PROMETHEUS_PORT=${ENERGY_PROMETHEUS_PORT:-9090}
REDIS_EXPORTER_PORT=9121
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RABBITMQ_PORT=5672
REDIS_PORT=${ENERGY_REDIS_PORT:-6379}
MONGODB_PORT=${ENERGY_MONGODB_PORT:-27017}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
mkdir -p "$STATE_DIR"

log() { printf '[services] %s\n' "$*"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {  # wait_port PORT NAME SECONDS
  for _ in $(seq 1 "$3"); do port_open "$1" && return 0; sleep 1; done
  log "ERROR: $2 did not open port $1 within $3 s (logs in $STATE_DIR)"; return 1
}
wait_started() {  # wait_started PID PORT NAME LOG SECONDS: wait while the process lives
  local waited=0
  until port_open "$2"; do
    if ! kill -0 "$1" 2>/dev/null; then
      log "ERROR: $3 exited before it opened port $2; the end of $4:"
      tail -n 20 "$4" >&2 || true
      return 1
    fi
    if [ "$waited" -ge "$5" ]; then
      log "ERROR: $3 (pid $1) had not opened port $2 after $5 s (log $4)"; return 1
    fi
    if [ "$waited" -gt 0 ] && [ $((waited % 15)) -eq 0 ]; then
      log "$3 is still starting ($waited s)"
    fi
    sleep 1; waited=$((waited + 1))
  done
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

stop_process() {  # stop_process NAME PATTERN: SIGTERM, then wait up to 60 s for it to exit
  pkill -TERM -f "$2" 2>/dev/null || return 0
  for _ in $(seq 1 60); do pgrep -f "$2" >/dev/null || { log "stopped $1"; return 0; }; sleep 1; done
  log "ERROR: $1 still runs 60 s after SIGTERM (pgrep -f '$2')"; return 1
}
stop_all() {
  export PATH="$PATH:/usr/sbin"
  stop_process prometheus "prometheus --config.file=.*/deployments/prometheus/prometheus.local.yml"
  stop_process redis_exporter "redis_exporter --redis.addr=redis://127.0.0.1:$REDIS_PORT"
  # SecantusDB closes WiredTiger cleanly on SIGTERM: nothing to recover at the next start.
  stop_process SecantusDB "secantusd-py --host 127.0.0.1 --port $MONGODB_PORT "
  if port_open "$REDIS_PORT"; then
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null && log "stopped redis-server on $REDIS_PORT"
  fi
  if port_open "$RABBITMQ_PORT"; then
    if [ "$1" = delete-data ]; then
      rabbitmqctl stop_app >/dev/null && rabbitmqctl reset >/dev/null
      log "deleted RabbitMQ's queues, messages and users (guest comes back at the next start)"
    fi
    rabbitmqctl stop >/dev/null && log "stopped rabbitmq-server"
  fi
}
case "$ACTION" in
  start) ;;
  stop) stop_all stop; exit 0 ;;
  delete-data)
    stop_all delete-data
    rm -rf "$STATE_DIR/secantusdb" "$STATE_DIR/prometheus"
    log "deleted SecantusDB's data and Prometheus' history in $STATE_DIR"
    exit 0 ;;
  *) log "ERROR: unknown action '$ACTION': start (the default), stop or delete-data"; exit 2 ;;
esac

apt_packages=()
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || apt_packages+=(rabbitmq-server)
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
command -v prometheus >/dev/null 2>&1 || apt_packages+=(prometheus)
if [ ${#apt_packages[@]} -gt 0 ]; then
  log "installing ${apt_packages[*]} from Debian"
  as_root apt-get update -qq
  # No init system runs here: keep the packages' postinst from starting daemons.
  as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

export PATH="$GOBIN:$PATH:/usr/sbin"
# `go install mod@version` asks the proxy for the module's version list (deprecation
# check), which the registry mirror here refuses; building the downloaded module
# needs only exact-version requests.
go_build_tool() {  # go_build_tool MODULE VERSION PACKAGE BINARY
  local dir src
  dir=$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  src=$(mktemp -d)
  cp -r "$dir/." "$src" && chmod -R u+w "$src"
  (cd "$src" && go build -o "$GOBIN/$4" "./$3")
  rm -rf "$src"
}
SECANTUS_VENV=$STATE_DIR/secantusdb-venv
SECANTUS_REQUIREMENTS=$ROOT/deployments/secantusdb/requirements.txt
if ! cmp -s "$SECANTUS_REQUIREMENTS" "$SECANTUS_VENV/requirements.txt"; then
  log "installing SecantusDB into $SECANTUS_VENV ($(grep -m1 -i '^secantusdb==' "$SECANTUS_REQUIREMENTS"))"
  rm -rf "$SECANTUS_VENV"
  "$PYTHON" -m venv "$SECANTUS_VENV"
  "$SECANTUS_VENV/bin/pip" install -q --disable-pip-version-check -r "$SECANTUS_REQUIREMENTS"
  cp "$SECANTUS_REQUIREMENTS" "$SECANTUS_VENV/requirements.txt"
fi
if ! command -v redis_exporter >/dev/null 2>&1; then
  log "building redis_exporter $REDIS_EXPORTER_VERSION"
  # The checksum database here has no entry for this module (404), so it alone is not
  # checked against it; its dependencies are still verified by its go.sum.
  GONOSUMDB=github.com/oliver006/redis_exporter \
    go_build_tool github.com/oliver006/redis_exporter "$REDIS_EXPORTER_VERSION" . redis_exporter
fi
if ! command -v grpcurl >/dev/null 2>&1; then
  log "building grpcurl $GRPCURL_VERSION"
  go_build_tool github.com/fullstorydev/grpcurl "$GRPCURL_VERSION" cmd/grpcurl grpcurl
fi

if ! port_open "$RABBITMQ_PORT"; then
  log "starting rabbitmq-server"
  rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus >/dev/null
  rabbitmq-server -detached
  # await_startup fails at once until the node has registered with epmd: retry it.
  for _ in $(seq 1 60); do
    rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 && break
    sleep 2
  done
  wait_port "$RABBITMQ_PORT" rabbitmq 10
fi

if ! port_open "$REDIS_PORT"; then
  log "starting redis-server on $REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
    --appendonly no --logfile "$STATE_DIR/redis.log"
  wait_port "$REDIS_PORT" redis 30
fi

# FerretDB, the local server of earlier versions, is retired: free its port.
if pkill -f "ferretdb .*--listen-addr=127.0.0.1:$MONGODB_PORT" 2>/dev/null; then
  log "stopped FerretDB (retired; SecantusDB takes port $MONGODB_PORT)"
  sleep 1
fi
if ! port_open "$MONGODB_PORT"; then
  mkdir -p "$STATE_DIR/secantusdb"
  log "starting SecantusDB on $MONGODB_PORT (data in $STATE_DIR/secantusdb, kept across restarts: $(du -sh "$STATE_DIR/secantusdb" | cut -f1))"
  # It reads every stored document's key before it listens (about 10 s a million here, far
  # longer on a cold or slow disk), so it gets as long as it keeps running.
  # --standalone: drivers see one plain server, like the mongo:7 of docker compose.
  nohup "$SECANTUS_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$MONGODB_PORT" --standalone \
    --storage-path "$STATE_DIR/secantusdb" --log-level WARNING \
    >"$STATE_DIR/secantusdb.log" 2>&1 &
  echo $! >"$STATE_DIR/secantusdb.pid"
  wait_started "$(cat "$STATE_DIR/secantusdb.pid")" "$MONGODB_PORT" secantusdb "$STATE_DIR/secantusdb.log" 900
  "$SECANTUS_VENV/bin/python" - "$MONGODB_PORT" <<'PING'
import sys, pymongo
pymongo.MongoClient(port=int(sys.argv[1]), serverSelectionTimeoutMS=30000).admin.command("ping")
PING
fi

if ! port_open "$REDIS_EXPORTER_PORT"; then
  log "starting redis_exporter on $REDIS_EXPORTER_PORT"
  nohup redis_exporter --redis.addr="redis://127.0.0.1:$REDIS_PORT" \
    --web.listen-address="127.0.0.1:$REDIS_EXPORTER_PORT" >"$STATE_DIR/redis_exporter.log" 2>&1 &
  wait_started $! "$REDIS_EXPORTER_PORT" redis_exporter "$STATE_DIR/redis_exporter.log" 60
fi

if ! port_open "$PROMETHEUS_PORT"; then
  log "starting prometheus on $PROMETHEUS_PORT (scrapes the make dev services)"
  nohup prometheus --config.file="$ROOT/deployments/prometheus/prometheus.local.yml" \
    --storage.tsdb.path="$STATE_DIR/prometheus" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    >"$STATE_DIR/prometheus.log" 2>&1 &
  # It replays its write-ahead log (kept across restarts) before it listens.
  wait_started $! "$PROMETHEUS_PORT" prometheus "$STATE_DIR/prometheus.log" 600
fi

cat <<INFO
[services] ready:
  RabbitMQ AMQP      amqp://guest:guest@127.0.0.1:$RABBITMQ_PORT/
  RabbitMQ UI        http://127.0.0.1:15672/  (guest / guest)
  RabbitMQ metrics   http://127.0.0.1:15692/metrics
  Redis              redis://127.0.0.1:$REDIS_PORT/0
  SecantusDB (MongoDB) mongodb://127.0.0.1:$MONGODB_PORT/  (log $STATE_DIR/secantusdb.log)
  Prometheus         http://127.0.0.1:$PROMETHEUS_PORT/  (promtool $(command -v promtool))
  redis_exporter     http://127.0.0.1:$REDIS_EXPORTER_PORT/metrics
  grpcurl            $(command -v grpcurl)
INFO
