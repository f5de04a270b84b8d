"""OSWorld's ``/start_recording`` and ``/end_recording``: the desktop's display recorded to an mp4
by ffmpeg's x11grab, run inside the desktop (as its user; inside its sandbox when it has one), the
file handed back when the recording ends.

Bounded: at most ``MAX_SECONDS`` of video and ``limits.max_file_bytes`` of file (ffmpeg stops at
either; what it recorded is still served). The mp4 is fragmented, so a recording ended by a reset
(which ends every app of the desktop) is still a playable file.
"""

from __future__ import annotations

from fastapi import HTTPException

from agentenv.envs.service.inside import read_inside
from agentenv.envs.desktop import Desktop

MAX_SECONDS = 3600
FRAMERATE = 10

# In the desktop's own runtime folder (per desktop, its user's only; wiped with the desktop).
_PREFIX = 'out="${XDG_RUNTIME_DIR:-/tmp}/agentenv-recording"\n'
# A process that ended but was not reaped yet is no recording.
_ALIVE = 'alive() { [ -e /proc/$1/stat ] && ! grep -q "^[0-9]* ([^)]*) Z" /proc/$1/stat; }\n'

_START = _PREFIX + _ALIVE + r"""
if [ -f "$out.pid" ] && alive "$(cat "$out.pid")"; then echo "a recording is already in progress"; exit 3; fi
rm -f "$out.mp4" "$out.log" "$out.pid"
command -v ffmpeg >/dev/null || { echo "ffmpeg is not installed (run scripts/install.sh)"; exit 4; }
setsid ffmpeg -nostdin -y -loglevel error -f x11grab -draw_mouse 1 -framerate "$3" -video_size "$1" -i "$DISPLAY" \
  -t "$2" -fs "$4" -c:v libx264 -preset ultrafast -pix_fmt yuv420p \
  -movflags +frag_keyframe+empty_moov "$out.mp4" >"$out.log" 2>&1 </dev/null &
pid=$!
echo "$pid" > "$out.pid"
for i in 1 2 3 4 5 6 7 8 9 10; do
  alive "$pid" || { echo "ffmpeg ended at once: $(tail -c 1500 "$out.log")"; rm -f "$out.pid"; exit 5; }
  [ -s "$out.mp4" ] && exit 0
  sleep 0.1
done
"""

_STOP = _PREFIX + _ALIVE + r"""
[ -f "$out.pid" ] || { echo "no recording in progress (POST /start_recording first)"; exit 3; }
pid=$(cat "$out.pid"); rm -f "$out.pid"
if alive "$pid"; then
  kill -INT "$pid"
  for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
  alive "$pid" && kill -KILL "$pid"
fi
[ -s "$out.mp4" ] || { echo "the recording is empty: $(tail -c 1500 "$out.log")"; exit 4; }
echo "$out.mp4"
"""


def start(d: Desktop, max_bytes: int) -> None:
    """Start recording ``d``'s screen; 400 when a recording is in progress, 503 when ffmpeg fails."""
    with d.locked():  # not while a reset ends the desktop's apps
        r = d.run(["bash", "-c", _START, "start", f"{d.width}x{d.height}", str(MAX_SECONDS), str(FRAMERATE),
                   str(max_bytes)], timeout=30)
    if r.returncode == 3:
        raise HTTPException(400, "a recording is already in progress (POST /end_recording first)")
    if r.returncode != 0:
        raise HTTPException(503, f"cannot start recording: {(r.stdout + r.stderr).strip()[-1500:]}")


def end(d: Desktop, max_bytes: int) -> bytes:
    """End the recording of ``d``'s screen; the mp4's bytes. 400 when none is in progress."""
    with d.locked():
        r = d.run(["bash", "-c", _STOP, "stop"], timeout=30)
        if r.returncode == 3:
            raise HTTPException(400, "no recording in progress (POST /start_recording first)")
        if r.returncode != 0:
            raise HTTPException(503, f"the recording failed: {(r.stdout + r.stderr).strip()[-1500:]}")
        return read_inside(d, r.stdout.strip().splitlines()[-1], max_bytes)
