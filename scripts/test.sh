#!/usr/bin/env bash
# The test suite: install what is missing, then run every test (real vLLM, real desktops).
# Extra arguments go to pytest. Collecting no test is a failure (pytest exits 5).
# The 30 slowest tests are listed at the end of every run (CI too). AGENTENV_TEST_WORKERS=2 runs two
# pytest-xdist workers side by side (tests/conftest.py says what runs where); the default is one
# process: on 2 cores two workers each driving its own vLLM server were no faster (docs/benchmarks.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$("$ROOT/scripts/install.sh" | tail -n 1)
cd "$ROOT"
PYTHONPATH="$ROOT" exec "$PY" -m pytest -p no:cacheprovider -ra --durations=30 \
  -n "${AGENTENV_TEST_WORKERS:-0}" --dist loadfile --no-loadscope-reorder "$@"
