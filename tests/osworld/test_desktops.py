"""Real X desktops behind the env service: tasks, isolation, security, the pool, gymnasium."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from agentenv.envs.client import AsyncEnvClient, DesktopEnv, EnvDeadError, EnvRequestError
from agentenv.config import ServiceConfig
from agentenv.envs.pool import EnvPool
from agentenv.envs.tasks import builtin_tasks
from agentenv.types import Action, Task

pytestmark = pytest.mark.slow


def auth(env_service) -> dict:
    return {"Authorization": f"Bearer {env_service.token}"}


async def _oracle_and_noop(pool: EnvPool, task: Task) -> tuple[float, float]:
    async with pool.lease() as env:
        await env.reset(task)
        last = None
        for a in task.oracle:
            _, info, _ = await env.step(Action.from_dict(a))
            assert "error" not in info, (task.id, a, info)
            last = a["type"]
        solved = await env.evaluate(task, last)
        await env.reset(task)
        idle = await env.evaluate(task, None)
    return solved, idle


async def test_every_builtin_task_oracle_scores_1_and_noop_0(env_service):
    tasks = builtin_tasks()
    assert len(tasks) >= 24
    apps = {a for t in tasks for a in t.related_apps}
    assert len(apps) >= 5
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    try:
        results = await asyncio.gather(*[_oracle_and_noop(pool, t) for t in tasks])
    finally:
        await pool.aclose()
    scores = {t.id: r for t, r in zip(tasks, results)}
    assert {k: v for k, v in scores.items() if v != (1.0, 0.0)} == {}


async def test_state_does_not_leak_between_tasks(env_service):
    client = AsyncEnvClient(env_service.url, env_service.token)
    try:
        env_id = (await client.list())[0].id
        make = Task(id="make", instruction="-", config=[
            {"type": "execute", "parameters": {"command": "echo secret > ~/leak.txt", "shell": True}},
            {"type": "launch", "parameters": {"command": ["editor"]}}])
        check = Task(id="check", instruction="-", evaluator={
            "func": "is_true", "result": {"type": "file_exists", "path": "~/leak.txt"},
            "expected": {"type": "literal", "value": True}})
        await client.reset(env_id, make)
        assert await client.evaluate(env_id, check) == 1.0
        envs = {e.id: e for e in await client.list()}
        assert envs[env_id].task == "make"
        await client.reset(env_id, Task(id="next", instruction="-"))
        assert await client.evaluate(env_id, check) == 0.0
        titles = Task(id="t", instruction="-", evaluator={
            "func": "exact_match", "result": {"type": "window_titles"}, "expected": {"type": "literal", "value": ""}})
        assert await client.evaluate(env_id, titles) == 1.0  # the editor from the last task is gone
    finally:
        await client.aclose()


async def test_a_window_manager_menu_does_not_outlive_its_task(env_service):
    """A right click on the empty desktop opens the window manager's menu, which is no app's window:
    the next reset must close it (it took the next task's first clicks and keys) and put the
    pointer back where a new X server has it."""
    client = AsyncEnvClient(env_service.url, env_service.token)
    try:
        env_id = (await client.list())[0].id
        empty = Task(id="empty", instruction="-")

        async def colours() -> int:
            img = Image.open(io.BytesIO(await client.screenshot(env_id))).convert("RGB")
            return len(img.getcolors(1 << 16) or [])

        await client.reset(env_id, empty)
        assert await colours() == 1  # nothing open: one colour
        await client.step(env_id, Action("right_click", x=200, y=200))
        assert await colours() > 1, "the right click should have opened the window manager's menu"
        await client.reset(env_id, empty)
        assert await colours() == 1, "the menu outlived the reset"
        pointed = Task(id="p", instruction="-", evaluator={
            "func": "exact_match", "result": {"type": "vm_command_line",
                                              "command": "xdotool getmouselocation --shell | head -2 | tr '\\n' ' '"},
            "expected": {"type": "literal", "value": "X=960 Y=540 "}})
        assert await client.evaluate(env_id, pointed) == 1.0
    finally:
        await client.aclose()


def _ocr(png: bytes) -> str:
    img = Image.open(io.BytesIO(png)).convert("L").crop((0, 40, 1200, 200))
    img = img.resize((img.width * 2, img.height * 2))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    r = subprocess.run(["tesseract", "stdin", "stdout", "--psm", "6"], input=buf.getvalue(), capture_output=True)
    return r.stdout.decode(errors="replace")


async def test_four_desktops_side_by_side_each_shows_its_own_text(env_service):
    client = AsyncEnvClient(env_service.url, env_service.token)
    words = ["ALPHA", "BRAVO", "CHARLIE", "DELTA"]
    try:
        ids = [e.id for e in await client.list()][:4]
        assert len(ids) == 4
        task = Task(id="edit", instruction="-", config=[{"type": "launch", "parameters": {"command": ["editor"]}}])
        await asyncio.gather(*[client.reset(i, task) for i in ids])
        await asyncio.gather(*[client.step(i, Action("type", text=f"{w} {w} {w}")) for i, w in zip(ids, words)])
        shots = await asyncio.gather(*[client.screenshot(i) for i in ids])
    finally:
        await client.aclose()
    for w, png in zip(words, shots):
        text = _ocr(png)
        assert w in text, (w, text)
        assert not any(o in text for o in words if o != w), (w, text)


def test_service_requires_token(env_service):
    assert httpx.get(env_service.url + "/envs").status_code == 401
    assert httpx.get(env_service.url + "/envs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(env_service.url + "/metrics").status_code == 401
    assert httpx.get(env_service.url + "/health").status_code == 200  # liveness stays open
    m = httpx.get(env_service.url + "/metrics", headers=auth(env_service))
    assert m.status_code == 200 and "agentenv_env_desktops" in m.text


def test_malformed_bodies_get_4xx_with_message(env_service):
    h = auth(env_service)
    env_id = httpx.get(env_service.url + "/envs", headers=h).json()[0]["id"]
    base = f"{env_service.url}/envs/{env_id}"
    r = httpx.post(base + "/step", headers=h, content=b"{not json")
    assert r.status_code == 422 and r.json()["detail"]
    r = httpx.post(base + "/step", headers=h, json={"action": {"type": "teleport"}})
    assert r.status_code == 422 and "teleport" in r.json()["detail"]
    r = httpx.post(base + "/reset", headers=h, json={"task": {"instruction": "no id"}})
    assert r.status_code == 422 and "id" in r.json()["detail"]
    r = httpx.post(base + "/reset", headers=h, json={"task": {"id": "x", "instruction": "y",
                                                               "config": [{"type": "download", "parameters": {}}]}})
    assert r.status_code == 422 and "download" in r.json()["detail"] and "config[0]" in r.json()["detail"]
    r = httpx.post(base + "/reset", headers=h, json={"task": {"id": "x", "instruction": "y",
                                                               "config": [{"type": "warp_drive"}]}})
    assert r.status_code == 422 and "warp_drive" in r.json()["detail"]
    r = httpx.post(f"{env_service.url}/envs/nope/step", headers=h, json={"action": {"type": "wait"}})
    assert r.status_code == 404 and r.json()["dead"]  # a desktop the service does not have is gone


def test_bad_actions_are_errors_in_info_not_failures(env_service):
    h = auth(env_service)
    env_id = httpx.get(env_service.url + "/envs", headers=h).json()[0]["id"]
    base = f"{env_service.url}/envs/{env_id}"
    for action, needle in [({"type": "click", "x": 5000, "y": 10}, "outside"),
                           ({"type": "hotkey", "keys": ["ctrl", "nosuchkey"]}, "unknown key"),
                           ({"type": "scroll", "direction": "sideways"}, "direction")]:
        r = httpx.post(base + "/step", headers=h, json={"action": action})
        assert r.status_code == 200, r.text
        assert needle in r.json()["info"]["error"]
    # code the allow-list refuses is refused whole before any of it acts, as a bad request (the
    # agent loop records it as an invalid step)
    r = httpx.post(base + "/step", headers=h, json={"action": {"type": "pyautogui", "code": "import os"}})
    assert r.status_code == 422 and "refused pyautogui code" in r.json()["detail"], r.text
    assert httpx.get(base + "/alive", headers=h).json()["alive"]


def test_paths_outside_home_are_refused(env_service):
    h = auth(env_service)
    env_id = httpx.get(env_service.url + "/envs", headers=h).json()[0]["id"]
    base = f"{env_service.url}/envs/{env_id}"
    for p in ["/etc/passwd", "~/../../../../etc/passwd", "../x"]:
        r = httpx.post(base + "/file", headers=h, data={"file_path": p})
        assert r.status_code == 403, (p, r.text)
    r = httpx.post(base + "/setup/upload", headers=h, data={"file_path": "/tmp/agentenv-escape.txt"},
                   files={"file_data": ("x", b"x")})
    assert r.status_code == 403 and not Path("/tmp/agentenv-escape.txt").exists()
    # inside HOME works, both ways
    r = httpx.post(base + "/setup/upload", headers=h, data={"file_path": "~/Documents/in.txt"},
                   files={"file_data": ("x", b"inside")})
    assert r.status_code == 200
    assert httpx.post(base + "/file", headers=h, data={"file_path": "~/Documents/in.txt"}).content == b"inside"


HOSTILE = [
    "import os; os.system('touch {m}')",
    "__import__('os').system('touch {m}')",
    "eval(\"__import__('os').system('touch {m}')\")",
    "pyautogui.os.system('touch {m}')",
    "import subprocess; subprocess.run(['touch', '{m}'])",
    "pyautogui.click(__import__('os').system('touch {m}'))",
    "open('{m}', 'w')",
    "pyautogui.typewrite(open('/etc/passwd').read())",
    "[pyautogui.click(1, 1) for _ in range(3)]",
]


@pytest.mark.parametrize("code", HOSTILE)
def test_hostile_pyautogui_code_is_refused_and_nothing_runs(env_service, code, tmp_path):
    h = auth(env_service)
    env = httpx.get(env_service.url + "/envs", headers=h).json()[0]
    env_id = env["id"]
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    os.chmod(tmp_path, 0o777)
    src = "import pyautogui; import time; pyautogui.FAILSAFE = False; " + code.format(m=marker)
    r = httpx.post(f"{env_service.url}/envs/{env_id}/execute", headers=h,
                   json={"command": ["python", "-c", src], "shell": False})
    if env["sandboxed"]:  # it runs as the code it is, inside the sandbox: the host's file is out of reach
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and "refused" in r.json()["message"]
    time.sleep(0.2)
    assert not marker.exists()


def test_allowed_pyautogui_code_runs_as_actions(env_service):
    h = auth(env_service)
    env_id = httpx.get(env_service.url + "/envs", headers=h).json()[0]["id"]
    src = "import pyautogui; import time; pyautogui.FAILSAFE = False; pyautogui.moveTo(321, 123); time.sleep(0.1)"
    r = httpx.post(f"{env_service.url}/envs/{env_id}/execute", headers=h, json={"command": ["python", "-c", src]})
    assert r.status_code == 200 and r.json()["returncode"] == 0
    assert httpx.post(f"{env_service.url}/envs/{env_id}/cursor_position", headers=h).json() == [321, 123]
    shot = httpx.get(f"{env_service.url}/envs/{env_id}/screenshot", headers=h)
    assert Image.open(io.BytesIO(shot.content)).size == (1920, 1080)


def _xvfb_pid(display: str) -> int:
    return int(Path(f"/tmp/.X{display.lstrip(':')}-lock").read_text().strip())


async def test_killed_x_server_is_replaced_by_the_pool(env_service):
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    client = AsyncEnvClient(env_service.url, env_service.token)
    try:
        n = pool.size
        env = await pool.acquire()
        display = next(e.display for e in await client.list() if e.id == env.id)
        os.kill(_xvfb_pid(display), signal.SIGKILL)
        await asyncio.sleep(0.5)
        with pytest.raises(EnvDeadError, match="503"):
            await env.reset(None)
        await pool.release(env)  # the health check finds it dead
        assert pool.replaced == 1 and pool.size == n
        ids = {e.id for e in await client.list()}
        assert env.id not in ids and len(ids) == n
        fresh = [e for e in pool._all.values() if e.id not in {env.id}]
        obs = await fresh[-1].reset(None)
        assert obs.size == (1920, 1080)
    finally:
        await client.aclose()
        await pool.aclose()


def test_desktop_env_passes_gymnasium_checker(env_service):
    from gymnasium.utils.env_checker import check_env

    env = DesktopEnv(env_service.url, env_service.token)
    try:
        check_env(env, skip_render_check=False)
        obs, info = env.reset(options={"task": builtin_tasks()[0]})
        assert obs.shape == (1080, 1920, 3) and info["task_id"] == builtin_tasks()[0].id
        obs, reward, terminated, truncated, info = env.step(Action("finished"))
        assert terminated and reward == 0.0 and not truncated
    finally:
        env.close()


async def test_unsupported_evaluator_is_named(env_service):
    client = AsyncEnvClient(env_service.url, env_service.token)
    try:
        env_id = (await client.list())[0].id
        bad = Task(id="b", instruction="-", evaluator={"func": "compare_pptx_files", "result": {"type": "vm_file"}})
        with pytest.raises(EnvRequestError, match="compare_pptx_files"):
            await client.evaluate(env_id, bad)
    finally:
        await client.aclose()
