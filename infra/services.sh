#!/usr/bin/env bash
# Local servers for "past one machine" runs: a Prefect server and an MLflow server, bound to 127.0.0.1,
# with their state in the workspace ($GPTFLOW_HOME, default <repo>/.gptflow).
#   infra/services.sh start|stop|status
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
home="${GPTFLOW_HOME:-$repo/.gptflow}"
bin="$repo/.venv/bin"
mkdir -p "$home/services"
export PREFECT_HOME="$home/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
prefect_port="${PREFECT_PORT:-4200}" mlflow_port="${MLFLOW_PORT:-5000}"

start() {
  "$bin/prefect" server start --host 127.0.0.1 --port "$prefect_port" >"$home/services/prefect.log" 2>&1 &
  echo $! >"$home/services/prefect.pid"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$bin/mlflow" server --host 127.0.0.1 --port "$mlflow_port" --workers 1 \
    --backend-store-uri "sqlite:///$home/mlflow-server.db" --artifacts-destination "$home/mlflow-artifacts" \
    >"$home/services/mlflow.log" 2>&1 &
  echo $! >"$home/services/mlflow.pid"
  for url in "http://127.0.0.1:$prefect_port/api/health" "http://127.0.0.1:$mlflow_port/health"; do
    for _ in $(seq 60); do curl -fs "$url" >/dev/null 2>&1 && break; sleep 1; done
    curl -fs "$url" >/dev/null || { echo "not healthy: $url (logs in $home/services)"; exit 1; }
  done
  echo "export PREFECT_API_URL=http://127.0.0.1:$prefect_port/api MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port"
}

stop() {
  for name in prefect mlflow; do
    f="$home/services/$name.pid"
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

status() {
  curl -fs "http://127.0.0.1:$prefect_port/api/health" >/dev/null && echo "prefect: up" || echo "prefect: down"
  curl -fs "http://127.0.0.1:$mlflow_port/health" >/dev/null && echo "mlflow: up" || echo "mlflow: down"
}

"${1:-status}"
