"""Files a fresh HOME gets so the apps start as on OSWorld's VM (a used profile, not a first run).

* VLC: its HTTP interface on, on 127.0.0.1:8080 with the password ``password``, as desktop-env's
  ``vlc_playing_info`` getter reads it (OSWorld's VM sets it in vlcrc, so tasks launch a plain
  ``vlc``); no privacy question at the first start. On a sandboxed desktop 127.0.0.1 is the
  desktop's own loopback (its network namespace): other desktops and the host cannot reach it.
* Thunderbird: an offline profile (no network here) under ``~/.thunderbird``, named as OSWorld's
  tasks name theirs, with a POP account that never connects and Local Folders, so Thunderbird
  opens its mail window instead of the account wizard. Tasks that bring their own profile
  (a tarball extracted over ``~/``) replace it.
* GIMP: ``~/.config/GIMP/2.10`` (where desktop-env's gimp getter and metrics look) from a seed that
  ``scripts/install.sh`` makes by starting GIMP once (``APP_SEEDS``): a first start in a fresh HOME
  queries every plug-in again, 20-30 s here, the seeded one starts as on a used VM.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

APP_SEEDS = Path(os.environ.get("AGENTENV_APP_SEEDS", "/opt/agentenv/app-seeds"))
SEEDED = {"GIMP-2.10": Path(".config") / "GIMP" / "2.10"}  # seed folder -> where it goes in HOME

VLCRC = """[qt]
qt-privacy-ask=0
qt-updates-notif=0
[lua]
http-password=password
[core]
extraintf=http
http-host=127.0.0.1
http-port=8080
"""

THUNDERBIRD_PROFILE = "t5q2a5hp.default-release"
# Thunderbird keeps one default profile per install, keyed by a hash of its folder (this is
# Debian's /usr/lib/thunderbird): without these lines it would make a new empty profile.
THUNDERBIRD_INSTALL = "FDC34C9F024745EB"
INSTALLS_INI = f"""[{THUNDERBIRD_INSTALL}]
Default={THUNDERBIRD_PROFILE}
Locked=1
"""
PROFILES_INI = f"""[Install{THUNDERBIRD_INSTALL}]
Default={THUNDERBIRD_PROFILE}
Locked=1

[Profile0]
Name=default-release
IsRelative=1
Path={THUNDERBIRD_PROFILE}
Default=1

[General]
StartWithLastProfile=1
Version=2
"""
_PREFS = {
    "mail.shell.checkDefaultClient": False, "mail.provider.enabled": False,
    "mailnews.start_page.enabled": False, "mail.rights.version": 1, "mail.spotlight.firstRunDone": True,
    "datareporting.policy.dataSubmissionEnabled": False, "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.donation.eoy.version.viewed": 999, "mail.inappnotifications.enabled": False,
    # Fewer processes, same features: no prelaunched content process and extensions in the main one
    # (measured 2026-12-07: 406-421 MB PSS for a desktop with Thunderbird open, 368-379 MB with these)
    "dom.ipc.processPrelaunch.enabled": False, "dom.ipc.processCount": 1, "extensions.webextensions.remote": False,
    "mail.accountmanager.accounts": "account1,account2", "mail.accountmanager.defaultaccount": "account1",
    "mail.accountmanager.localfoldersserver": "server2",
    "mail.account.account1.identities": "id1", "mail.account.account1.server": "server1",
    "mail.account.account2.server": "server2",
    "mail.identity.id1.fullName": "User", "mail.identity.id1.useremail": "user@example.invalid",
    "mail.identity.id1.valid": True,
    "mail.server.server1.type": "pop3", "mail.server.server1.hostname": "127.0.0.1",
    "mail.server.server1.userName": "user", "mail.server.server1.name": "user@example.invalid",
    "mail.server.server1.login_at_startup": False, "mail.server.server1.check_new_mail": False,
    "mail.server.server1.directory-rel": "[ProfD]Mail/127.0.0.1",
    "mail.server.server2.type": "none", "mail.server.server2.hostname": "Local Folders",
    "mail.server.server2.userName": "nobody", "mail.server.server2.name": "Local Folders",
    "mail.server.server2.directory-rel": "[ProfD]Mail/Local Folders",
}


def _pref_line(key: str, value: object) -> str:
    v = ("true" if value else "false") if isinstance(value, bool) else \
        str(value) if isinstance(value, int) else '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f'user_pref("{key}", {v});\n'


def write(home: Path) -> None:
    """Write the apps' default files into a fresh HOME (a file already there, from a template, stays)."""
    files = {
        home / ".config" / "vlc" / "vlcrc": VLCRC,
        home / ".thunderbird" / "profiles.ini": PROFILES_INI,
        home / ".thunderbird" / "installs.ini": INSTALLS_INI,
        home / ".thunderbird" / THUNDERBIRD_PROFILE / "prefs.js":
            "// Mozilla User Preferences\n" + "".join(_pref_line(k, v) for k, v in _PREFS.items()),
    }
    for path, text in files.items():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for seed, dest in SEEDED.items():
        if (APP_SEEDS / seed).is_dir() and not (home / dest).exists():
            shutil.copytree(APP_SEEDS / seed, home / dest, symlinks=True)
