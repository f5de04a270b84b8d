"""Loader quirks of real OSWorld folders, the download cache against a real local HTTP server, and
``agentenv tasks check|fetch`` on the sample tasks."""

from __future__ import annotations

import json

import pytest

from agentenv.cli import main as cli
from agentenv.envs.tasks.cache import DownloadCache, DownloadError, NotCached
from agentenv.envs.tasks.check import check_tasks, summarize
from agentenv.rollout.sources import BrokenTask, load_items
from agentenv.types import Task
from tests.tasks.conftest import write_json

TASK = {"id": "t1", "snapshot": "os", "instruction": "do it", "config": [],
        "evaluator": {"func": "exact_match", "result": {"type": "vm_command_line", "command": "echo hi", "shell": True},
                      "expected": {"type": "rule", "rules": {"expected": "hi\n"}}}}


def test_loader_quirks_never_crash(tmp_path, agentenv_home):
    root = tmp_path / "examples"
    (root / "os").mkdir(parents=True)
    # CRLF line endings and a BOM
    (root / "os" / "crlf.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({**TASK, "id": "crlf"}, indent=1)
                                            .replace("\n", "\r\n").encode())
    write_json(root / "os" / "draft.json", {**TASK, "id": "draft", "evaluator": {"func": "", "result": {}}})
    write_json(root / "os" / "shellstr.json", {**TASK, "id": "shellstr", "config": [
        {"type": "execute", "parameters": {"command": "echo x > /home/user/a", "shell": "true"}}]})
    write_json(root / "os" / "noconfig.json", {k: v for k, v in TASK.items() if k != "config"} | {"id": "noconfig"})
    write_json(root / "os" / "evstr.json", {**TASK, "id": "evstr", "evaluator": "see the paper"})
    # OSWorld's Windows twin shares the Linux task's id, in a deeper folder that sorts first
    write_json(root / "Windows" / "excel" / "twin.json", {**TASK, "id": "twin", "config": [
        {"type": "open", "parameters": {"path": "c:\\users\\x\\a.xlsx"}}]})
    write_json(root / "os" / "twin.json", {**TASK, "id": "twin"})
    write_json(tmp_path / "examples" / "test_all.json", {"os": ["t1"], "chrome": []})  # an index file

    items = load_items(str(root))
    by_id = {i.id: i for i in items}
    assert set(by_id) == {"crlf", "draft", "shellstr", "noconfig", "evstr", "twin", "twin~2"}
    assert isinstance(by_id["evstr"], BrokenTask) and "evaluator" in by_id["evstr"].reason
    assert by_id["twin"].source.endswith("os/twin.json")  # the Linux task keeps its id
    twin2 = by_id["twin~2"]
    assert isinstance(twin2, Task) and twin2.extra["original_id"] == "twin"
    assert twin2.extra["duplicate_of"].endswith("os/twin.json") and "Windows" in twin2.source
    assert load_items(str(root)) == items  # deterministic

    listed = check_tasks(root)
    reports = {r.id: r for r in listed}
    assert reports["crlf"].status == "runs" and reports["shellstr"].status == "runs"
    assert reports["noconfig"].status == "runs"
    assert reports["draft"].status == "missing" and "no 'func'" in reports["draft"].missing[0]
    assert reports["evstr"].status == "broken"
    assert reports["test_all"].status == "skipped"
    windows = [r for r in listed if "Windows" in r.file]
    assert len(windows) == 1 and windows[0].missing[0].startswith("Windows") and windows[0].status == "missing"
    assert windows[0].note.endswith("loaded as twin~2") and "os/twin.json" in windows[0].note
    assert summarize(listed)["duplicates"] == 1


def test_download_cache_fetches_once_and_offline_names_the_url(file_server, agentenv_home):
    url = f"{file_server.base}/sales.xlsx"
    cache = DownloadCache.from_config()
    assert str(cache.root).startswith(str(agentenv_home / "cache"))
    p = cache.get(url)
    assert p.read_bytes() == (file_server.root / "sales.xlsx").read_bytes()
    assert cache.get(url) == p and file_server.hits == ["/sales.xlsx"]  # the second one came from disk
    meta = json.loads(p.with_name(p.name + ".json").read_text())
    assert meta["url"] == url and meta["bytes"] == p.stat().st_size
    with pytest.raises(DownloadError, match="HTTP 404"):
        cache.get(f"{file_server.base}/absent.xlsx")
    assert not cache.cached(f"{file_server.base}/absent.xlsx")  # no partial file left
    offline = DownloadCache(cache.root, offline=True)
    assert offline.get(url) == p
    with pytest.raises(NotCached, match=f"{file_server.base}/notes.txt"):
        offline.get(f"{file_server.base}/notes.txt")
    small = DownloadCache(cache.root, max_bytes=10)
    with pytest.raises(DownloadError, match="over the limit"):
        small.get(f"{file_server.base}/sales_gold.xlsx")


def test_tasks_check_and_fetch_on_the_samples(samples, file_server, agentenv_home, capsys, monkeypatch, tmp_path):
    from agentenv.envs import sandbox_vm

    if sandbox_vm.code_server_installed():  # installed here (scripts/install.sh): sandboxed desktops only
        with_code = {r.id: r for r in check_tasks(samples, osworld_like=True)}
        assert with_code["e5f2c8d3-font-size"].status == "runs" and with_code["c3d9a1f4-greeting-edit"].status == "runs"
        plain = {r.id: r for r in check_tasks(samples, osworld_like=False)}
        assert "app: code" in {m.split(" (")[0] for m in plain["c3d9a1f4-greeting-edit"].missing}
    monkeypatch.setattr(sandbox_vm, "CODE_SERVER", tmp_path / "no-code-server")  # a machine without VS Code
    assert cli(["tasks", "check", str(samples), "--quiet"]) == 0
    before = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert before["tasks"] == 14 and before["runs"] == 5 and before["needs_fetch"] == 7 and before["missing"] == 2
    reports = {r.id: r for r in check_tasks(samples)}
    assert [m for m in reports["e5f2c8d3-font-size"].missing if m.startswith("app: ")] == ["app: code"]
    assert reports["c3d9a1f4-greeting-edit"].missing == ["app: code"]  # launched and read by vscode_config: one line
    assert reports["a7c4d1e9-title-case"].status == "needs_fetch"  # LibreOffice Writer is installed

    monkeypatch.setenv("AGENTENV_OFFLINE", "1")
    assert cli(["tasks", "fetch", str(samples)]) == 2  # offline: nothing can be fetched
    capsys.readouterr()
    monkeypatch.delenv("AGENTENV_OFFLINE")
    assert cli(["tasks", "fetch", str(samples)]) == 0
    fetched = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fetched["urls"] == 11 and fetched["fetched"] == 11 and not fetched["failed"]
    assert cli(["tasks", "check", str(samples), "--quiet", "--offline"]) == 0
    after = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert after["runs"] == 12 and after["needs_fetch"] == 0 and after["missing"] == 2


def test_tasks_check_never_crashes_on_odd_task_files(tmp_path, agentenv_home):
    """hypothesis: task files of any shape (the fuzz harness's, and OSWorld-shaped ones with steps and
    evaluators of every kind and wrong types) give a report per file, never an exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.fuzz import harness as h

    any_json = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.lists(st.text(max_size=5), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    step = st.fixed_dictionaries({"type": st.sampled_from(["download", "open", "execute", "command", "launch", "sleep",
                                                           "activate_window", "chrome_open_tabs", "googledrive", "x", 5]),
                                  "parameters": st.one_of(any_json, st.fixed_dictionaries({
                                      "command": any_json, "shell": any_json, "files": any_json, "path": any_json,
                                      "urls_to_open": any_json}))})
    getter = st.one_of(any_json, st.fixed_dictionaries({"type": st.sampled_from(
        ["vm_file", "cloud_file", "rule", "vm_command_line", "accessibility_tree", "nope", None]),
        "path": any_json, "rules": any_json, "command": any_json}))
    evaluator = st.one_of(any_json, st.fixed_dictionaries({
        "func": st.one_of(any_json, st.sampled_from(["compare_table", "infeasible", "exact_match", "", "compare_pptx_files"]),
                          st.lists(st.sampled_from(["exact_match", "x"]), max_size=3)),
        "result": st.one_of(getter, st.lists(getter, max_size=3)), "expected": st.one_of(getter, st.lists(getter, max_size=3)),
        "postconfig": st.one_of(any_json, st.lists(step, max_size=3)), "conj": any_json}))
    osworld_like = st.fixed_dictionaries({"id": st.text(min_size=1, max_size=6), "instruction": st.just("do"),
                                          "snapshot": st.just("os"), "config": st.lists(step, max_size=4),
                                          "evaluator": evaluator, "related_apps": st.lists(any_json, max_size=2)})
    files = st.one_of(h.task_file_bytes, osworld_like.map(lambda d: json.dumps(d).encode()))
    folder = tmp_path / "odd"
    folder.mkdir()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(files)
    def run(data: bytes):
        (folder / "t.json").write_bytes(data)
        reports = check_tasks(folder)
        assert reports and all(r.status in ("runs", "needs_fetch", "needs_network", "missing", "broken", "skipped")
                               for r in reports)
        assert not any(m.startswith("check failed") for r in reports for m in r.missing), reports

    run()


def test_what_only_an_osworld_like_desktop_has_is_missing_on_a_plain_one(tmp_path, agentenv_home):
    write_json(tmp_path / "os" / "gnome.json", {**TASK, "id": "gnome", "config": [
        {"type": "execute", "parameters": {"command": "gsettings set org.gnome.desktop.interface text-scaling-factor 1.5",
                                           "shell": True}},
        {"type": "execute", "parameters": {"command": ["python", "-c",
                                                       "import pyautogui; pyautogui.hotkey('ctrl', 'alt', 't')"]}}]})
    write_json(tmp_path / "os" / "etc.json", {**TASK, "id": "etc", "evaluator": {
        "func": "compare_text_file", "result": {"type": "vm_file", "path": "/etc/hosts", "dest": "hosts"},
        "expected": {"type": "vm_file", "path": "/home/user/hosts", "dest": "h2"}}})
    write_json(tmp_path / "os" / "apt.json", {**TASK, "id": "apt", "config": [
        {"type": "execute", "parameters": {"command": "echo password | sudo -S apt-get install -y unzip && "
                                                      "sudo -S systemctl restart cron", "shell": True}}]})
    write_json(tmp_path / "os" / "a11y.json", {**TASK, "id": "a11y", "evaluator": {
        "func": "check_accessibility_tree", "result": {"type": "accessibility_tree"},
        "expected": {"type": "rule", "rules": [{"selectors": ["application[name=mousepad]"]}]}}})
    plain = {r.id: r for r in check_tasks(tmp_path)}
    assert plain["gnome"].status == "missing" and plain["etc"].status == "missing"
    assert plain["a11y"].missing == ["OSWorld-like desktop: an AT-SPI accessibility tree (sandboxed desktops)"]
    assert any("GNOME settings" in m for m in plain["gnome"].missing)
    assert any("Ctrl+Alt+T" in m for m in plain["gnome"].missing)
    assert plain["etc"].missing == ["OSWorld-like desktop: a file outside HOME (/etc/hosts)"]
    sandboxed = {r.id: r for r in check_tasks(tmp_path, osworld_like=True)}
    assert [sandboxed[t].status for t in ("gnome", "etc", "a11y")] == ["runs"] * 3, sandboxed
    for kind in (plain, sandboxed):  # what no desktop of ours has
        assert kind["apt"].status == "missing"
        assert sum(m.startswith(("systemd", "installing packages")) for m in kind["apt"].missing) == 2


def test_a_run_names_the_tasks_that_miss_something_before_it_starts(samples, agentenv_home, monkeypatch, tmp_path):
    from loguru import logger

    from agentenv.envs import sandbox_vm

    monkeypatch.setattr(sandbox_vm, "CODE_SERVER", tmp_path / "no-code-server")  # a machine without VS Code

    from agentenv.config import TaskConfig
    from agentenv.preflight import check_tasks as preflight

    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(str(m)), level="WARNING")
    try:
        items = preflight(TaskConfig(source=str(samples)))
    finally:
        logger.remove(sink)
    assert len(items) == 14
    warning = next(m for m in seen if "miss something" in m)
    assert "2 of 14 tasks" in warning and "e5f2c8d3-font-size: app: code" in warning and "lowriter" not in warning
