"""desktop-env's setup rules as pure logic: placeholders in `execute` commands, `until` conditions,
and the retry loop's bounds (a fake desktop whose runs fail or answer as told)."""

from __future__ import annotations

import subprocess

import pytest

from agentenv.envs.tasks import commands, setup
from agentenv.types import Task


def test_placeholders_in_strings_and_lists():
    assert commands.substitute("echo {CLIENT_PASSWORD} | sudo -S x {SCREEN_WIDTH}x{SCREEN_HEIGHT}", 1920, 1080) == \
        "echo password | sudo -S x 1920x1080"
    assert commands.substitute(["a", "{SCREEN_WIDTH_HALF},{SCREEN_HEIGHT_HALF}", 3], 1281, 801) == ["a", "640,400", 3]
    assert commands.substitute(None, 1, 1) is None


def proc(rc: int, out: str = "", err: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], rc, out, err)


@pytest.mark.parametrize("until,r,met", [
    ({"returncode": 0, "stdout": "ready"}, proc(1, "ready"), True),   # any one holds
    ({"returncode": 0, "stdout": "ready"}, proc(0, ""), True),
    ({"returncode": 0, "stdout": "ready"}, proc(1, "wait"), False),
    ({"stderr": "done"}, proc(3, "", "all done\n"), True),
    ({"stderr": "done"}, proc(0, "done"), False),
])
def test_until_any_condition(until, r, met):
    assert setup._until_met(until, r) is met


class FakeDesktop:
    """Runs fail (a program not found) or answer with the next result given."""

    width, height, osworld_like = 1920, 1080, True

    def __init__(self, results):
        self.results, self.runs = list(results), 0

    def run(self, argv, timeout=60.0, shell=False):
        self.runs += 1
        r = self.results.pop(0) if self.results else FileNotFoundError("no such program")
        if isinstance(r, Exception):
            raise r
        return r


def test_failed_runs_end_the_loop_after_five_and_setup_goes_on(monkeypatch):
    monkeypatch.setattr(setup, "UNTIL_PAUSE_S", 0)
    task = Task(id="t", instruction="-")
    d = FakeDesktop([])
    assert setup._run_until(d, task, ["x"], False, 5, {"returncode": 0}) is None and d.runs == 5
    d = FakeDesktop([])
    assert setup._run_until(d, task, ["x"], False, 5, {}) is None and d.runs == 1  # no until: one run
    d = FakeDesktop([subprocess.TimeoutExpired("x", 5), proc(1), proc(0)])
    assert setup._run_until(d, task, ["x"], False, 5, {"returncode": 0}).returncode == 0 and d.runs == 3
