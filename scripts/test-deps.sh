#!/usr/bin/env bash
# Installs and starts what fleetwatch's tests need on a Debian machine (run as root, or with sudo):
# a C compiler (build-essential: the bundled SQLite and aws-lc are C), Node.js + npm (the map
# page's libraries and the browser test), Chromium (headless browser test), RabbitMQ (ingest
# tests; started if it is not answering), docker-compose (validates the compose file),
# schemathesis (from PyPI: fuzzes the HTTP API against its OpenAPI document), PostgreSQL (the
# store conformance suite and the engine on PostgreSQL; started if it is not answering), Pushpin
# (the live stream through GRIP; the tests start their own instances).
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
command -v psql >/dev/null || missing+=(postgresql-client)
command -v pushpin >/dev/null || missing+=(pushpin)
fresh_postgres=false
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  missing+=(postgresql)
  fresh_postgres=true
fi
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

# Devices partitioned over engine nodes go through a consistent-hash exchange (--amqp-partitions).
if ! $SUDO rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_consistent_hash_exchange; then
  echo "enabling rabbitmq_consistent_hash_exchange"
  $SUDO rabbitmq-plugins enable rabbitmq_consistent_hash_exchange >/dev/null
fi

# PostgreSQL on 127.0.0.1:5432, reachable as postgres without a password (the tests' default
# FLEETWATCH_TEST_POSTGRES_URL). A server this script installed is given that on loopback only.
pg_url="${FLEETWATCH_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! pg_up; then
  echo "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
    pg_lsclusters -h | while read -r version cluster _; do $SUDO pg_ctlcluster "$version" "$cluster" start || true; done
  else
    $SUDO service postgresql start
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { echo "PostgreSQL is not answering on 127.0.0.1:5432" >&2; exit 1; }
fi
if ! psql "$pg_url" -qAtc 'SELECT 1' >/dev/null 2>&1 && $fresh_postgres; then
  hba=$($SUDO -u postgres psql -qAtc 'SHOW hba_file')
  echo "host all postgres 127.0.0.1/32 trust" | $SUDO tee /tmp/fleetwatch-hba >/dev/null
  $SUDO sh -c "cat '$hba' >> /tmp/fleetwatch-hba && cp /tmp/fleetwatch-hba '$hba'"
  $SUDO -u postgres psql -qAtc 'SELECT pg_reload_conf()' >/dev/null
fi
psql "$pg_url" -qAtc 'SELECT 1' >/dev/null \
  || { echo "PostgreSQL does not accept $pg_url (set FLEETWATCH_TEST_POSTGRES_URL)" >&2; exit 1; }
# TLS to the store (tests/store_conformance.rs): Debian's clusters serve it with the snakeoil
# certificate; a server that does not is given that certificate.
if [ "$(psql "$pg_url" -qAtc 'SHOW ssl')" != on ]; then
  echo "turning on TLS in PostgreSQL"
  if [ ! -f /etc/ssl/private/ssl-cert-snakeoil.key ]; then
    command -v make-ssl-cert >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ssl-cert >/dev/null
    $SUDO make-ssl-cert generate-default-snakeoil
  fi
  psql "$pg_url" -qc "ALTER SYSTEM SET ssl_cert_file = '/etc/ssl/certs/ssl-cert-snakeoil.pem'" \
    -c "ALTER SYSTEM SET ssl_key_file = '/etc/ssl/private/ssl-cert-snakeoil.key'" \
    -c "ALTER SYSTEM SET ssl = on" -c "SELECT pg_reload_conf()" >/dev/null
  [ "$(psql "$pg_url" -qAtc 'SHOW ssl')" = on ] \
    || { echo "PostgreSQL did not turn TLS on (can its user read the snakeoil key?)" >&2; exit 1; }
fi
# Databases earlier test runs created (tests/common/postgres.rs names them).
psql "$pg_url" -qAtc "SELECT datname FROM pg_database WHERE datname LIKE 'fleetwatch\_test\_%'" \
  | while read -r db; do psql "$pg_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; done

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
