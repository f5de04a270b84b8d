"""What a run directory records besides its trajectories, for the viewer and for replay.

``run.json``: the run's config (tokens removed) and every desktop's screen size (actions are in
screen pixels; screenshots are at the model's size). ``tasks.jsonl``: the tasks the run ran, as
they were, so a replay sets up the same task even after the task files changed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from loguru import logger

from agentenv.atomic import write_atomic
from agentenv.types import Task

RUN_INFO = "run.json"
TASKS = "tasks.jsonl"


@dataclass
class RunInfo:
    screens: dict[str, list[int]] = field(default_factory=dict)  # desktop or service URL -> [w, h]
    screen: list[int] = field(default_factory=lambda: [1920, 1080])  # the most common one
    config: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    known: bool = False               # False: no run.json; sizes are assumed


def public_config(cfg: Any) -> dict[str, Any]:
    """The config as JSON, without secrets (env service tokens)."""
    d = cfg.model_dump(mode="json")
    for s in d.get("env", {}).get("services") or []:
        s.pop("token", None)
    return d


def write_run_info(run_dir: str | Path, *, screens: dict[str, list[int]], config: dict[str, Any] | None = None,
                   tasks: Iterable[Task] = ()) -> None:
    """Write run.json and merge ``tasks`` into tasks.jsonl (a resumed run may add tasks)."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    common = Counter(tuple(v) for v in screens.values()).most_common(1)
    info = {"screens": screens, "screen": list(common[0][0]) if common else [1920, 1080],
            "config": config or {}, "created": time.time()}
    write_atomic(d / RUN_INFO, json.dumps(info, indent=1).encode())
    known = load_tasks(d)
    for t in tasks:
        known[t.id] = t
    if known:
        write_atomic(d / TASKS, "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n"
                                        for t in known.values()).encode())


async def record_run(run_dir: str | Path | None, cfg: Any, services: list[Any], items: Iterable[Any]) -> None:
    """For ``agentenv run``: the services' screen sizes, the config and the tasks, into the run dir.
    Never fails the run: a service that does not answer here is left out (the pool will say why)."""
    if not run_dir:
        return
    from agentenv.envs.client import AsyncEnvClient, EnvError

    screens: dict[str, list[int]] = {}
    for spec in services:
        client = AsyncEnvClient(spec.url, spec.token, timeout_s=10.0)
        try:
            for e in await client.list():
                screens[f"{client.url}/envs/{e.id}"] = [e.width, e.height]
            sizes = Counter(tuple(v) for k, v in screens.items() if k.startswith(client.url + "/"))
            if sizes:  # desktops created later (replacements) are looked up by their service
                screens[client.url] = list(sizes.most_common(1)[0][0])
        except EnvError as e:
            logger.warning("run info: cannot list the desktops of {}: {}", spec.url, e)
        finally:
            await client.aclose()
    try:
        write_run_info(run_dir, screens=screens, config=public_config(cfg),
                       tasks=[t for t in items if isinstance(t, Task)])
    except OSError as e:
        logger.warning("run info: cannot write {}: {}", run_dir, e)


def load_run_info(run_dir: str | Path) -> RunInfo:
    p = Path(run_dir) / RUN_INFO
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return RunInfo()
    return RunInfo(screens=d.get("screens") or {}, screen=d.get("screen") or [1920, 1080],
                   config=d.get("config") or {}, created=d.get("created", 0.0), known=True)


def load_tasks(run_dir: str | Path) -> dict[str, Task]:
    """The tasks recorded in a run dir, by id; a line that does not parse is skipped with a warning."""
    p = Path(run_dir) / TASKS
    out: dict[str, Task] = {}
    if not p.exists():
        return out
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            t = Task.from_dict(json.loads(line))
        except (ValueError, json.JSONDecodeError) as e:
            logger.warning("{}:{}: skipped: {}", p, i + 1, e)
            continue
        out[t.id] = t
    return out
