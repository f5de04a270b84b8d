"""Tasks: OSWorld task JSON, the built-in suite, setup steps and evaluators."""

from __future__ import annotations

import json
from pathlib import Path

from agentenv.types import Task

BUILTIN_DIR = Path(__file__).parent / "builtin"


class TaskLoadError(ValueError):
    """A task file does not parse or lacks required fields; the message names the file."""


def load_task_file(path: str | Path) -> list[Task]:
    """One OSWorld task JSON object, or a list of them, from a file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...
        raise TaskLoadError(f"{path}: {e}") from e
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
