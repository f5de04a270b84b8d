"""What makes the sandboxed desktop look like OSWorld's VM from inside, beyond its user and paths:
``sudo`` with the VM's password and credential cache, GNOME Terminal as the terminal, Firefox's
``firefox.desktop``, and the VM's settings (not GNOME's schema defaults) in the user's dconf database.

Files go to the sandbox's read-only ``/opt/agentenv`` (``write_files``, once per desktop) and into
each fresh HOME (``seed_home``, at every reset).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from loguru import logger

INNER = "/opt/agentenv"  # where the sandbox sees the folder write_files fills
XDG_DATA_DIRS = f"{INNER}/share:/usr/local/share:/usr/share"  # firefox.desktop is found there

# sudo inside the sandbox: checks OSWorld's password, then runs the command as uid 0 of a user
# namespace nested in the sandbox's (bwrap again), i.e. root inside the sandbox only. As sudo on the
# VM, a right password is remembered for 15 minutes per terminal (its tty and session), or per
# calling process where there is no terminal, in /run/sudo/ts (wiped at reset); -k, -K, -v and -n
# mean what they mean to sudo.
SUDO = r"""#!/bin/bash
# agentenv sandbox sudo: root in a nested user namespace, never on the host.
stdin_pw=0 as=root reset=0 validate=0 nonint=0
while [ $# -gt 0 ]; do
  case "$1" in
    -S|--stdin) stdin_pw=1; shift ;;
    -k|--reset-timestamp) reset=1; shift ;;
    -K|--remove-timestamp) rm -f /run/sudo/ts/user; exit 0 ;;
    -v|--validate) validate=1; shift ;;
    -n|--non-interactive) nonint=1; shift ;;
    -E|-H|-i|-s|--login|--shell|--preserve-env|--preserve-env=*) shift ;;
    -u|--user) as="$2"; shift 2 ;;
    -u*) as="${1#-u}"; shift ;;
    --user=*) as="${1#--user=}"; shift ;;
    -g|-p|--group|--prompt) shift 2 ;;
    -g*|-p*|--group=*|--prompt=*) shift ;;
    --) shift; break ;;
    -[SkvnEHis]*) f="${1#-}"; shift; set -- $(printf -- '-%s ' $(echo "$f" | fold -w1)) "$@" ;;
    -*) echo "sudo: option $1 is not supported in this sandbox" >&2; exit 1 ;;
    *) break ;;
  esac
done
ts=/run/sudo/ts/user
# The record's key, as sudo's tty tickets: the terminal and its session (leader's start time), or
# the calling process (and its start time) without a terminal.
stat=$(cat /proc/$$/stat); f=(${stat##*) })
if [ "${f[4]}" != 0 ]; then
  lead=$(cat /proc/${f[3]}/stat 2>/dev/null); l=(${lead##*) })
  key="tty:${f[4]}:${f[3]}:${l[19]}"
else
  parent=$(cat /proc/$PPID/stat 2>/dev/null); l=(${parent##*) })
  key="ppid:$PPID:${l[19]}"
fi
if [ "$reset" = 1 ] && [ $# -eq 0 ] && [ "$validate" = 0 ]; then
  [ -f "$ts" ] && { grep -v "^$key " "$ts" > "$ts.new"; mv -f "$ts.new" "$ts"; }
  exit 0
fi
now=$(date +%s) cached=0
if [ "$(id -u)" = 0 ]; then
  cached=1
elif [ "$reset" = 0 ] && [ -f "$ts" ]; then
  while read -r k t; do
    [ "$k" = "$key" ] && [ $((now - t)) -lt 900 ] && [ "$t" -le "$now" ] && cached=1
  done < "$ts"
fi
if [ "$cached" = 0 ]; then
  if [ "$nonint" = 1 ]; then
    echo "sudo: a password is required" >&2; exit 1
  elif [ "$stdin_pw" = 1 ]; then
    printf '[sudo] password for user: ' >&2; IFS= read -r pw
  elif [ -t 0 ]; then
    printf '[sudo] password for user: ' >&2; IFS= read -rs pw; echo >&2
  else
    echo "sudo: a terminal is required to read the password; either use the -S option to read from standard input or configure an askpass helper" >&2
    exit 1
  fi
  if [ "$pw" != "password" ]; then
    echo "sudo: 1 incorrect password attempt" >&2; exit 1
  fi
fi
if [ "$reset" = 0 ] && [ "$(id -u)" != 0 ]; then  # remember (or refresh) this terminal's password
  mkdir -p -m 700 /run/sudo /run/sudo/ts
  { [ -f "$ts" ] && grep -v "^$key " "$ts"; echo "$key $now"; } > "$ts.new" && mv -f "$ts.new" "$ts"
fi
[ "$validate" = 1 ] && [ $# -eq 0 ] && exit 0
[ $# -eq 0 ] && set -- /bin/bash
case "$as" in
  user|1000|'#1000') exec "$@" ;;
  root|0|'#0') ;;
  *) echo "sudo: unknown user $as" >&2; exit 1 ;;
esac
exec bwrap --unshare-user --uid 0 --gid 0 --bind / / --setenv SUDO_USER user --setenv SUDO_UID 1000 -- "$@"
"""


# The terminal (Ctrl+Alt+T, the menu, the `terminal` app): GNOME Terminal, as on OSWorld's VM (its
# profiles are gsettings that tasks read and write; its server is started by the session bus and ends
# at reset with the apps); xfce4-terminal, also as `gnome-terminal`, where it is not installed.
# /terminal reads its text over AT-SPI (sandbox_a11y.py), as OSWorld's server does.
GNOME_TERMINAL = "/usr/bin/gnome-terminal"
TERMINAL = r"""#!/bin/bash
cd ~  # opens in HOME, as Ctrl+Alt+T on the VM (openbox, which starts it, is elsewhere)
[ -x /usr/bin/gnome-terminal ] && exec /usr/bin/gnome-terminal "$@"
exec xfce4-terminal --disable-server -T Terminal
"""


# Debian's Firefox is firefox-esr (firefox-esr.desktop); OSWorld's tasks name firefox.desktop
# (`xdg-settings set default-web-browser firefox.desktop`).
FIREFOX = "/usr/bin/firefox-esr"
FIREFOX_DESKTOP = """[Desktop Entry]
Version=1.0
Type=Application
Name=Firefox Web Browser
GenericName=Web Browser
Exec=firefox-esr %u
Icon=firefox-esr
Terminal=false
Categories=Network;WebBrowser;
MimeType=text/html;text/xml;application/xhtml+xml;x-scheme-handler/http;x-scheme-handler/https;
StartupWMClass=firefox-esr
"""

# The VM's settings where they differ from GNOME's schema defaults and an OSWorld task reads them
# (a task whose goal is already the default would pass as a no-op). dconf keyfile syntax.
#   screensaver lock-enabled: os/a4d98375 ("lock my computer automatically") expects true: the VM
#   has it off (GNOME's default is on).
VM_SETTINGS = """[org/gnome/desktop/screensaver]
lock-enabled=false
"""


# The sound volume of a fresh desktop: below 100 % (os/28cc3b7e, "turn up to the max volume",
# expects 100, so the VM is below it; we do not know its exact value). Run by the sandbox's
# pulseaudio at start (sandbox_runner.py), on its null sink.
PULSE_SCRIPT = f"set-sink-volume null {0x10000 // 2}\n"  # 50 %


# google-chrome as OSWorld's tasks run it: the Debian Chromium with Chrome's profile folder (where
# OSWorld's getters read Bookmarks, History, Preferences, Cookies); the task's flags come last and
# win (--remote-debugging-port=1337: the port is in the sandbox's own network only).
GOOGLE_CHROME = r"""#!/bin/bash
exec chromium --user-data-dir="$HOME/.config/google-chrome" --disable-gpu --no-first-run \
  --no-default-browser-check --password-store=basic --disable-component-update --disable-sync \
  --disable-background-networking --renderer-process-limit=1 "$@"
"""


# VS Code (code-server, scripts/install_code_server.sh), bound read-only at INNER/code-server; `code`
# (sandbox_code.py) runs it on the desktop's own loopback and shows it in a Chromium app window.
CODE_SERVER = Path(os.environ.get("AGENTENV_CODE_SERVER", "/opt/agentenv/code-server"))


def code_server_installed() -> bool:
    """Whether scripts/install.sh installed code-server (its stamp is written last)."""
    return any(CODE_SERVER.glob(".stamp-*"))


def write_files(sys_dir: Path) -> None:
    """sudo, python, the terminal, google-chrome, code, firefox.desktop, the VM's volume and dconf
    database, in ``sys_dir`` (the sandbox's /opt/agentenv)."""
    bin_dir = sys_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    code = "#!/usr/bin/python3 -I\n" + (Path(__file__).parent / "sandbox_code.py").read_text()
    for name, text in (("sudo", SUDO), ("terminal", TERMINAL), ("google-chrome", GOOGLE_CHROME),
                       *((("code", code),) if code_server_installed() else ())):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (sys_dir / "code-server").mkdir(exist_ok=True)  # where CODE_SERVER is bound (sandbox_bwrap.py)
    (bin_dir / "python").symlink_to("/usr/bin/python3")
    (bin_dir / "google-chrome-stable").symlink_to("google-chrome")
    if not os.path.exists(GNOME_TERMINAL):
        (bin_dir / "gnome-terminal").symlink_to("terminal")
    if os.path.exists(FIREFOX):
        apps = sys_dir / "share" / "applications"
        apps.mkdir(parents=True, exist_ok=True)
        (apps / "firefox.desktop").write_text(FIREFOX_DESKTOP)
    (sys_dir / "pulse.pa").write_text(PULSE_SCRIPT)
    compile_settings(sys_dir / "dconf-user")


def compile_settings(out: Path) -> bool:
    """VM_SETTINGS as a dconf database (the format of ~/.config/dconf/user), with `dconf compile`."""
    dconf = shutil.which("dconf", path="/usr/bin:/bin")
    if dconf is None:
        logger.debug("no dconf (dconf-cli): the sandbox keeps GNOME's defaults")
        return False
    src = out.with_name(out.name + ".d")
    src.mkdir(exist_ok=True)
    (src / "vm").write_text(VM_SETTINGS)
    r = subprocess.run([dconf, "compile", str(out), str(src)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        logger.warning("dconf compile failed ({}): the sandbox keeps GNOME's defaults", r.stderr.strip())
        return False
    out.chmod(0o644)
    return True


def seed_home(home: Path, sys_dir: Path) -> list[Path]:
    """The VM's settings as the user's dconf database of a fresh HOME (unless its template brought
    one); returns what it made, for the caller to give to the desktop user."""
    db, user_db = sys_dir / "dconf-user", home / ".config" / "dconf" / "user"
    if not db.exists() or user_db.exists():
        return []
    made = [p for p in (user_db.parent.parent, user_db.parent) if not p.exists()]
    user_db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db, user_db)
    return [*made, user_db]
