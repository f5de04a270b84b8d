"""needs_network on OSWorld-format task files (pure): live web pages at run time, not downloads the
URL cache holds. And the DevTools port is never reached on a desktop without its own network."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from agentenv.envs.tasks import cdp
from agentenv.envs.tasks.network import desktop_has_network, is_live_url, needs_network
from agentenv.types import Task

CHROME_LAUNCH = [
    {"type": "launch", "parameters": {"command": ["google-chrome", "--remote-debugging-port=1337"]}},
    {"type": "launch", "parameters": {"command": ["socat", "tcp-listen:9222,fork", "tcp:localhost:1337"]}},
]


def task(config=(), evaluator=None) -> Task:
    return Task(id="t", instruction="do", config=list(config), evaluator=evaluator or {"func": "infeasible"},
                extra={"snapshot": "chrome"})


def test_live_urls():
    assert is_live_url("https://www.example.org/a?b=1") and is_live_url("http://10.1.2.3/")
    for url in ("file:///home/user/a.html", "http://localhost:8000/", "http://127.0.0.1:9222/json",
                "chrome://settings", "about:blank", "", None, 5, "https:///nohost"):
        assert not is_live_url(url), url


def test_tabs_opened_on_live_pages_need_it_local_pages_do_not():
    live = task(CHROME_LAUNCH + [{"type": "chrome_open_tabs",
                                  "parameters": {"urls_to_open": ["https://www.example.org/", "https://b.example/"]}}])
    [why] = needs_network(live)
    assert "chrome_open_tabs opens https://www.example.org/ (+1)" in why
    local = task(CHROME_LAUNCH + [{"type": "chrome_open_tabs",
                                   "parameters": {"urls_to_open": ["file:///home/user/a.html", "chrome://settings"]}}])
    assert needs_network(local) == []


def test_downloads_and_cloud_files_are_the_caches_not_the_networks():
    t = task([{"type": "download", "parameters": {"files": [{"url": "https://huggingface.example/x.xlsx",
                                                             "path": "/home/user/x.xlsx"}]}},
              {"type": "open", "parameters": {"path": "/home/user/x.xlsx"}}],
             {"func": "compare_table", "result": {"type": "vm_file", "path": "/home/user/x.xlsx", "dest": "x.xlsx"},
              "expected": {"type": "cloud_file", "path": "https://huggingface.example/gold.xlsx", "dest": "g.xlsx"}})
    assert needs_network(t) == []


def test_commands_that_reach_a_live_url():
    browser = task([{"type": "launch", "parameters": {"command": ["google-chrome", "https://www.example.org/"]}}])
    assert needs_network(browser) == ["config: a launch command reaches https://www.example.org/"]
    curl = task([{"type": "execute", "parameters": {"command": "curl -sL https://example.org/i.sh | bash",
                                                    "shell": True}}])
    assert needs_network(curl) == ["config: a execute command reaches https://example.org/i.sh"]
    local = task([{"type": "execute", "parameters": {"command": ["curl", "http://localhost:5000/x"]}}])
    assert needs_network(local) == []


def test_setup_types_and_getters_that_always_go_online():
    t = task([{"type": "login", "parameters": {}}, {"type": "googledrive", "parameters": {}}],
             {"func": "compare_pdfs", "result": {"type": "pdf_from_url", "path": "https://x.example/p", "dest": "p.pdf"},
              "expected": {"type": "info_from_website", "url": "https://x.example"}})
    why = needs_network(t)
    assert why[:2] == ["config: login (a website login)", "config: googledrive (Google Drive)"]
    assert "evaluator: getter info_from_website loads a web page" in why
    assert "evaluator: getter pdf_from_url loads a web page" in why


def test_page_getters_are_live_when_the_evaluator_names_web_pages():
    ev = {"func": "is_expected_active_tab", "result": {"type": "active_url_from_accessTree", "goto_prefix": "https://"},
          "expected": {"type": "rule", "rules": {"type": "url", "url": "https://www.example.org/flights"}}}
    assert needs_network(task(CHROME_LAUNCH, ev)) == [
        "evaluator: getter active_url_from_accessTree reads the browser's pages, which should show "
        "https://www.example.org/flights"]
    local = {"func": "is_expected_tabs", "result": {"type": "open_tabs_info"},
             "expected": {"type": "rule", "rules": {"type": "url", "urls": ["file:///home/user/a.html"]}}}
    assert needs_network(task(CHROME_LAUNCH, local)) == []
    postconfig = {"func": "infeasible", "postconfig": [{"type": "chrome_open_tabs",
                                                        "parameters": {"urls_to_open": ["https://x.example/"]}}]}
    assert needs_network(task([], postconfig)) == ["evaluator.postconfig: chrome_open_tabs opens https://x.example/"]


def test_odd_shapes_never_raise():
    for config in ([None, 5, {"type": 3}, {"type": "chrome_open_tabs", "parameters": "x"},
                    {"type": "chrome_open_tabs", "parameters": {"urls_to_open": "https://x.example"}}], "x"):
        assert needs_network(Task(id="t", instruction="x", config=config, evaluator={"result": [None, 1]})) == []


@dataclass
class _Spec:
    network: bool = False


@dataclass
class _Desktop:
    sandboxed: bool
    spec: _Spec = field(default_factory=_Spec)
    id: str = "d"

    def pids(self) -> list[int]:
        return []


def test_who_has_the_network_and_who_may_reach_a_devtools_port():
    assert desktop_has_network(_Desktop(sandboxed=False))  # a plain desktop uses the host's
    assert not desktop_has_network(_Desktop(sandboxed=True))
    assert desktop_has_network(_Desktop(sandboxed=True, spec=_Spec(network=True)))
    with pytest.raises(cdp.CdpError, match="sandboxed desktop"):
        cdp.in_desktop_network(_Desktop(sandboxed=False), lambda: None)
    with pytest.raises(cdp.CdpError, match="no running process"):
        cdp.in_desktop_network(_Desktop(sandboxed=True), lambda: None)


def test_on_a_shared_network_only_the_desktops_own_listener_counts(monkeypatch):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setattr(cdp, "CDP_PORT", s.getsockname()[1])
        mine = _Desktop(sandboxed=True)
        mine.pids = lambda: [os.getpid()]  # this process listens: the port is the desktop's own
        cdp.check_port_owner(mine)
        other = _Desktop(sandboxed=True)
        other.pids = lambda: [1]  # init holds no such socket: another desktop's, or nobody's
        with pytest.raises(cdp.CdpError, match="not its own Chrome"):
            cdp.check_port_owner(other)


def test_tasks_check_classes_a_task_that_only_needs_live_pages_as_needs_network(tmp_path):
    """`needs_network` when live web pages are all it lacks (the operator's --sandbox-network runs it);
    `missing` as soon as anything else is missing too; and `runs` once the network is allowed."""
    from agentenv.envs.tasks.check import check_tasks, summarize

    chrome = tmp_path / "chrome"
    chrome.mkdir()
    tabs = {"type": "chrome_open_tabs", "parameters": {"urls_to_open": ["https://www.example.org/"]}}
    launch = {"type": "launch", "parameters": {"command": ["google-chrome", "--remote-debugging-port=1337"]}}
    (chrome / "live.json").write_text(json.dumps({"id": "live", "instruction": "x", "snapshot": "chrome",
                                                 "config": [launch, tabs], "evaluator": {"func": "infeasible"}}))
    (chrome / "live-and-app.json").write_text(json.dumps({
        "id": "live-and-app", "instruction": "x", "snapshot": "chrome", "config": [
            launch, tabs, {"type": "launch", "parameters": {"command": ["no-such-program-here"]}}],
        "evaluator": {"func": "infeasible"}}))
    by_id = {r.id: r for r in check_tasks(tmp_path, osworld_like=True)}
    assert by_id["live"].status == "needs_network" and by_id["live"].missing[0].startswith("network: ")
    assert by_id["live-and-app"].status == "missing"
    assert summarize(list(by_id.values()))["needs_network"] == 1
    assert {r.id: r.status for r in check_tasks(tmp_path, osworld_like=True, network=True)} == {
        "live": "runs", "live-and-app": "missing"}
