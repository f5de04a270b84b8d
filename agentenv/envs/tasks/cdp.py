"""Chrome's DevTools protocol (CDP) on a desktop, reached from inside the desktop's own network.

OSWorld's tasks start ``google-chrome --remote-debugging-port=1337`` (plus a ``socat`` forward to
9222) and its setup steps and getters connect with Playwright's ``connect_over_cdp`` from outside
the VM. Here the port stays inside the sandbox: a sandboxed desktop has its own network namespace,
so nothing outside it (the host, another desktop) can reach the port. To reach it, the caller's
function runs in a fresh thread that first enters the desktop's network namespace (``setns``): its
sockets, and the Playwright driver it spawns, live there. The thread ends when the function
returns, so no thread of the service is ever left in a desktop's network.

A sandbox that shares the host's network (``env.sandbox_network``) has no namespace of its own:
the function then runs in the host's, where the port is the host's loopback port, open to the host
and to the other desktops sharing it; it runs only once a process of this desktop listens on the
port (not another desktop's Chrome).
A plain (unsandboxed) desktop has no namespace of its own either, and is refused: its port would
be every local user's.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import Counter
from typing import Any, Callable

from loguru import logger

from agentenv.envs.tasks import osworld_lib

CDP_PORT = 1337                     # the port OSWorld's tasks give --remote-debugging-port
CDP_URL = f"http://127.0.0.1:{CDP_PORT}"
CLONE_NEWNET = 0x40000000
# How long setup waits for the launched Chrome's port (OSWorld's setup: 15 tries, 5 s apart).
CONNECT_WAIT_S = 60.0
SHARED_OWNER_WAIT_S = 20.0  # on a shared network: how long to wait for this desktop's Chrome to listen


class CdpError(RuntimeError):
    """Chrome's DevTools port could not be reached or used on a desktop; the message says why."""


def _netns_path(desktop: Any) -> str | None:
    """The network namespace of the desktop's processes, or None when they share ours. Chromium's
    own sandbox puts its zygote and renderers in namespaces of their own: the desktop's is the one
    most of its processes are in."""
    if not getattr(desktop, "sandboxed", False):
        raise CdpError("Chrome's DevTools port needs a sandboxed desktop (its own network namespace): "
                       "on a plain desktop it would be open to every local user")
    seen: dict[str, str] = {}
    count: Counter[str] = Counter()
    for pid in desktop.pids():
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        seen.setdefault(link, f"/proc/{pid}/ns/net")
        count[link] += 1
    if not count:
        raise CdpError(f"desktop {getattr(desktop, 'id', '?')} has no running process (is it closed?)")
    ns = count.most_common(1)[0][0]
    return None if ns == os.readlink("/proc/self/ns/net") else seen[ns]


def _listening_inodes(port: int) -> set[str]:
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            col = line.split()
            if len(col) > 9 and col[3] == "0A" and int(col[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                out.add(col[9])
    return out


def check_port_owner(desktop: Any) -> None:
    """On a network shared with the host (env.sandbox_network) the port may be another desktop's
    Chrome: refuse unless a process of this desktop listens on it."""
    want = {f"socket:[{i}]" for i in _listening_inodes(CDP_PORT)}
    for pid in desktop.pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in want:
                    return
            except OSError:
                continue
    raise CdpError(f"port {CDP_PORT} on the network this desktop shares with the host (env.sandbox_network) "
                   "is not its own Chrome's (another desktop's, or none)")


def _wait_port_owner(desktop: Any, deadline: float) -> None:
    while True:
        try:
            return check_port_owner(desktop)
        except CdpError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _enter(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise CdpError(f"cannot enter the desktop's network namespace ({os.strerror(err)}): "
                           "the env service must run as root to reach Chrome inside a sandbox")
    finally:
        os.close(fd)


def in_desktop_network(desktop: Any, fn: Callable[[], Any], timeout: float = 180.0) -> Any:
    """``fn()`` run in a new thread inside the desktop's network namespace; its result or its error.

    OSWorld's getters retry with sleeps of their own (up to about a minute); ``timeout`` bounds the
    wait. A thread past it is left to finish on its own (Playwright's calls end on their timeouts)
    and its result is dropped."""
    path = _netns_path(desktop)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            if path is not None:
                _enter(path)
            else:
                _wait_port_owner(desktop, time.monotonic() + SHARED_OWNER_WAIT_S)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name=f"cdp-{getattr(desktop, 'id', '?')}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise CdpError(f"Chrome's DevTools protocol: no answer in {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _connect(p: Any, deadline: float) -> Any:
    """connect_over_cdp, retried until ``deadline``: Chrome may still be starting."""
    last: Exception | None = None
    while True:
        try:
            return p.chromium.connect_over_cdp(CDP_URL, timeout=10_000)
        except Exception as e:  # playwright's Error: nothing listens yet
            last = e
        if time.monotonic() > deadline:
            raise CdpError(f"no Chrome answers on port {CDP_PORT} inside the desktop "
                           f"(a setup step must launch google-chrome --remote-debugging-port={CDP_PORT}): {last}")
        time.sleep(0.5)


def _open_tabs(urls: list[str], wait_s: float) -> None:
    from playwright.sync_api import Error as PlaywrightError, sync_playwright

    with sync_playwright() as p:
        browser = _connect(p, time.monotonic() + wait_s)
        if not browser.contexts:
            raise CdpError("Chrome has no browser context to open tabs in")
        context = browser.contexts[0]
        for i, url in enumerate(urls):
            page = context.new_page()
            try:
                page.goto(url, timeout=60_000)
            except PlaywrightError as e:  # OSWorld logs a page that does not load and goes on
                logger.warning("chrome_open_tabs: {} did not load: {}", url, str(e).splitlines()[0])
            if i == 0 and len(context.pages) > 1:
                context.pages[0].close()  # the start page, as OSWorld's setup closes it


def _close_tabs(urls: list[str], wait_s: float) -> None:
    from playwright.sync_api import sync_playwright

    compare_urls = osworld_lib.utils_function("compare_urls")  # OSWorld's own URL comparison

    with sync_playwright() as p:
        browser = _connect(p, time.monotonic() + wait_s)
        if not browser.contexts:
            return
        context = browser.contexts[0]
        for url in urls:
            for page in list(context.pages):
                if compare_urls(page.url, url):
                    page.close()
                    break


def open_tabs(desktop: Any, urls: list[str]) -> None:
    """OSWorld's ``chrome_open_tabs``: each URL in a new tab of the running Chrome; the start tab closed."""
    wait_s = CONNECT_WAIT_S
    in_desktop_network(desktop, lambda: _open_tabs(urls, wait_s), timeout=wait_s + 60.0 * len(urls) + 30)


def close_tabs(desktop: Any, urls: list[str]) -> None:
    """OSWorld's ``chrome_close_tabs``: the first tab showing each URL closed."""
    wait_s = CONNECT_WAIT_S
    in_desktop_network(desktop, lambda: _close_tabs(urls, wait_s), timeout=wait_s + 30)
