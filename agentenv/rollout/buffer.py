"""TrajectoryBuffer: groups of finished trajectories, for trainers and for disk.

- ``add(traj)`` writes the trajectory to disk at once (one parquet part file, written to a temp
  name, fsynced, renamed, and the directory fsynced, so a crash leaves either the whole row or
  nothing) and files it under its group; a group is released when all ``rollout_n`` samples are in.
- ``await get_batch(n)`` hands ``n`` complete groups to a trainer, holding only trajectories whose
  status is an outcome of the policy (``Status.trainable``); groups older than ``max_staleness``
  policy versions are dropped or flagged.
- On restart, ``done_keys()`` tells the scheduler which (task, sample) pairs are done: those are
  never run, nor written, again. A pair that ended by an infrastructure failure (model service,
  desktop, evaluator, our own timeouts) is not done: it runs again, and its new row supersedes the
  old one. ``compact()`` merges part files into one, keeping one row per pair.

Screenshots are PNG files under ``<dir>/screenshots/<task>/<sample>/a<attempt>-<name>.png``.
"""

from __future__ import annotations

import asyncio
import functools
import re
import uuid
from pathlib import Path
from typing import Iterable, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from loguru import logger

from agentenv.atomic import fsync_dir, remove_leftovers, write_atomic
from agentenv.config import RunConfig
from agentenv.rollout.rows import SCHEMA, from_row, to_row
from agentenv.types import Group, Trajectory

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def _rank(t: Trajectory) -> tuple[bool, float]:
    # Of two rows for one pair, the one that says something about the policy wins, then the newer.
    return (not t.status.infrastructure, t.ended_at)


def _best(trajs: Iterable[Trajectory]) -> dict[tuple[str, int], Trajectory]:
    best: dict[tuple[str, int], Trajectory] = {}
    for t in trajs:
        old = best.get(t.key)
        if old is None or _rank(t) > _rank(old):
            best[t.key] = t
    return best


def _part_files(path: Path) -> list[Path]:
    return sorted(path.glob("trajectories*.parquet")) + sorted((path / "parts").glob("*.parquet"))


def read_trajectories(path: str | Path) -> list[Trajectory]:
    """Every trajectory under a buffer directory (parts and compacted file), one per (task, sample)."""
    rows = (from_row(r) for f in _part_files(Path(path)) for r in pq.read_table(f, schema=SCHEMA).to_pylist())
    return list(_best(rows).values())


class TrajectoryBuffer:
    def __init__(self, directory: str | Path | None, rollout_n: int, *, max_staleness: int | None = None,
                 stale_policy: Literal["drop", "flag"] = "flag", save_screenshots: bool = True,
                 max_screenshots: int | None = None, max_ready: int | None = None):
        self.dir = Path(directory) if directory else None
        self.rollout_n = rollout_n
        self.max_staleness, self.stale_policy = max_staleness, stale_policy
        self.save_screenshots = save_screenshots and self.dir is not None
        # Bounds for a week-long run: screenshots per trajectory attempt on disk, and complete groups
        # held in memory for get_batch() (past it the oldest is let go: it is on disk). 0: hold none.
        self.max_screenshots, self.max_ready = max_screenshots, max_ready
        self._shots: dict[tuple[str, int, int], int] = {}
        self.screenshots_skipped = 0
        self.released_unread = 0
        self._pending: dict[str, dict[int, Trajectory]] = {}
        self._ready: asyncio.Queue[Group] | None = None
        self._done: set[tuple[str, int]] = set()
        self.groups_done = 0
        self.trajectories_done = 0
        self.dropped_stale = 0
        self.dropped_untrainable = 0
        self.policy_version = 0
        self.reward_sum = 0.0     # running sums, not a list: memory stays flat however long the run
        self.successes = 0
        self.statuses: dict[str, int] = {}
        if self.dir is not None:
            (self.dir / "parts").mkdir(parents=True, exist_ok=True)
            left = remove_leftovers(self.dir / "parts", "*.parquet") + remove_leftovers(self.dir, "*.parquet")
            if left:
                logger.info("buffer: removed {} half-written file(s) a killed run left in {}", len(left), self.dir)
            rerun = 0
            for t in read_trajectories(self.dir):
                if t.status.infrastructure:
                    rerun += 1  # not done: it runs again
                    continue
                self._done.add(t.key)
                self._pending.setdefault(t.task_id, {})[t.sample] = t
            # Groups that were complete before the restart were handed out then; keep only partial ones.
            for tid in [k for k, v in self._pending.items() if len(v) >= rollout_n]:
                del self._pending[tid]
            if self._done or rerun:
                logger.info("buffer: {} trajectories already on disk in {} will be skipped; {} that ended by an "
                            "infrastructure failure will run again", len(self._done), self.dir, rerun)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "TrajectoryBuffer":
        """The buffer of a run: groups of ``scheduler.rollout_n`` (this buffer owns that number; the
        scheduler asks it), staleness from ``scheduler``, where and what to keep from ``output``."""
        s, o = cfg.scheduler, cfg.output
        return cls(o.dir, s.rollout_n, max_staleness=s.max_staleness, stale_policy=s.stale_policy,
                   save_screenshots=o.screenshots, max_screenshots=o.max_screenshots, max_ready=o.max_ready_groups)

    @property
    def ready(self) -> asyncio.Queue[Group]:
        if self._ready is None:  # created lazily, inside the caller's event loop
            self._ready = asyncio.Queue()
        return self._ready

    def done_keys(self) -> set[tuple[str, int]]:
        return set(self._done)

    def screenshot_path(self, traj: Trajectory, name: str, png: bytes) -> str:
        if not self.save_screenshots:
            return ""
        if self.max_screenshots is not None:
            k = (traj.task_id, traj.sample, traj.attempts)
            n = self._shots.get(k, 0)
            if n >= self.max_screenshots:
                self.screenshots_skipped += 1
                return ""
            self._shots[k] = n + 1
        d = self.dir / "screenshots" / _safe(traj.task_id) / str(traj.sample)
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"a{traj.attempts}-{name}.png"
        p.write_bytes(png)
        return str(p.relative_to(self.dir))

    def _write(self, traj: Trajectory) -> None:
        table = pa.Table.from_pylist([to_row(traj)], schema=SCHEMA)
        write_atomic(self.dir / "parts" / f"{_safe(traj.task_id)}-{traj.sample}-{uuid.uuid4().hex[:8]}.parquet",
                     functools.partial(pq.write_table, table))

    def add(self, traj: Trajectory) -> Group | None:
        """File a finished trajectory. Returns its group when this completed it."""
        if traj.key in self._done:
            raise ValueError(f"trajectory {traj.key} was already added; refusing to write it twice")
        if self.dir is not None:
            self._write(traj)
        self._done.add(traj.key)
        self.trajectories_done += 1
        self.reward_sum += traj.reward
        self.successes += traj.reward >= 1.0
        for a in range(1, traj.attempts + 1):
            self._shots.pop((traj.task_id, traj.sample, a), None)
        self.statuses[traj.status.value] = self.statuses.get(traj.status.value, 0) + 1
        samples = self._pending.setdefault(traj.task_id, {})
        samples[traj.sample] = traj
        if len(samples) < self.rollout_n:
            return None
        del self._pending[traj.task_id]
        group = Group(task_id=traj.task_id, trajectories=[samples[k] for k in sorted(samples)])
        self.groups_done += 1
        if self.max_ready is not None:
            while self.ready.qsize() >= self.max_ready and not self.ready.empty():
                self.ready.get_nowait()  # nobody took it: it stays on disk, not in memory
                self.released_unread += 1
            if self.max_ready == 0:
                self.released_unread += 1
                return group
        self.ready.put_nowait(group)
        return group

    def set_policy_version(self, version: int) -> None:
        self.policy_version = version

    def _for_training(self, g: Group) -> Group | None:
        """``g`` with only trajectories a trainer may learn from; None when it should not be handed out."""
        trainable = [t for t in g.trajectories if t.status.trainable]
        if not trainable:
            self.dropped_untrainable += 1
            return None
        if len(trainable) < len(g.trajectories):
            g = Group(task_id=g.task_id, trajectories=trainable, stale=g.stale)
        version = g.min_policy_version
        if self.max_staleness is None or version is None or self.policy_version - version <= self.max_staleness:
            return g
        if self.stale_policy == "flag":
            g.stale = True
            return g
        self.dropped_stale += 1
        return None

    async def get_batch(self, n_groups: int, timeout: float | None = None) -> list[Group]:
        """Wait for ``n_groups`` complete groups to train on (see ``_for_training``)."""
        out: list[Group] = []
        while len(out) < n_groups:
            g = self._for_training(await asyncio.wait_for(self.ready.get(), timeout))
            if g is not None:
                out.append(g)
        return out

    def drain(self) -> list[Group]:
        out = []
        while not self.ready.empty():
            g = self._for_training(self.ready.get_nowait())
            if g is not None:
                out.append(g)
        return out

    def compact(self) -> Path | None:
        """Merge part files into trajectories.parquet (atomically), then remove the parts."""
        if self.dir is None:
            return None
        parts = sorted((self.dir / "parts").glob("*.parquet"))
        target = self.dir / "trajectories.parquet"
        if not parts:
            return target if target.exists() else None
        # One row per pair: a crash between the rename and the unlinks leaves parts that are in the
        # target too, and a rerun after an infrastructure failure supersedes the failed row.
        best = _best(from_row(r) for f in _part_files(self.dir) for r in pq.read_table(f, schema=SCHEMA).to_pylist())
        table = pa.Table.from_pylist([to_row(t) for t in best.values()], schema=SCHEMA)
        write_atomic(target, functools.partial(pq.write_table, table))
        for p in parts:
            p.unlink()
        fsync_dir(self.dir / "parts")
        return target
