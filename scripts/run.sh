#!/usr/bin/env bash
# The main job on built-in defaults: install what is missing, then run the built-in tasks with the
# tiny model on vLLM and local desktops; each run writes a new runs/<stamp>/ (runs/latest points at
# it) and prints its summary. Extra arguments go to `agentenv run` (e.g. --set tasks.limit=4, or
# --resume to continue runs/latest).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$("$ROOT/scripts/install.sh" | tail -n 1)
cd "$ROOT"
PYTHONPATH="$ROOT" exec "$PY" -m agentenv run "$@"
