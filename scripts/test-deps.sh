#!/usr/bin/env bash
# Installs and starts what fleetwatch's tests need on a Debian machine (run as root, or with sudo):
# a C compiler (build-essential: the bundled SQLite and aws-lc are C), Node.js + npm (the map
# page's libraries and the browser test), Chromium (headless browser test), RabbitMQ (ingest
# tests; started if it is not answering), docker-compose (validates the compose file),
# schemathesis (from PyPI: fuzzes the HTTP API against its OpenAPI document).
# Safe to run again: it only installs what is missing (scripts/test.sh runs it before every run).
# Rust itself is not installed here (see the README's Requirements).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
{ command -v cc && command -v make; } >/dev/null || missing+=(build-essential)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v chromium >/dev/null || missing+=(chromium)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up; then
  echo "starting RabbitMQ"
  $SUDO rabbitmq-server -detached
  for _ in $(seq 1 60); do amqp_up && break; sleep 1; done
  amqp_up || { echo "RabbitMQ is not answering on 127.0.0.1:5672" >&2; exit 1; }
  # Wait until the broker itself is ready, not just the port.
  $SUDO rabbitmqctl await_startup >/dev/null 2>&1 || true
fi

# The OpenAPI test's fuzzer (tests/openapi.rs runs its CLI against the engine).
if ! command -v schemathesis >/dev/null; then
  echo "installing schemathesis"
  if ! command -v pip3 >/dev/null && ! command -v pip >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
  fi
  pip_cmd=$(command -v pip3 || command -v pip)
  # Debian's own Python refuses system-wide installs without this (PEP 668).
  $pip_cmd install --quiet 'schemathesis>=4,<5' \
    || $pip_cmd install --quiet --break-system-packages 'schemathesis>=4,<5'
fi

# The browser test's driver (playwright-core drives Debian's chromium; it downloads no browser).
# Installed again only when the lock file is newer than the installed packages.
browser=tests/browser
if [ -f $browser/package-lock.json ] \
  && ! [ $browser/node_modules/.package-lock.json -nt $browser/package-lock.json ]; then
  (cd $browser && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "test dependencies ready"
