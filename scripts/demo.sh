#!/usr/bin/env bash
# The demo: simulated engines, no servers needed. Extra arguments go to
# `failover-supervisor demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/failover-supervisor demo "$@"
