"""Fuzzing (issue 16, section 2) with hypothesis: the pyautogui allow-list, the UI-TARS reply ->
action path, the task-JSON loader, and the env service's request bodies and paths including the
OSWorld in-VM routes (over real HTTP, against a real desktop). A few thousand inputs here;
scripts/bench_faults.py runs 100,000+ per target. No input makes the allow-list run code outside
it, crashes, hangs a request past its timeout, or reaches a file outside the desktop's HOME; every
refusal says why (see tests/fuzz/harness.py for the checks).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import ENV_PORT
from tests.fuzz import harness as h

# The suite's share of each campaign, enough to catch a regression on every path; the 100,000-input
# campaigns are scripts/bench_faults.py's (docs/reliability.md).
FAST = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])


def _assert_clean(tally: h.Tally) -> None:
    assert tally.bad == 0, f"{tally.counts}: {tally.examples}"


def test_the_allowlist_runs_nothing_outside_it():
    tally = h.Tally()

    @settings(FAST, max_examples=1000)
    @given(h.pyautogui_code)
    def run(code):
        h.check_allowlist(code, tally)

    run()
    _assert_clean(tally)
    assert tally.counts["ok"] > 15 and tally.counts["refused"] > 300, tally.counts  # both paths exercised


def test_a_uitars_reply_becomes_an_action_on_screen_or_a_reason():
    tally = h.Tally()

    @settings(FAST, max_examples=1000)
    @given(h.uitars_reply, h.screens)
    def run(text, screen):
        h.check_reply(text, screen, tally)

    run()
    _assert_clean(tally)
    assert tally.counts["ok"] > 15 and tally.counts["refused"] > 150, tally.counts


def test_the_task_loader_returns_tasks_or_a_reason_naming_the_file(tmp_path):
    tally = h.Tally()
    path = tmp_path / "task.json"

    @settings(FAST, max_examples=500)
    @given(h.task_file_bytes)
    def run(data):
        h.check_task_file(path, data, tally)

    run()
    _assert_clean(tally)
    assert tally.counts["ok"] > 10 and tally.counts["refused"] > 75, tally.counts


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory):
    """An env service of its own (one desktop) and files outside that desktop's HOME: a root-only
    canary and upload targets, with symlinks the desktop user planted in HOME pointing at them."""
    from agentenv.services import EnvService

    svc = EnvService(num=1, port=ENV_PORT + 30, log=tmp_path_factory.mktemp("fuzz") / "env.log").start()
    http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.token}"})
    did = http.get("/envs").json()[0]["id"]
    outside = h.plant_outside(http, did)
    yield svc, http, did, outside
    http.close()
    svc.stop()
    h.remove_outside(outside)


def test_the_env_service_refuses_hostile_requests_with_reasons(fuzz_service):
    svc, http, did, outside = fuzz_service
    tally = h.Tally()
    sent: list[h.Req] = []

    @settings(FAST, max_examples=1000)
    @given(h.requests(did, outside))
    def run(req):
        sent.append(req)
        h.check_request(http, req, outside, tally, timeout=60)

    run()
    _assert_clean(tally)
    # the same requests again, 8 at a time: a reset must never swap HOME under another route
    lock, together = threading.Lock(), h.Tally()
    clients = threading.local()

    def one(req: h.Req) -> None:
        if not hasattr(clients, "http"):
            clients.http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.token}"})
        mine = h.Tally()
        outcome = h.check_request(clients.http, req, outside, mine, timeout=60)
        with lock:
            together.add(outcome, mine.examples)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(one, sent[:400]))
    _assert_clean(together)
    assert http.get(f"/envs/{did}/alive").json()["alive"], "the fuzz killed the desktop"
    assert tally.counts["ok"] > 40 and tally.counts["refused"] > 200, tally.counts


def test_oversized_bodies_and_endless_output_are_refused(fuzz_service):
    svc, http, did, outside = fuzz_service
    big = b"x" * (64 * 2**20 + 1)
    r = http.post(f"/envs/{did}/step", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max-body-bytes" in r.json()["detail"]

    def chunks():
        for _ in range(65):
            yield b"x" * 2**20

    r = http.post(f"/envs/{did}/step", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    r = http.post(f"/envs/{did}/step", json={"action": {"type": "wait", "seconds": 0}, "image_size": [20000, 20000]})
    assert r.status_code == 413 and "max-image-pixels" in r.json()["detail"]
    r = http.post(f"/envs/{did}/execute", json={"command": "cat /dev/zero", "shell": True, "timeout": 30})
    out = r.json()
    assert r.status_code == 200 and len(out["output"]) < 2 * 2**20 and "output cut" in out["output"]
    r = http.post(f"/envs/{did}/step", json={"action": {"type": "pyautogui",
                                                         "code": "import pyautogui\npyautogui.press('a', presses=1000000)"}})
    assert r.status_code == 422 and "presses" in r.json()["detail"]
    assert http.get(f"/envs/{did}/alive").json()["alive"]
