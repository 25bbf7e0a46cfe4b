#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy), then pytest (slow tests excluded unless
# FAILOVER_SLOW=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:/usr/sbin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
marks="not slow"
[ "${FAILOVER_SLOW:-0}" = 1 ] && marks=""
exec pytest -m "$marks" "$@"
