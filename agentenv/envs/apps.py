"""The apps a desktop offers and how they start: the aliases task setup steps name (``APPS``), the
app that opens each kind of file (``OPENERS``), the window manager's config and menu, and the
settings an app needs in a fresh HOME. Shared by the host and sandboxed desktops."""

from __future__ import annotations

from pathlib import Path

# App aliases usable in task setup steps (`launch`), expanded to real commands.
APPS: dict[str, list[str]] = {
    "editor": ["mousepad"],
    "terminal": ["xfce4-terminal", "--disable-server"],
    "calculator": ["galculator"],
    "files": ["pcmanfm"],
    "spreadsheet": ["libreoffice", "--calc", "--norestore", "--nologo"],
    "browser": ["chromium", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--renderer-process-limit=1", "--disable-quic",
                "--password-store=basic"],
}
# Files opened by the `open` setup step go to the app for their extension.
OPENERS = {
    ".txt": "editor", ".md": "editor", ".py": "editor", ".csv": "editor", ".json": "editor",
    ".ods": "spreadsheet", ".xlsx": "spreadsheet", ".html": "browser", ".htm": "browser",
}

# Openbox: every window maximized and undecorated, so the layout is the same on every reset
# and coordinates in a task's oracle stay valid.
OPENBOX_RC = """<?xml version="1.0" encoding="UTF-8"?>
<openbox_config xmlns="http://openbox.org/3.4/rc">
  <focus><focusNew>yes</focusNew><followMouse>no</followMouse></focus>
  <menu><file>{menu}</file></menu>
  <keyboard>
    <keybind key="C-A-t"><action name="Execute"><command>{terminal}</command></action></keybind>
    <keybind key="A-F1"><action name="ShowMenu"><menu>root-menu</menu></action></keybind>
    <keybind key="A-F4"><action name="Close"/></keybind>
  </keyboard>
  <mouse>
    <context name="Root">
      <mousebind button="Right" action="Press"><action name="ShowMenu"><menu>root-menu</menu></action></mousebind>
    </context>
  </mouse>
  <placement><policy>Smart</policy></placement>
  <desktops><number>1</number></desktops>
  <applications>
    <application class="*" type="normal"><maximized>yes</maximized><focus>yes</focus></application>
    <!-- GNOME Terminal opens at its profile's size, as on OSWorld's VM (tasks set it and read `stty size`) -->
    <application class="Gnome-terminal" type="normal"><maximized>no</maximized></application>
  </applications>
</openbox_config>
"""

# The launcher an agent opens with Alt+F1 or a right click on the desktop (OSWorld's Ubuntu has
# its dock and Activities; this is our equivalent). Ctrl+Alt+T opens a terminal, as on Ubuntu.
OPENBOX_MENU = """<?xml version="1.0" encoding="UTF-8"?>
<openbox_menu xmlns="http://openbox.org/3.4/menu">
  <menu id="root-menu" label="Applications">
""" + "".join(f"""    <item label="{label}"><action name="Execute"><command>{cmd}</command></action></item>
""" for label, cmd in (("Terminal", "{terminal}"), ("Text Editor", "mousepad"),
                       ("Files", "pcmanfm"), ("Calculator", "galculator"),
                       ("Spreadsheet", "libreoffice --calc --norestore --nologo"),
                       ("Browser", "chromium --disable-gpu --no-first-run --password-store=basic"))) + """  </menu>
</openbox_menu>
"""


LIBREOFFICE_SETTINGS = """<?xml version="1.0" encoding="UTF-8"?>
<oor:items xmlns:oor="http://openoffice.org/2001/registry" xmlns:xs="http://www.w3.org/2001/XMLSchema" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<item oor:path="/org.openoffice.Office.Common/Misc"><prop oor:name="ShowTipOfTheDay" oor:op="fuse">\
<value>false</value></prop></item>
</oor:items>
"""


def write_openbox_files(folder: Path, seen_as: str, terminal: str) -> None:
    """Write openbox's config and menu in ``folder``, which openbox sees as ``seen_as``;
    ``terminal`` is what Ctrl+Alt+T and the menu start."""
    (folder / "openbox-menu.xml").write_text(OPENBOX_MENU.replace("{terminal}", terminal))
    (folder / "openbox-rc.xml").write_text(OPENBOX_RC.replace("{menu}", f"{seen_as}/openbox-menu.xml")
                                           .replace("{terminal}", terminal))


def app_argv(argv: list[str], home: str, terminal: str | None = None) -> list[str]:
    """The command line that starts ``argv``: an alias of APPS expanded (``terminal`` first, where
    the desktop has a terminal command of its own), Chromium with its profile under ``home`` (the
    HOME its apps see) and our flags. OSWorld's task files say google-chrome."""
    if argv and terminal and argv[0] == "terminal":
        argv = [terminal] + argv[1:]
    if argv and argv[0] in APPS:
        argv = APPS[argv[0]] + argv[1:]
    if argv and argv[0] in ("chromium", "google-chrome"):
        argv = ["chromium", f"--user-data-dir={home}/.config/chromium"] + \
            [a for a in APPS["browser"][1:] if a not in argv] + argv[1:]
    return argv
