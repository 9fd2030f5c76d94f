#!/usr/bin/env bash
# The whole test suite in one command: installs and starts what the tests need when it is missing
# (scripts/test-deps.sh: a C compiler, Node.js/npm, Chromium, RabbitMQ, docker-compose; needs root
# or sudo the first time), then runs every test of the workspace. Arguments go to `cargo test`:
#
#   ./scripts/test.sh                      # everything (and part of it again on PostgreSQL)
#   ./scripts/test.sh --test monitoring    # one test file
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/test-deps.sh
if [ $# -gt 0 ]; then
  exec cargo test --workspace "$@"
fi
cargo test --workspace
# The engine's own tests once more with its events in PostgreSQL (the test kit gives each engine
# a database of its own): crashes, the read side, the live stream, alarms, the API. The store's
# contract itself runs against both stores above (tests/store_conformance.rs).
FLEETWATCH_TEST_STORE=postgres cargo test --test crash_recovery --test read_models \
  --test live_stream --test alarms --test http_api
