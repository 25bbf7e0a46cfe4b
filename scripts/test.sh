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
echo "== real engines"
# Real vLLM on this CPU (its own venv and a tiny local model); where the platform cannot run
# it, the script says why and the real-engine tests skip with that reason.
if vllm_bin=$(bash scripts/real-engines.sh); then
    export FAILOVER_VLLM_BIN="$vllm_bin"
else
    echo "real vLLM not available here: tests/real/test_vllm_cpu.py will be skipped"
fi
echo "== pytest"
marks="not slow"
[ "${FAILOVER_SLOW:-0}" = 1 ] && marks=""
exec pytest -m "$marks" "$@"
