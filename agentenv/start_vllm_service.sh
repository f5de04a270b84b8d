#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server for UI-TARS serving, wait until it is healthy.
#
#   scripts/start_vllm_service.sh [options] [-- extra vllm args]
#   scripts/start_vllm_service.sh --stop [--port P]
#   scripts/start_vllm_service.sh --foreground [options]   (run in the foreground; for `agentenv run`)
#
# With no arguments: the tiny UI-TARS-shaped model (python -m agentenv.tiny_model) on 127.0.0.1:8000.
# Prints `export VLLM_SERVER_URL=... VLLM_MODEL_NAME=...` on success. The pid file and the log go
# to --run-dir (default $AGENTENV_HOME/run); --stop ends exactly the process recorded there.
set -euo pipefail

# The folder that holds the agentenv package: the repository, or site-packages once installed
# (this file is package data: agentenv/start_vllm_service.sh; scripts/ has a link to it).
ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
AGENTENV_HOME=${AGENTENV_HOME:-$HOME/.cache/agentenv}
MODEL=$AGENTENV_HOME/models/tiny-uitars
NAME=""
HOST=127.0.0.1
PORT=8000
TP=1
GPU_MEM=0.9
MAX_LEN=8192
MAX_SEQS=64
MAX_IMAGES=5
MIN_PIXELS=""
MAX_PIXELS=""
PREFIX_CACHING=1
LORA=""
WEIGHT_UPDATES=0
MAX_LORA_RANK=16
TOKENS_API=0
RUN_DIR=$AGENTENV_HOME/run
WAIT=420
STOP=0
FOREGROUND=0
EXTRA=()

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF
Options (defaults in brackets):
  --model PATH              model directory or name [$MODEL]
  --served-model-name NAME  name clients use [basename of --model]
  --host H / --port P       bind address [$HOST:$PORT]
  --tensor-parallel-size N  [$TP]
  --gpu-memory-utilization F  fraction of GPU memory, GPU builds only [$GPU_MEM]
  --max-model-len N         [$MAX_LEN]
  --max-num-seqs N          max concurrent sequences [$MAX_SEQS]
  --max-images N            images per prompt (--limit-mm-per-prompt) [$MAX_IMAGES]
  --min-pixels N / --max-pixels N  image processor bounds (--mm-processor-kwargs); must match
                            the agent's; default: the model's agentenv_tiny.json, else UI-TARS-1.5's
  --no-prefix-caching       disable prefix caching
  --lora NAME=PATH          serve a LoRA adapter (also enables runtime LoRA updates)
  --weight-updates          new weights at run time, no restart: full checkpoints through
                            /collective_rpc reload_weights (sets VLLM_SERVER_DEV_MODE=1, which also
                            opens /reset_prefix_cache and other dev routes: bind to loopback or a
                            trusted network only) and LoRA adapters (/v1/load_lora_adapter)
  --max-lora-rank N         with --lora or --weight-updates [$MAX_LORA_RANK]
  --tokens-api              the tokens-in/tokens-out route /inference/v1/generate (verl's server
                            manager over HTTP: agentenv.integrations.verl.HTTPServerManager)
  --run-dir DIR             pid file and log [$RUN_DIR]
  --wait SECONDS            how long to wait for /health [$WAIT]
  --python PATH             python with vLLM [\$AGENTENV_PYTHON or \$AGENTENV_HOME/venv/bin/python]
  --stop                    stop the server started on --port
  --foreground              exec the server in this process (no pid file, no wait, log on stdout):
                            the caller owns it (agentenv run ties it to its own life)
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift ;;
    --served-model-name) NAME=$2; shift ;;
    --host) HOST=$2; shift ;;
    --port) PORT=$2; shift ;;
    --tensor-parallel-size) TP=$2; shift ;;
    --gpu-memory-utilization) GPU_MEM=$2; shift ;;
    --max-model-len) MAX_LEN=$2; shift ;;
    --max-num-seqs) MAX_SEQS=$2; shift ;;
    --max-images) MAX_IMAGES=$2; shift ;;
    --min-pixels) MIN_PIXELS=$2; shift ;;
    --max-pixels) MAX_PIXELS=$2; shift ;;
    --no-prefix-caching) PREFIX_CACHING=0 ;;
    --lora) LORA=$2; shift ;;
    --weight-updates) WEIGHT_UPDATES=1 ;;
    --max-lora-rank) MAX_LORA_RANK=$2; shift ;;
    --tokens-api) TOKENS_API=1 ;;
    --run-dir) RUN_DIR=$2; shift ;;
    --wait) WAIT=$2; shift ;;
    --python) AGENTENV_PYTHON=$2; shift ;;
    --stop) STOP=1 ;;
    --foreground) FOREGROUND=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "start_vllm_service.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$RUN_DIR"
PIDFILE=$RUN_DIR/vllm-$PORT.pid
LOG=$RUN_DIR/vllm-$PORT.log

stop_server() {
  [ -f "$PIDFILE" ] || { echo "no server recorded in $PIDFILE" >&2; return 0; }
  local pid; pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    # The server was started in its own session, so its process group is exactly what we started
    # (API server plus its engine processes).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped vLLM server pid $pid (port $PORT)" >&2
  fi
  rm -f "$PIDFILE"
}

if [ "$STOP" = 1 ]; then stop_server; exit 0; fi

PY=${AGENTENV_PYTHON:-$AGENTENV_HOME/venv/bin/python}
if [ ! -x "$PY" ]; then
  if [ ! -x "$ROOT/scripts/install.sh" ]; then
    echo "no python with vLLM at $PY: set AGENTENV_PYTHON (or --python)" >&2
    exit 1
  fi
  PY=$("$ROOT/scripts/install.sh" | tail -n 1)
fi
if [ "$MODEL" = "$AGENTENV_HOME/models/tiny-uitars" ]; then
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m agentenv.tiny_model --quiet
fi
[ -n "$NAME" ] || NAME=$(basename "$MODEL")

if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "a server started by this script already runs on port $PORT (pid $(cat "$PIDFILE")); use --stop first" >&2
  exit 1
fi

# Pixel bounds: the model's own record when it is our tiny model, UI-TARS-1.5's otherwise.
if [ -z "$MIN_PIXELS" ] || [ -z "$MAX_PIXELS" ]; then
  read -r DMIN DMAX < <("$PY" - "$MODEL" <<'EOF'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1]) / "agentenv_tiny.json"
d = json.loads(p.read_text()) if p.exists() else {}
print(d.get("min_pixels", 100 * 28 * 28), d.get("max_pixels", 16384 * 28 * 28))
EOF
)
  MIN_PIXELS=${MIN_PIXELS:-$DMIN}
  MAX_PIXELS=${MAX_PIXELS:-$DMAX}
fi

ARGS=(-m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name "$NAME"
  --host "$HOST" --port "$PORT" --tensor-parallel-size "$TP" --max-model-len "$MAX_LEN"
  --max-num-seqs "$MAX_SEQS" --limit-mm-per-prompt "{\"image\": $MAX_IMAGES, \"video\": 0}"
  --mm-processor-kwargs "{\"min_pixels\": $MIN_PIXELS, \"max_pixels\": $MAX_PIXELS}"
  --trust-remote-code --disable-log-stats)
if [ "$PREFIX_CACHING" = 1 ]; then ARGS+=(--enable-prefix-caching); else ARGS+=(--no-enable-prefix-caching); fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ARGS+=(--gpu-memory-utilization "$GPU_MEM")
else
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
  # vLLM 0.32's AOT compile cache fails to load on CPU ('function' object has no attribute
  # 'finalize_loading') and compiles again at every start (about 60 s here); its older cache loads.
  export VLLM_USE_AOT_COMPILE=${VLLM_USE_AOT_COMPILE:-0}
  if [ "$TP" = 1 ]; then
    # One worker runs inside the engine process: one process fewer to start (about 16 s here) and
    # no busy-polled queue between the two (6 sequential image calls took 2.0 s instead of 4.4-6.1
    # s on 2 cores). vLLM's CPU platform keeps the in-process executor only with this variable at 0.
    export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
    ARGS+=(--distributed-executor-backend uni)
  fi
fi
if [ -n "$LORA" ] || [ "$WEIGHT_UPDATES" = 1 ]; then
  export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
  ARGS+=(--enable-lora --max-lora-rank "$MAX_LORA_RANK")
  [ -z "$LORA" ] || ARGS+=(--lora-modules "$LORA")
fi
[ "$WEIGHT_UPDATES" = 0 ] || export VLLM_SERVER_DEV_MODE=1
[ "$TOKENS_API" = 0 ] || ARGS+=(--enable-scale-out)
ARGS+=("${EXTRA[@]}")

if [ "$FOREGROUND" = 1 ]; then
  echo "starting vLLM in the foreground: $NAME on $HOST:$PORT" >&2
  exec "$PY" "${ARGS[@]}" < /dev/null
fi
echo "starting vLLM: $NAME on $HOST:$PORT (log: $LOG)" >&2
# setsid: the server gets its own process group, which --stop ends as a whole.
setsid "$PY" "${ARGS[@]}" >"$LOG" 2>&1 < /dev/null &
PID=$!
echo "$PID" > "$PIDFILE"

start=$(date +%s)
URL_HOST=$HOST; [ "$HOST" = 0.0.0.0 ] && URL_HOST=127.0.0.1
until curl -sf "http://$URL_HOST:$PORT/health" >/dev/null 2>&1; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "vLLM server exited during start-up; last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    rm -f "$PIDFILE"
    exit 1
  fi
  if [ $(( $(date +%s) - start )) -ge "$WAIT" ]; then
    echo "vLLM server not healthy after ${WAIT}s; last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    stop_server
    exit 1
  fi
  sleep 1
done
echo "vLLM ready in $(( $(date +%s) - start ))s (pid $PID)" >&2
echo "export VLLM_SERVER_URL=http://$URL_HOST:$PORT/v1 VLLM_MODEL_NAME=$NAME"
