"""A sandboxed desktop's accessibility tree, read over AT-SPI from inside the sandbox (the system
python3 with gi and libatspi: it never runs in the env service, whose process must not talk to
what the desktop's apps answer, nor wait for them).

    python3 -I /opt/agentenv/a11y.py tree MAX_NODES MAX_DEPTH MAX_CHILDREN MAX_TEXT MAX_BYTES SECONDS
    python3 -I /opt/agentenv/a11y.py terminal SECONDS

Prints one JSON line: ``{"AT": "<xml>", "nodes": n, "truncated": [reasons]}`` or ``{"text": str | null}``.

The XML is the one OSWorld's in-VM server (desktop_env/server/main.py) answers on Ubuntu: a
``desktop-frame`` root, one element per accessible named by its role (spaces as ``-``), its name as
``name``, states as ``st:<state>="true"``, object attributes as ``attr:<name>``, the screen box as
``cp:screencoord`` / ``cp:size`` (for visible, showing nodes), value as ``val:value|min|max|step``,
actions as ``act:<name>_desc`` / ``_kb``, ``image`` and ``selection`` flags, and the node's text as
the element's text. A tree past a bound (nodes, depth, children per node, text per node, bytes,
seconds) is cut there; the root's ``truncated`` attribute names which bounds were hit. An app that
does not answer costs one call timeout and is skipped.
"""

from __future__ import annotations

import json
import re
import sys
import time
import xml.etree.ElementTree as ET

import gi

gi.require_version("Atspi", "2.0")
from gi.repository import Atspi, GLib  # noqa: E402

NS = {  # OSWorld's namespaces for Ubuntu (prefix -> URI); consumers match on the URIs
    "st": "https://accessibility.ubuntu.example.org/ns/state",
    "attr": "https://accessibility.ubuntu.example.org/ns/attributes",
    "cp": "https://accessibility.ubuntu.example.org/ns/component",
    "doc": "https://accessibility.ubuntu.example.org/ns/document",
    "docattr": "https://accessibility.ubuntu.example.org/ns/document/attributes",
    "txt": "https://accessibility.ubuntu.example.org/ns/text",
    "val": "https://accessibility.ubuntu.example.org/ns/value",
    "act": "https://accessibility.ubuntu.example.org/ns/action",
}
# Apps that stand in for OSWorld's, named as on its VM: google-chrome is the Debian Chromium here,
# and OSWorld's getters find its address bar under application[name="Google Chrome"].
APP_NAMES = {"Chromium": "Google Chrome"}
CALL_TIMEOUT_MS = 1500  # one D-Bus call to an app (libatspi's default is 25 s)
_BAD_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class AppGone(Exception):
    """An app left or stopped answering mid-walk: it is left out of the tree."""


def clean(s: str | None) -> str:
    return _BAD_XML_CHARS.sub("", s or "")


class Walker:
    def __init__(self, max_nodes: int, max_depth: int, max_children: int, max_text: int, max_bytes: int,
                 seconds: float):
        self.max_nodes, self.max_depth, self.max_children = max_nodes, max_depth, max_children
        self.max_text, self.max_bytes = max_text, max_bytes
        self.deadline = time.monotonic() + seconds
        self.nodes = 0
        self.bytes = 0
        self.truncated: set[str] = set()

    def out_of_budget(self) -> bool:
        if self.nodes >= self.max_nodes:
            self.truncated.add("nodes")
        elif self.bytes >= self.max_bytes:
            self.truncated.add("bytes")
        elif time.monotonic() > self.deadline:
            self.truncated.add("time")
        else:
            return False
        return True

    def node(self, acc: Atspi.Accessible, depth: int) -> ET.Element | None:
        if self.out_of_budget():
            return None
        try:
            el = self._element(acc)
        except GLib.Error as e:  # the app left or does not answer
            raise AppGone(str(e)) from e
        self.nodes += 1
        self.bytes += 64 + sum(len(k) + len(v) for k, v in el.attrib.items()) + len(el.text or "")
        if depth >= self.max_depth:
            self.truncated.add("depth")
            return el
        for child in self.children(acc):
            sub = self.node(child, depth + 1)
            if sub is None:
                break
            el.append(sub)
        return el

    def children(self, acc: Atspi.Accessible):
        try:
            n = acc.get_child_count()
        except GLib.Error as e:
            raise AppGone(str(e)) from e
        if n > self.max_children:
            self.truncated.add("children")
        for i in range(min(n, self.max_children)):
            try:
                child = acc.get_child_at_index(i)
            except GLib.Error as e:
                raise AppGone(str(e)) from e
            if child is not None:
                yield child

    def _element(self, acc: Atspi.Accessible) -> ET.Element:
        attrib: dict[str, str] = {"name": clean(acc.get_name())}
        states = acc.get_state_set().get_states()
        for st in states:
            attrib[f"{{{NS['st']}}}{st.value_name.removeprefix('ATSPI_STATE_').lower()}"] = "true"
        for k, v in (acc.get_attributes() or {}).items():
            if _XML_NAME.match(k):
                attrib[f"{{{NS['attr']}}}{k}"] = clean(v)
        ifaces = set(acc.get_interfaces())
        if "Component" in ifaces and Atspi.StateType.VISIBLE in states and Atspi.StateType.SHOWING in states:
            box = acc.get_extents(Atspi.CoordType.SCREEN)
            attrib[f"{{{NS['cp']}}}screencoord"] = f"({box.x}, {box.y})"
            attrib[f"{{{NS['cp']}}}size"] = f"({box.width}, {box.height})"
        text = ""
        if "Text" in ifaces:
            n = acc.get_character_count()
            text = acc.get_text(0, min(n, self.max_text)) or ""
            if n > self.max_text:
                self.truncated.add("text")
            text = clean(text.replace("\ufffc", "").replace("\ufffd", ""))
        if "Image" in ifaces:
            attrib["image"] = "true"
        if "Selection" in ifaces:
            attrib["selection"] = "true"
        if "Value" in ifaces:
            for key, get in (("value", acc.get_current_value), ("min", acc.get_minimum_value),
                             ("max", acc.get_maximum_value), ("step", acc.get_minimum_increment)):
                try:
                    attrib[f"{{{NS['val']}}}{key}"] = str(get())
                except GLib.Error:
                    pass
        if "Action" in ifaces:
            for i in range(acc.get_n_actions()):
                name = clean(acc.get_action_name(i)).replace(" ", "-")
                if _XML_NAME.match(name):
                    attrib[f"{{{NS['act']}}}{name}_desc"] = clean(acc.get_action_description(i))
                    attrib[f"{{{NS['act']}}}{name}_kb"] = clean(acc.get_key_binding(i))
        role = re.sub(r"[^A-Za-z0-9_.-]", "-", (acc.get_role_name() or "").strip()) or "unknown"
        if role == "application" and attrib["name"] in APP_NAMES:
            attrib["name"] = APP_NAMES[attrib["name"]]
        el = ET.Element(role if role[0].isalpha() else "tag" + role, attrib)
        if text:
            el.text = text
        return el


def apps() -> list[Atspi.Accessible]:
    desktop = Atspi.get_desktop(0)
    out = []
    for i in range(desktop.get_child_count()):
        try:
            app = desktop.get_child_at_index(i)
        except GLib.Error:
            continue
        if app is not None:
            out.append(app)
    return out


def tree(max_nodes: int, max_depth: int, max_children: int, max_text: int, max_bytes: int, seconds: float) -> dict:
    w = Walker(max_nodes, max_depth, max_children, max_text, max_bytes, seconds)
    root = ET.Element("desktop-frame")
    for app in apps():
        try:
            el = w.node(app, 1)
        except AppGone as e:
            if "Timeout" in str(e) or "NoReply" in str(e):  # not one that just left
                w.truncated.add("app not answering")
            continue
        if el is None:
            break
        root.append(el)
    if w.truncated:
        root.set("truncated", ",".join(sorted(w.truncated)))
    for prefix, uri in NS.items():
        ET.register_namespace(prefix, uri)
    return {"AT": ET.tostring(root, encoding="unicode"), "nodes": w.nodes, "truncated": sorted(w.truncated)}


def terminal(seconds: float) -> dict:
    """The text of the terminal OSWorld's server would read (a focused terminal in the active
    window); else of a terminal of the active window; else of the only terminal there is."""
    deadline = time.monotonic() + seconds
    found: list[tuple[int, str]] = []  # (preference, text)
    for app in apps():
        try:
            for i in range(min(app.get_child_count(), 64)):
                frame = app.get_child_at_index(i)
                if frame is None:
                    continue
                active = frame.get_state_set().contains(Atspi.StateType.ACTIVE)
                todo, seen = [frame], 0
                while todo and seen < 2000 and time.monotonic() < deadline:
                    acc = todo.pop()
                    seen += 1
                    if acc.get_role() == Atspi.Role.TERMINAL:
                        focused = acc.get_state_set().contains(Atspi.StateType.FOCUSED)
                        text = acc.get_text(0, min(acc.get_character_count(), 1 << 20)) or ""
                        found.append((2 * active + focused, text.rstrip()))
                        continue
                    n = acc.get_child_count()
                    todo += [c for c in (acc.get_child_at_index(k) for k in range(min(n, 256))) if c is not None]
        except GLib.Error:
            continue
    if len(found) == 1:
        return {"text": found[0][1]}
    best = max(found, default=(0, ""), key=lambda f: f[0])
    return {"text": best[1] if best[0] >= 2 else None}  # several, none in the active window: which?


def main() -> None:
    Atspi.init()
    Atspi.set_timeout(CALL_TIMEOUT_MS, CALL_TIMEOUT_MS)
    what = sys.argv[1]
    if what == "tree":
        n, d, c, t, b = (int(a) for a in sys.argv[2:7])
        out = tree(n, d, c, t, b, float(sys.argv[7]))
    elif what == "terminal":
        out = terminal(float(sys.argv[2]))
    else:
        raise SystemExit(f"a11y: unknown request {what!r}")
    sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
