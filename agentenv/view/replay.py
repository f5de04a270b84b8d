"""Replay: re-execute a recorded trajectory's actions on a fresh desktop and say where it diverges.

For each recorded step, the replay compares the screen with the screenshot that step saw
(perceptual distance, ``agentenv.view.compare``), then performs the step's actions. After the last
step it compares the final screen and evaluates the task. A step *diverges* when the screen never
came within the threshold of the recorded one while the replay waited up to ``settle_s`` for it
(apps paint asynchronously: the first grab after an action may precede the repaint, in the
recording as in the replay). ``pace="recorded"`` waits each step's recorded model latency before
acting, as the original did; ``"fast"`` does not.

Oracle recordings: ``record_oracles`` runs tasks' oracle action lists (the built-in suite has
one per task) and writes them as a run directory, one trajectory per task, so the same replay
gives a determinism table of the suite.

Results go to ``RUN_DIR/replays/<task>/<sample>/`` (replay.json and the replay's screenshots),
where ``agentenv view`` finds them and shows them next to the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterable

from loguru import logger

from agentenv.compat import TaskGroup
from agentenv.envs.client import AsyncDesktopEnv, AsyncEnvClient, EnvDeadError, EnvError, EnvRequestError
from agentenv.net import free_port
from agentenv.rollout.buffer import TrajectoryBuffer, read_trajectories
from agentenv.types import Action, Status, Step, Task, Trajectory
from agentenv.view import model
from agentenv.view.compare import THRESHOLD, Comparison, compare, gray
from agentenv.view.runinfo import load_run_info, load_tasks, write_run_info

REPLAYS = "replays"
WAIT0 = Action("wait", seconds=0)


@dataclass
class ReplayOptions:
    threshold: float = THRESHOLD
    pace: str = "recorded"        # recorded | fast
    settle_s: float = 3.0         # how long to wait for the screen to match the recorded one
    poll_s: float = 0.1

    def __post_init__(self) -> None:
        if self.pace not in ("recorded", "fast"):
            raise ValueError(f"pace must be 'recorded' or 'fast', not {self.pace!r}")


def replay_dir(task_id: str, sample: int) -> str:
    return f"{REPLAYS}/{model.slug(task_id)}/{sample}"


def _png_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except OSError:
        return None


def _actions(step: Step) -> list[dict]:
    a = step.action
    if not a:
        return []
    return list(a.get("actions") or []) if a.get("type") == "sequence" else [a]


async def _settled(env: AsyncDesktopEnv, png: bytes, image_size: tuple[int, int] | None, settle_s: float,
                   poll_s: float) -> bytes:
    """The screen once it stopped changing: at least 0.2 s after the action, then three equal grabs
    ``poll_s`` apart (at most ``settle_s``). What a recording shows when it should not race the
    app's repaint; under CPU load an app may still paint later (the replay waits for it anyway)."""
    deadline = time.monotonic() + settle_s
    await asyncio.sleep(0.2)
    same = 0
    while time.monotonic() < deadline and same < 2:
        await asyncio.sleep(poll_s)
        obs, _, _ = await env.step(WAIT0, image_size)
        same = same + 1 if obs.png == png else 0   # PNG encoding is deterministic: same bytes, same pixels
        png = obs.png
    return png


class Replayer:
    """Replays trajectories of one run directory."""

    def __init__(self, run_dir: str | Path, options: ReplayOptions | None = None):
        self.run_dir = Path(run_dir)
        self.opt = options or ReplayOptions()

    async def _match(self, env: AsyncDesktopEnv, png: bytes, recorded: Path, image_size: tuple[int, int] | None
                     ) -> tuple[bytes, Comparison | None, float]:
        """The screen as close to ``recorded`` as it gets within settle_s: (png, comparison, seconds waited)."""
        if not recorded.is_file():
            return png, None, 0.0
        ref = await asyncio.to_thread(gray, str(recorded))
        size = (ref.shape[1], ref.shape[0])

        def cmp(p: bytes) -> Comparison:
            return compare(ref, gray(p, size), self.opt.threshold)

        t0 = time.monotonic()
        best = (png, await asyncio.to_thread(cmp, png))
        while best[1].distance > self.opt.threshold and time.monotonic() - t0 < self.opt.settle_s:
            await asyncio.sleep(self.opt.poll_s)
            obs, _, _ = await env.step(WAIT0, image_size)
            c = await asyncio.to_thread(cmp, obs.png)
            if c.distance < best[1].distance:
                best = (obs.png, c)
        return best[0], best[1], time.monotonic() - t0

    def _save(self, rel_dir: str, name: str, png: bytes) -> str:
        d = self.run_dir / rel_dir
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(png)
        return f"{rel_dir}/{name}"

    def _entry(self, index: int, final: bool, png: bytes, c: Comparison | None, waited: float, rel_dir: str
               ) -> model.ReplayStep:
        name = "final.png" if final else f"step-{index:03d}.png"
        shot = self._save(rel_dir, name, png)
        if c is None:
            return model.ReplayStep(index, final, screenshot=shot, error="no recorded screenshot to compare with")
        return model.ReplayStep(index, final, c.distance, c.distance > self.opt.threshold, c.region, shot,
                                settle_s=waited)

    async def replay(self, traj: Trajectory, task: Task, env: AsyncDesktopEnv) -> model.ReplayResult:
        """Replay ``traj`` on ``env`` (a desktop of the recorded screen size); never raises for the
        desktop's or the task's failures: they are the result's ``error``."""
        rel_dir = replay_dir(traj.task_id, traj.sample)
        res = model.ReplayResult(traj.task_id, traj.sample, self.opt.threshold, self.opt.pace, traj.reward,
                                 traj.status.value, started_at=time.time(), screen=list(env.screen))
        recorded = [self.run_dir / s.screenshot if s.screenshot else Path("/nonexistent") for s in traj.steps]
        first = next((p for p in recorded if p.is_file()), None)
        image_size = _png_size(first) if first else None
        res.image_size = list(image_size) if image_size else list(env.screen)
        try:
            await self._run(traj, task, env, res, recorded, image_size, rel_dir)
        except EnvRequestError as e:
            res.error = f"the desktop refused: {e.reason}"
        except EnvError as e:
            res.error = f"desktop failed: {e}"
        res.ended_at = time.time()
        (self.run_dir / rel_dir).mkdir(parents=True, exist_ok=True)
        (self.run_dir / rel_dir / "replay.json").write_text(json.dumps(res.to_dict(), indent=1))
        return res

    async def _run(self, traj: Trajectory, task: Task, env: AsyncDesktopEnv, res: model.ReplayResult,
                   recorded: list[Path], image_size: tuple[int, int] | None, rel_dir: str) -> None:
        try:
            obs = await env.reset(task, image_size)
        except EnvRequestError as e:
            res.error = f"task setup failed: {e.reason}"
            return
        png = obs.png
        last_action: str | None = None
        for i, step in enumerate(traj.steps):
            png, c, waited = await self._match(env, png, recorded[i], image_size)
            entry = self._entry(i, False, png, c, waited, rel_dir)
            res.steps.append(entry)
            if self.opt.pace == "recorded":
                await asyncio.sleep(max(0.0, step.llm_latency_s - waited))
            t0 = time.perf_counter()
            actions = _actions(step)
            if not actions:  # the loop looked again after an unusable reply
                actions = [WAIT0.to_dict()]
            for a in actions:
                try:
                    new, info, _ = await env.step(Action.from_dict(a), image_size)
                except EnvRequestError as e:
                    entry.error = f"the desktop refused {model.action_summary(a)}: {e.reason}"
                    break
                except (ValueError, TypeError) as e:
                    entry.error = f"recorded action is not valid: {e}"
                    break
                if new is not None:
                    png = new.png
                if info.get("error"):
                    entry.error = str(info["error"])
                if step.action:  # not the look-again wait
                    last_action = a.get("type")
            entry.step_s = time.perf_counter() - t0
        final = self.run_dir / traj.final_screenshot if traj.final_screenshot else None
        if traj.steps and final is not None:
            png, c, waited = await self._match(env, png, final, image_size)
            res.steps.append(self._entry(len(traj.steps), True, png, c, waited, rel_dir))
        status = traj.status
        if status.infrastructure or status == Status.TASK_ERROR or not task.evaluator:
            return  # the recording was not scored: nothing to compare the reward with
        try:
            res.reward = await env.evaluate(task, last_action)
        except EnvRequestError as e:
            res.error = f"evaluation failed: {e.reason}"


# ------------------------------------------------------------------ desktops for replay
@contextlib.asynccontextmanager
async def env_client(env_url: str | None, token: str | None, port: int = 0,
                     log: Path | None = None) -> AsyncIterator[AsyncEnvClient]:
    """A client of the given env service, or of a local one started (with no desktops) for the
    duration; replays create their own desktops on it, of the recorded screen size."""
    from agentenv.services import EnvService

    svc = None
    if env_url is None:
        svc = EnvService(num=0, port=port or free_port(), log=log)
        await asyncio.to_thread(svc.start)
        env_url, token = svc.url, svc.token
    client = AsyncEnvClient(env_url, token)
    try:
        yield client
    finally:
        await client.aclose()
        if svc is not None:
            await asyncio.to_thread(svc.stop)


@contextlib.asynccontextmanager
async def desktops(client: AsyncEnvClient, screens: list[tuple[int, int]]) -> AsyncIterator[list[AsyncDesktopEnv]]:
    """New desktops on ``client``'s service, one per entry of ``screens``; closed at the end."""
    made: list[AsyncDesktopEnv] = []
    try:
        for w, h in screens:
            e = await client.create(w, h)
            made.append(AsyncDesktopEnv(client, e.id, e.screen))
        yield made
    finally:
        for env in made:
            with contextlib.suppress(EnvError):
                await client.close(env.id)


async def each_on_a_desktop(jobs: list, client: AsyncEnvClient, n: int, screen_of, work) -> list:
    """Run ``work(job, env)`` for every job, at most ``n`` at a time, each on a desktop of its screen."""
    results: list = [None] * len(jobs)
    by_screen: dict[tuple[int, int], list[int]] = {}
    for i, j in enumerate(jobs):
        by_screen.setdefault(screen_of(j), []).append(i)
    for screen, idx in by_screen.items():
        k = max(1, min(n, len(idx)))
        async with desktops(client, [screen] * k) as envs:
            free: asyncio.Queue[AsyncDesktopEnv] = asyncio.Queue()
            for e in envs:
                free.put_nowait(e)

            async def one(i: int) -> None:
                env = await free.get()
                try:
                    results[i] = await work(jobs[i], env)
                finally:
                    if not await env.alive():  # a desktop that died is not handed to the next job
                        with contextlib.suppress(EnvError):
                            e = await client.create(*screen)
                            env = AsyncDesktopEnv(client, e.id, e.screen)
                            envs.append(env)   # closed with the others
                    free.put_nowait(env)

            async with TaskGroup() as tg:
                for i in idx:
                    tg.create_task(one(i))
    return results


# ------------------------------------------------------------------ whole runs
def resolve_tasks(run_dir: Path, source: str | None) -> dict[str, Task]:
    """Tasks by id: from ``source`` when given (a changed setup replays against the recording),
    else as the run recorded them, else the built-in suite."""
    from agentenv.envs.tasks import builtin_tasks
    from agentenv.rollout.sources import load_items

    if source:
        return {t.id: t for t in load_items(source) if isinstance(t, Task)}
    tasks = {t.id: t for t in builtin_tasks()}
    tasks.update(load_tasks(run_dir))
    return tasks


def select(trajs: Iterable[Trajectory], task: str | None = None, sample: int | None = None) -> list[Trajectory]:
    out = [t for t in trajs if (task is None or t.task_id == task or model.base_task_id(t.task_id) == task)
           and (sample is None or t.sample == sample)]
    return sorted(out, key=lambda t: (t.task_id, t.sample))


async def replay_run(run_dir: str | Path, client: AsyncEnvClient, *, task: str | None = None,
                     sample: int | None = None, tasks_source: str | None = None, desktops_n: int = 2,
                     options: ReplayOptions | None = None) -> list[model.ReplayResult]:
    """Replay the selected trajectories of a run directory; results are also written under it."""
    run_dir = Path(run_dir)
    trajs = select(read_trajectories(run_dir), task, sample)
    if not trajs:
        raise LookupError(f"no recorded trajectory in {run_dir} matches task={task!r} sample={sample!r}")
    tasks = resolve_tasks(run_dir, tasks_source)
    info = load_run_info(run_dir)
    rep = Replayer(run_dir, options)
    missing = [t for t in trajs if model.base_task_id(t.task_id) not in tasks]
    results: dict[tuple[str, int], model.ReplayResult] = {}
    for t in missing:
        r = model.ReplayResult(t.task_id, t.sample, rep.opt.threshold, rep.opt.pace, t.reward, t.status.value,
                               error=f"task {model.base_task_id(t.task_id)!r} not found (pass --tasks SOURCE)")
        results[t.key] = r
    runnable = [t for t in trajs if t.key not in results]

    async def work(t: Trajectory, env: AsyncDesktopEnv) -> model.ReplayResult:
        r = await rep.replay(t, tasks[model.base_task_id(t.task_id)], env)
        logger.info("replayed {}#{}: {}{}", t.task_id, t.sample, r.verdict, f" at {r.where()}" if r.where() else "")
        return r

    done = await each_on_a_desktop(runnable, client, desktops_n,
                                    lambda t: model.screen_of(t.env_id, info.screens, info.screen), work)
    for t, r in zip(runnable, done):
        results[t.key] = r
    ordered = [results[t.key] for t in trajs]
    summary = run_dir / REPLAYS / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps([r.row() for r in ordered], indent=1))
    return ordered


async def record_oracles(out_dir: str | Path, client: AsyncEnvClient, tasks: list[Task], *,
                         screen: tuple[int, int] = (1920, 1080), image_size: tuple[int, int] | None = None,
                         desktops_n: int = 2, settle_s: float = 3.0, poll_s: float = 0.1) -> list[Trajectory]:
    """Run each task's oracle actions on a fresh desktop and write them as a run directory
    (one trajectory per task, sample 0). Screenshots are taken once the screen is still."""
    out_dir = Path(out_dir)
    with_oracle = [t for t in tasks if t.oracle]
    if not with_oracle:
        raise LookupError("none of the tasks has an oracle")
    buffer = TrajectoryBuffer(out_dir, rollout_n=1)
    done = buffer.done_keys()
    todo = [t for t in with_oracle if (t.id, 0) not in done]
    screens: dict[str, list[int]] = {}

    async def work(task: Task, env: AsyncDesktopEnv) -> Trajectory:
        screens[env.name] = list(env.screen)
        traj = Trajectory(task_id=task.id, sample=0, env_id=env.name, started_at=time.time())
        try:
            await _oracle(traj, task, env, buffer, image_size, settle_s, poll_s)
        except EnvDeadError as e:
            traj.status, traj.reason = Status.ENV_ERROR, str(e)
        traj.ended_at = time.time()
        buffer.add(traj)
        return traj

    trajs = await each_on_a_desktop(todo, client, desktops_n, lambda _: screen, work)
    buffer.compact()
    if screens:
        screens[client.url] = list(screen)
    old = load_run_info(out_dir).screens
    write_run_info(out_dir, screens={**old, **screens}, config={"oracles": True}, tasks=with_oracle)
    return trajs


async def _oracle(traj: Trajectory, task: Task, env: AsyncDesktopEnv, buffer: TrajectoryBuffer,
                  image_size: tuple[int, int] | None, settle_s: float, poll_s: float) -> None:
    try:
        obs = await env.reset(task, image_size)
    except EnvRequestError as e:
        traj.status, traj.reason = Status.TASK_ERROR, f"reset failed: {e.reason}"
        return
    png = await _settled(env, obs.png, image_size, settle_s, poll_s)
    last: str | None = None
    for i, a in enumerate(task.oracle or []):
        step = Step(index=i, text=f"oracle: {json.dumps(a, ensure_ascii=False)}", thought="oracle action",
                    action=dict(a), screenshot=buffer.screenshot_path(traj, f"step-{i:03d}", png))
        t0 = time.perf_counter()
        try:
            new, info, _ = await env.step(Action.from_dict(a), image_size)
            if info.get("error"):
                step.env_info = {"error": info["error"]}
            last = a["type"]
            if new is not None:
                png = new.png
        except EnvRequestError as e:
            step.valid, step.error = False, f"the desktop refused the action: {e.reason}"
        step.env_latency_s = time.perf_counter() - t0
        traj.steps.append(step)
        png = await _settled(env, png, image_size, settle_s, poll_s)
    traj.final_screenshot = buffer.screenshot_path(traj, "final", png)
    traj.status = Status.CALL_USER if last == "call_user" else Status.FINISHED
    traj.reason = "the task's oracle actions"
    try:
        traj.reward = await env.evaluate(task, last)
    except EnvRequestError as e:
        traj.status, traj.reason = Status.EVAL_ERROR, f"evaluation failed: {e.reason}"

