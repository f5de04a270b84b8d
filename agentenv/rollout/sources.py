"""TaskSource: where the scheduler's tasks come from (list, OSWorld folder, JSON, JSONL, parquet).

A task that does not load is not dropped: it becomes a ``BrokenTask`` and the scheduler records
it as a ``task_error`` group with the reason, while the other tasks run.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from loguru import logger

from agentenv.config import TaskConfig
from agentenv.envs.tasks import NotATask, TaskLoadError, builtin_tasks, load_task_file
from agentenv.types import Task


@dataclass
class BrokenTask:
    id: str
    reason: str


Item = Union[Task, BrokenTask]


def _load_path(path: Path) -> list[Item]:
    if path.is_dir():
        out: list[Item] = []
        for f in sorted(path.rglob("*.json")):
            try:
                out.extend(load_task_file(f))
            except NotATask as e:
                logger.debug("skipped {}", e)
            except TaskLoadError as e:
                out.append(BrokenTask(f.stem, str(e)))
        return out
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                out.append(Task.from_dict(json.loads(line), source=str(path)))
            except (ValueError, json.JSONDecodeError, RecursionError) as e:
                out.append(BrokenTask(f"{path.name}:{i + 1}", f"{path}:{i + 1}: {type(e).__name__}: {e}"))
        return out
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        out = []
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            try:
                d = {k: (json.loads(v) if k in ("config", "evaluator", "oracle") and isinstance(v, str) else v)
                     for k, v in row.items()}
                out.append(Task.from_dict(d, source=str(path)))
            except (ValueError, json.JSONDecodeError) as e:
                out.append(BrokenTask(f"{path.name}#{i}", f"{path} row {i}: {e}"))
        return out
    try:
        return list(load_task_file(path))
    except TaskLoadError as e:
        return [BrokenTask(path.stem, str(e))]


def dedupe_ids(items: list[Item]) -> list[Item]:
    """Task ids are unique after this: the buffer groups trajectories by id. OSWorld ships a Windows
    twin of a Linux task under the same id (``examples/Windows/excel/ID.json`` beside
    ``examples/libreoffice_calc/ID.json``). Of the items sharing an id, the one whose file is nearest
    the folder's root keeps it (then path order); each other becomes ``<id>~2``, ``<id>~3``..., with
    a warning naming both files and its original id and the file it collided with in ``extra``.
    The same files always give the same ids."""
    def where(i: Item) -> str:
        return getattr(i, "source", "") or ""

    groups: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        groups.setdefault(item.id, []).append(n)
    taken = set(groups)
    out = list(items)
    for tid, idx in groups.items():
        if len(idx) < 2:
            continue
        order = sorted(idx, key=lambda n: (len(Path(where(items[n])).parts), where(items[n]), n))
        keeper = items[order[0]]
        k = 2
        for n in order[1:]:
            while f"{tid}~{k}" in taken:
                k += 1
            new = f"{tid}~{k}"
            taken.add(new)
            item = items[n]
            logger.warning("task id {!r} of {} is also the id of {}: loaded as {!r}", tid, where(item) or "?",
                           where(keeper) or "?", new)
            if isinstance(item, Task):
                out[n] = dataclasses.replace(item, id=new, extra={**item.extra, "original_id": tid,
                                                                  "duplicate_of": where(keeper)})
            else:
                out[n] = BrokenTask(new, item.reason)
    return out


def load_items(source: str | list[Task]) -> list[Item]:
    if isinstance(source, list):
        return dedupe_ids(list(source))
    if source == "builtin":
        return list(builtin_tasks())
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"task source {source!r} does not exist")
    return dedupe_ids(_load_path(path))


class TaskSource:
    """Tasks for one scheduler: sharded by (rank, world_size), for ``epochs`` passes (0 = forever).

    Each yielded item's ``key`` is the task id, suffixed ``@e<k>`` from the second epoch on, so
    every epoch's groups are distinct in the buffer.
    """

    def __init__(self, items: list[Item], *, epochs: int = 1, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, ids: list[str] | None = None, limit: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if ids:
            items = [t for t in items if t.id in set(ids)]
        items = items[rank::world_size]
        if limit is not None:
            items = items[:limit]
        self.items = items
        self.epochs, self.shuffle, self.seed = epochs, shuffle, seed

    @classmethod
    def from_config(cls, t: TaskConfig, items: list[Item] | None = None) -> "TaskSource":
        """The tasks of ``t.source`` (or ``items``, loaded from it already), as ``t`` selects them."""
        return cls(items if items is not None else load_items(t.source), epochs=t.epochs, rank=t.rank,
                   world_size=t.world_size, shuffle=t.shuffle, seed=t.seed, ids=t.ids, limit=t.limit)

    def __len__(self) -> int:
        return len(self.items) * max(self.epochs, 1)

    @property
    def finite(self) -> bool:
        return self.epochs > 0

    def __iter__(self) -> Iterator[tuple[str, Item]]:
        epoch = 0
        while self.epochs == 0 or epoch < self.epochs:
            order = list(self.items)
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            for item in order:
                yield (item.id if epoch == 0 else f"{item.id}@e{epoch}"), item
            epoch += 1
            if not self.items:
                return
