"""The fault suite (issue 16, section 1): one fault injected into a real run each (tiny model on the
CPU vLLM build, real desktops, built-in tasks), then the buffer is checked: every task ends exactly
once, as a finished trajectory or a recorded failure with its reason; none lost, none written
twice; every parquet part reads back; and no process of ours is left (checked by the process tree
we started, never by name).

Faults come from real processes being killed or stopped (an app, the env service, the vLLM
server, an X server), a real socket that never answers, a real tmpfs that fills up, and the
fault proxy (tests/faultproxy.py) rewriting real model replies into garbage.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ENV_PORT, ROOT
from tests.faultproxy import FaultProxy
from tests.faults.test_rollout_faults import POLICY, _wait_for
from tests.osworld.test_streaming_task_sampling import CLICK_ONLY, ROLLOUT_N, check_complete, make_scheduler, tasks

from agentenv.config import ServiceConfig
from agentenv.envs.host import MARK
from agentenv.envs.pool import EnvPool
from agentenv.procs import alive, descendants, marked
from agentenv.rollout.buffer import read_trajectories
from agentenv.rollout.llm import ServiceLLM
from agentenv.types import Status

pytestmark = pytest.mark.slow
PORTS = ENV_PORT + 10  # this module's own services: ENV_PORT+10 ...


def record(**figures) -> None:
    """For scripts/bench_faults.py: with AGENTENV_FAULT_REPORT set, append this test's figures
    (faults injected, trajectories lost, duplicates, orphans...) to that file as a JSON line."""
    path = os.environ.get("AGENTENV_FAULT_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].rsplit("::", 1)[-1]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")


def _raw_rows(out: Path) -> tuple[list[dict], int]:
    rows, unreadable = [], 0
    for f in [*out.glob("trajectories*.parquet"), *(out / "parts").glob("*.parquet")]:
        try:
            rows += pq.read_table(f, columns=["task_id", "sample", "status"]).to_pylist()
        except Exception:  # noqa: BLE001 - counted, then the check below fails on it
            unreadable += 1
    return rows, unreadable


def check_run(out: Path, ids: list[str]) -> dict:
    """Every (task, sample) exactly once, every part file whole, every ending with a reason."""
    expected = {(i, s) for i in ids for s in range(ROLLOUT_N)}
    rows, unreadable = _raw_rows(out)
    final: dict = {}  # rows that say something final; an infrastructure failure may be superseded by a rerun
    for r in rows:
        if not Status(r["status"]).infrastructure:
            k = (r["task_id"], r["sample"])
            final[k] = final.get(k, 0) + 1
    found = {(r["task_id"], r["sample"]) for r in rows}
    record(expected=len(expected), lost=len(expected - found), unreadable=unreadable,
           duplicates=sum(n - 1 for n in final.values()))
    assert unreadable == 0, f"{unreadable} parquet files do not read back"
    trajs = check_complete(out, ids)
    assert not list(out.rglob(".*.tmp")), "a half-written file was left behind"
    assert all(t.reason for t in trajs), [(t.key, t.status) for t in trajs if not t.reason]
    return {t.key: t for t in trajs}


def assert_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    record(orphans=len(left))
    assert not left, f"processes left behind: {[(p, Path(f'/proc/{p}/comm').read_text().strip()) for p in left]}"


def running(sched) -> list[tuple[tuple[str, int], str]]:
    """(key, desktop name) of the trajectories in flight, oldest admission first."""
    out: dict = {}
    for e in sched.stats.events:
        if e.kind == "admit":
            out[(e.key, e.sample)] = e.env
        elif e.kind in ("done", "release"):
            out.pop((e.key, e.sample), None)
    return list(out.items())


def _ids(n: int) -> list[str]:
    return [t.id for t in tasks()[:n]]


# ----------------------------------------------------------------------------- desktops

async def test_an_app_killed_mid_run_leaves_the_desktop_alive(vllm_server, env_service, tmp_path, tiny_pixels):
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks()[:3], tiny_pixels, max_steps=6, regex=CLICK_ONLY)
    killed: dict = {}

    async def kill_app() -> None:
        await _wait_for(lambda: sched.stats.steps >= 3)
        for key, env in running(sched):
            apps = [p for p in marked(MARK, env.rsplit("/", 1)[1])
                    if Path(f"/proc/{p}/comm").read_text().strip() != "openbox"]
            if apps:
                for p in apps:
                    os.kill(p, signal.SIGKILL)
                record(faults=1)
                killed.update(key=key, steps=sched.stats.steps, pids=apps)
                return

    try:
        await asyncio.gather(sched.run(), kill_app())
    finally:
        await pool.aclose()
    trajs = check_run(tmp_path, _ids(3))
    v = trajs[killed["key"]]
    # the desktop lived on: no rerun, no replacement; the trajectory went on to its end
    assert v.attempts == 1 and v.status in POLICY and len(v.steps) == 6, (v.status, v.reason, len(v.steps))
    assert pool.replaced == 0 and all(t.status in POLICY for t in trajs.values())
    assert_gone(killed["pids"])


async def test_a_stopped_x_server_is_a_dead_desktop_replaced_and_rerun(vllm_server, env_service, tmp_path,
                                                                      tiny_pixels):
    """SIGSTOP on a desktop's X server: its screenshot hangs. The step times out, the desktop is
    replaced (the service kills the wedged server), the trajectory reruns elsewhere."""
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)], timeout_s=6.0).start()
    sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks()[:3], tiny_pixels, max_steps=5, regex=CLICK_ONLY)
    stopped: dict = {}

    async def stop_x() -> None:
        await _wait_for(lambda: sched.stats.steps >= 2)
        key, env = running(sched)[-1]
        did = env.rsplit("/", 1)[1]
        display = next(e.display for e in await pool._specs[0][0].list() if e.id == did)
        pid = int(Path(f"/tmp/.X{display[1:]}-lock").read_text())
        os.kill(pid, signal.SIGSTOP)
        record(faults=1)
        stopped.update(key=key, pid=pid)

    try:
        await asyncio.wait_for(asyncio.gather(sched.run(), stop_x()), 300)
    finally:
        await pool.aclose()
    trajs = check_run(tmp_path, _ids(3))
    v = trajs[stopped["key"]]
    assert v.attempts >= 2 and "rerun after" in v.reason and "timed out" in v.reason and v.status in POLICY, v.reason
    assert pool.replaced >= 1
    assert_gone([stopped["pid"]])  # the stopped X server was killed, not left behind


async def test_the_env_service_killed_and_started_again_on_the_same_port(vllm_server, tmp_path, tiny_pixels):
    from agentenv.services import EnvService

    port, token = PORTS, secrets.token_urlsafe(16)
    first = EnvService(num=2, port=port, token=token, log=tmp_path / "env1.log").start()
    second: list[EnvService] = []
    pool = await EnvPool([ServiceConfig(url=first.url, token=token)], replace_timeout_s=90).start()
    out = tmp_path / "out"
    sched = make_scheduler(vllm_server.url, pool, out, tasks()[:3], tiny_pixels, max_steps=5, regex=CLICK_ONLY)
    tree: list[int] = []

    async def crash_and_restart() -> None:
        await _wait_for(lambda: sched.stats.steps >= 2)
        tree.extend([first.proc.pid, *descendants(first.proc.pid)])  # the service, its X servers and apps
        os.kill(first.proc.pid, signal.SIGKILL)
        record(faults=1)
        first.proc.wait()
        second.append(await asyncio.to_thread(
            EnvService(num=2, port=port, token=token, log=tmp_path / "env2.log").start))

    try:
        await asyncio.wait_for(asyncio.gather(sched.run(), crash_and_restart()), 300)
    finally:
        await pool.aclose()
        for svc in second:
            later = [svc.proc.pid, *descendants(svc.proc.pid)]
            svc.stop()
            assert_gone(later)
    trajs = check_run(out, _ids(3))
    assert all(t.status in POLICY for t in trajs.values()), [(t.key, t.status, t.reason) for t in trajs.values()]
    rerun = [t for t in trajs.values() if t.attempts > 1]
    assert rerun and all("rerun after" in t.reason for t in rerun)
    assert pool.replaced >= 1 and pool.lost == 0
    assert_gone(tree)  # SIGKILL left nothing: the X servers were tied to the service, the apps to X


# ----------------------------------------------------------------------------- the model service

async def test_the_only_vllm_server_killed_and_restarted(vllm_server, env_service, tmp_path, tiny_pixels):
    """The real vLLM server is killed (its process group, by PID) mid-run and started again on the
    same port. Scheduler A's retry budget is shorter than the outage: its trajectories in flight end
    as llm_error with the reason, it admits nothing while the server is down, and goes on when it
    returns. Scheduler B's budget covers the outage: its trajectories wait and finish."""
    url = vllm_server.url
    short = ServiceLLM(url, vllm_server.model, max_retries=1, backoff_s=0.05, down_s=0.5)
    long = ServiceLLM(url, vllm_server.model, max_retries=12, backoff_s=1.0, down_s=1.0)
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    a = make_scheduler(short, pool, tmp_path / "a", tasks()[:3], tiny_pixels, max_steps=3, regex=CLICK_ONLY)
    b = make_scheduler(long, pool, tmp_path / "b", tasks()[3:5], tiny_pixels, max_steps=3, regex=CLICK_ONLY,
                       step_timeout_s=600)
    a.config.llm_wait_s = 0.5
    seen: dict = {}

    async def outage() -> None:
        await _wait_for(lambda: a.stats.steps >= 1 and b.stats.steps >= 1)
        old = vllm_server.proc
        tree = [old.pid, *descendants(old.pid)]
        os.killpg(old.pid, signal.SIGKILL)
        record(faults=1)
        await asyncio.to_thread(old.wait)
        await _wait_for(lambda: a.buffer.statuses.get("llm_error", 0) >= 1, 60)
        admitted = a.stats.admitted
        await asyncio.to_thread(vllm_server.start)  # same port; about a minute
        seen["admitted_while_down"] = a.stats.admitted - admitted
        seen["tree"] = tree

    try:
        await asyncio.wait_for(asyncio.gather(a.run(), b.run(), outage()), 600)
    finally:
        await pool.aclose()
        await short.aclose()
        await long.aclose()
    assert_gone(seen["tree"])
    ta, tb = check_run(tmp_path / "a", _ids(3)), check_run(tmp_path / "b", [t.id for t in tasks()[3:5]])
    failed = [t for t in ta.values() if t.status == Status.LLM_ERROR]
    assert failed and seen["admitted_while_down"] == 0
    assert all("connection" in t.reason.lower() or "no endpoint is up" in t.reason for t in failed), \
        [t.reason for t in failed]
    assert all(t.status in POLICY for t in ta.values() if t not in failed)
    assert all(t.status in POLICY for t in tb.values()), [(t.key, t.status, t.reason) for t in tb.values()]


async def test_a_hanging_endpoint_beside_a_good_one(vllm_server, env_service, tmp_path, tiny_pixels):
    """A socket that accepts connections and never answers: with a good endpoint beside it, the
    request timeout and failover carry every trajectory; alone, the step timeout ends each one as
    ``timeout`` with the reason, and the run goes on."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the handshake; nobody ever reads or answers
        record(faults=2)  # beside a good endpoint, then alone
        hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}/v1"
        llm = ServiceLLM([hung_url, vllm_server.url], vllm_server.model, timeout_s=10.0, max_retries=3,
                         backoff_s=0.05, failure_threshold=2, down_s=60)
        pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
        sched = make_scheduler(llm, pool, tmp_path / "pair", tasks()[:3], tiny_pixels, max_steps=3)
        alone = ServiceLLM([hung_url], vllm_server.model, timeout_s=60, max_retries=0)
        solo = make_scheduler(alone, pool, tmp_path / "alone", tasks()[:1], tiny_pixels, step_timeout_s=2.0)
        try:
            await asyncio.wait_for(sched.run(), 300)
            await asyncio.wait_for(solo.run(), 120)
        finally:
            await pool.aclose()
            await llm.aclose()
            await alone.aclose()
    trajs = check_run(tmp_path / "pair", _ids(3))
    assert all(t.status in POLICY for t in trajs.values()), [(t.key, t.status, t.reason) for t in trajs.values()]
    st = llm.stats()[hung_url]
    assert st["requests"] >= 1 and st["served"] == 0 and st["down_count"] >= 1
    for t in check_run(tmp_path / "alone", _ids(1)).values():
        assert t.status == Status.TIMEOUT and "exceeded 2.0s" in t.reason


def _reply(content: bytes | str):
    """A rewrite for the fault proxy: the real completion, its text replaced by ``content``."""
    def fn(body: bytes) -> bytes:
        d = json.loads(body)
        if "choices" not in d:  # an error answer: leave it as it is
            return body
        marker = "\u2063REPLACED\u2063"
        d["choices"][0]["message"]["content"] = marker
        raw = json.dumps(d).encode()
        new = content if isinstance(content, bytes) else json.dumps(content)[1:-1].encode()
        return raw.replace(json.dumps(marker)[1:-1].encode(), new)
    return fn


GARBAGE = {
    "empty": "",
    "10k": "x" * 10_000,
    "not utf-8": b"Thought: \xff\xfe\xc3(\nAction: click(start_box='(10,10)')",
    "off screen": "Thought: far\nAction: click(start_box='(99999,99999)')",
    "refused code": "Thought: x\nAction: exec(\"__import__('os').system('touch /tmp/pwned')\")",
    "unknown key": "Thought: x\nAction: hotkey(key='ctrl notakey')",
}


async def test_garbage_model_output_is_an_invalid_step_never_a_crash(vllm_server, env_service, tmp_path,
                                                                    tiny_pixels):
    """The fault proxy rewrites real replies of the real model: empty, 10,000 characters, bytes
    that are not UTF-8, coordinates far off-screen, code instead of an action, a key X does not know."""
    async with FaultProxy(vllm_server.url[:-3]) as proxy:
        for content in GARBAGE.values():
            proxy.rewrite(_reply(content), times=1, path="/chat/completions")
        llm = ServiceLLM(proxy.url, vllm_server.model, max_retries=2, backoff_s=0.05)
        pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
        sched = make_scheduler(llm, pool, tmp_path, tasks()[:3], tiny_pixels, max_steps=4, regex=CLICK_ONLY)
        try:
            await asyncio.wait_for(sched.run(), 300)
        finally:
            await pool.aclose()
            await llm.aclose()
    record(faults=proxy.injected.count("rewrite /v1/chat/completions"))
    assert proxy.injected.count("rewrite /v1/chat/completions") == len(GARBAGE)
    trajs = check_run(tmp_path, _ids(3))
    assert all(t.status in POLICY for t in trajs.values()), [(t.key, t.status, t.reason) for t in trajs.values()]
    steps = [s for t in trajs.values() for s in t.steps]
    bad = [s for s in steps if not s.valid]
    texts = {s.text for s in bad}
    # each garbage reply that reached the agent is an invalid step with the reason
    assert "" in texts and "x" * 10_000 in texts and all(s.error for s in bad)
    assert any("outside the image" in s.error for s in bad)
    assert any("unknown action" in s.error or "unparseable" in s.error for s in bad if "exec(" in s.text)
    assert any("notakey" in json.dumps(s.env_info) for s in steps), "the desktop's refusal of the key is recorded"
    assert not Path("/tmp/pwned").exists()
    # the answer that is not UTF-8 was a failed attempt, retried: it never reached the agent
    st = next(iter(llm.stats().values()))
    assert st["requests"] - st["served"] >= 1 and not any("\ufffd" in s.text for s in steps)


# ----------------------------------------------------------------------------- agentenv run itself

def _run_cmd(out: Path, ids: list[str], vllm_server, env_service=None, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "agentenv", "run", "--set", f"llm.url={vllm_server.url}",
           "--set", f"llm.model={vllm_server.model}", "--set", f"tasks.ids=[{', '.join(ids)}]",
           "--set", f"output.dir={out}", "--set", "loop.max_steps=3", "--set", "progress=false",
           "--set", f"sampling.regex={json.dumps(CLICK_ONLY)}", *extra]
    if env_service is not None:  # the token goes in ENV_TOKEN, not on a command line others can read
        cmd += ["--set", f"env.services=[{{url: '{env_service.url}'}}]"]
    else:
        cmd += ["--set", "env.local_desktops=2", "--set", f"env.local_port={PORTS + 1}"]
    return cmd


def _env(env_service=None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if env_service is not None:
        env["ENV_TOKEN"] = env_service.token
    return env


def test_agentenv_run_sigkilled_then_resumed(vllm_server, tmp_path):
    """SIGKILL of `agentenv run` mid-run: the env service and desktops it started end with it; the
    same command with --resume skips what is on disk and finishes the rest; every part reads back."""
    out, ids = tmp_path / "run", _ids(4)
    cmd = _run_cmd(out, ids, vllm_server)
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((out / "parts").glob("*.parquet")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    tree = descendants(p.pid)
    assert tree, "agentenv run should have started an env service with desktops"
    p.kill()
    record(faults=1)
    p.communicate(timeout=30)
    assert_gone(tree)  # its env service, X servers and apps ended with it
    assert oct((out / "env-service.log").stat().st_mode & 0o777) == "0o600"
    done_before = {t.key for t in read_trajectories(out)}
    assert 1 <= len(done_before) < len(ids) * ROLLOUT_N
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr  # the same dir is never reused silently
    r = subprocess.run(cmd + ["--resume", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["trajectories"] == len(ids) * ROLLOUT_N - len(done_before)
    check_run(out, ids)


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 256 KB: room for a few trajectories and their screenshots (root is needed to mount one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_disk_filling_up_stops_the_run_cleanly_and_a_rerun_finishes(vllm_server, env_service, small_disk):
    out, ids = small_disk / "run", _ids(5)
    cmd = _run_cmd(out, ids, vllm_server, env_service)
    r = subprocess.run(cmd, cwd=ROOT, env=_env(env_service), capture_output=True, text=True, timeout=600)
    record(faults=1)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "No space left on device" in r.stderr and "stopped early" in r.stderr, r.stderr[-3000:]
    # what was written is whole and nothing half-written is left
    parts = list((out / "parts").glob("*"))
    assert parts, "the disk should have filled after a few trajectories, not before the first"
    for f in parts:
        assert not f.name.startswith("."), f
        pq.read_table(f)
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    r = subprocess.run(cmd + ["--resume", str(out)], cwd=ROOT, env=_env(env_service), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    trajs = check_run(out, ids)
    assert all(t.status in POLICY for t in trajs.values()), [(t.key, t.status, t.reason) for t in trajs.values()]
