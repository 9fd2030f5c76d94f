#!/usr/bin/env bash
# The whole test suite in one command: installs and starts what the tests need when it is missing
# (scripts/test-deps.sh: a C compiler, Node.js/npm, Chromium, RabbitMQ, docker-compose; needs root
# or sudo the first time), then runs every test of the workspace. Arguments go to `cargo test`:
#
#   ./scripts/test.sh                      # everything
#   ./scripts/test.sh --test monitoring    # one test file
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/test-deps.sh
exec cargo test --workspace "$@"
