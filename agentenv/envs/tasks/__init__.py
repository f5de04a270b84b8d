"""Tasks: OSWorld task JSON, the built-in suite, setup steps and evaluators."""

from __future__ import annotations

import json
from pathlib import Path

from agentenv.types import Task

BUILTIN_DIR = Path(__file__).parent / "builtin"


class TaskLoadError(ValueError):
    """A task file does not parse or lacks required fields; the message names the file."""


class NotATask(TaskLoadError):
    """A JSON file in a task folder that is not a task: OSWorld's index files (``test_all.json``:
    {domain: [task ids]}). Folders skip them."""


def is_index(data: object) -> bool:
    return isinstance(data, dict) and "id" not in data and bool(data) and all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in data.values())


def load_task_file(path: str | Path) -> list[Task]:
    """One OSWorld task JSON object, or a list of them, from a file (UTF-8 with or without a BOM,
    any line endings)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...
        raise TaskLoadError(f"{path}: {e}") from e
    if is_index(data):
        raise NotATask(f"{path}: an index of task ids ({len(data)} groups), not a task")
    items = data if isinstance(data, list) else [data]
    tasks = []
    for i, d in enumerate(items):
        try:
            tasks.append(Task.from_dict(d, source=str(path)))
        except ValueError as e:
            raise TaskLoadError(f"{path}[{i}]: {e}") from e
    return tasks


def builtin_tasks() -> list[Task]:
    return load_task_file(BUILTIN_DIR / "suite.json")
