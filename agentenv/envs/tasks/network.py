"""Which tasks need the network while they run (pure: reads the task file only).

A task needs the network when a web page is opened live: setup opens it (``chrome_open_tabs``, a
browser or ``curl`` in a command, Google Drive, a login, a proxy), or a getter loads it when the task
is scored (OSWorld's ``info_from_website``, ``page_info``, ``pdf_from_url``...), or the agent must
visit it (a getter reads the browser's tabs and the evaluator names web URLs). Files a task
``download``s or a ``cloud_file`` getter reads are not live: the URL cache holds them
(``tasks fetch``), so they do not count here.

Sandboxed desktops have no network unless the operator allows it (``env.sandbox_network``); plain
desktops use the host's.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlparse

from agentenv.types import Task

# Setup types that always reach the network.
NETWORK_STEPS = {"googledrive": "Google Drive", "login": "a website login", "proxy": "an HTTP proxy"}
# Getters that load a web page themselves when the task is scored (desktop-env's chrome.py, calc.py).
LIVE_GETTERS = {"info_from_website", "page_info", "pdf_from_url", "number_of_search_results",
                "gotoRecreationPage_and_get_html_content", "googledrive_file", "conference_city_in_order"}
# Getters that read the browser's pages (over CDP or the accessibility tree): live when the pages are.
PAGE_GETTERS = {"active_tab_info", "active_tab_html_parse", "active_tab_url_parse", "open_tabs_info",
                "active_url_from_accessTree", "url_dashPart", "macys_product_url_parse", "url_path_parse",
                "find_installed_extension_name", "extensions_installed_from_shop", "chrome_saved_address"}
_URL = re.compile(r"""https?://[^\s'"<>\\]+""")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}


def is_live_url(url: Any) -> bool:
    """An http(s) URL of a host other than this machine's loopback."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        return False
    host = (urlparse(url).hostname or "").lower()
    return bool(host) and host not in LOCAL_HOSTS and not host.startswith("127.")


def _live_urls(value: Any) -> list[str]:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return [u for u in _URL.findall(text) if is_live_url(u)]


def _steps(steps: Any, where: str) -> list[str]:
    out: list[str] = []
    for s in steps if isinstance(steps, list) else []:
        if not isinstance(s, dict) or not isinstance(s.get("type"), str):
            continue
        kind, p = s["type"], s.get("parameters") if isinstance(s.get("parameters"), dict) else {}
        if kind in NETWORK_STEPS:
            out.append(f"{where}: {kind} ({NETWORK_STEPS[kind]})")
        elif kind == "chrome_open_tabs":
            urls = [u for u in p.get("urls_to_open") or [] if is_live_url(u)]
            if urls:
                out.append(f"{where}: chrome_open_tabs opens {urls[0]}" + (f" (+{len(urls) - 1})" if len(urls) > 1 else ""))
        elif kind in ("launch", "execute", "command"):
            urls = _live_urls(p.get("command"))
            if urls:
                out.append(f"{where}: a {kind} command reaches {urls[0]}")
    return out


def _getters(ev: dict) -> list[str]:
    out: list[str] = []
    specs: list[Any] = []
    for role in ("result", "expected"):
        v = ev.get(role)
        specs += v if isinstance(v, list) else [v]
    kinds = {s.get("type") for s in specs if isinstance(s, dict)}
    for k in sorted(k for k in kinds if isinstance(k, str) and k in LIVE_GETTERS):
        out.append(f"evaluator: getter {k} loads a web page")
    page = sorted(k for k in kinds if isinstance(k, str) and k in PAGE_GETTERS)
    if page:
        urls = _live_urls([ev.get("result"), ev.get("expected"), ev.get("options")])
        if urls:
            out.append(f"evaluator: getter {page[0]} reads the browser's pages, which should show {urls[0]}")
    return out


def needs_network(task: Task) -> list[str]:
    """Why ``task`` needs the network at run time (one line each); empty when it does not."""
    ev = task.evaluator if isinstance(task.evaluator, dict) else {}
    return _steps(task.config, "config") + _steps(ev.get("postconfig"), "evaluator.postconfig") + _getters(ev)


def desktop_has_network(desktop: Any) -> bool:
    """A plain desktop uses the host's network; a sandboxed one only with ``env.sandbox_network``."""
    if not getattr(desktop, "sandboxed", False):
        return True
    return bool(getattr(getattr(desktop, "spec", None), "network", False))
