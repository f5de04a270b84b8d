"""TaskSource: where the scheduler's tasks come from (list, OSWorld folder, JSON, JSONL, parquet).

A task that does not load is not dropped: it becomes a ``BrokenTask`` and the scheduler records
it as a ``task_error`` group with the reason, while the other tasks run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from agentenv.envs.tasks import TaskLoadError, builtin_tasks, load_task_file
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
            out.extend(_load_path(f))
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


def load_items(source: str | list[Task]) -> list[Item]:
    if isinstance(source, list):
        return list(source)
    if source == "builtin":
        return list(builtin_tasks())
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"task source {source!r} does not exist")
    return _load_path(path)


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
