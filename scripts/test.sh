#!/usr/bin/env bash
# The test suite: install what is missing, then run every test (real vLLM, real desktops).
# Extra arguments go to pytest. Collecting no test is a failure (pytest exits 5).
# The 30 slowest tests are listed at the end of every run (CI too). Two pytest-xdist workers run side
# by side (AGENTENV_TEST_WORKERS, 0 for one process): gw0 the modules that use the session's vLLM
# server, the other those that need none (tests/conftest.py). On 2 cores: 19 min 20 s against 25 min
# 32 s in one process (docs/benchmarks.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$("$ROOT/scripts/install.sh" | tail -n 1)
cd "$ROOT"
PYTHONPATH="$ROOT" exec "$PY" -m pytest -p no:cacheprovider -ra --durations=30 \
  -n "${AGENTENV_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
