"""asyncio.TaskGroup and asyncio.timeout on Python 3.10 (minimal equivalents), and ``side_task``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Coroutine

from loguru import logger

if hasattr(asyncio, "TaskGroup"):
    TaskGroup = asyncio.TaskGroup
else:  # pragma: no cover - exercised only on 3.10
    class TaskGroup:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._tasks: set[asyncio.Task] = set()

        async def __aenter__(self) -> "TaskGroup":
            return self

        def create_task(self, coro, *, name=None):
            t = asyncio.ensure_future(coro)
            self._tasks.add(t)
            return t

        async def __aexit__(self, et, exc, tb) -> None:
            if exc is not None:
                for t in self._tasks:
                    t.cancel()
            try:
                results = await asyncio.gather(*self._tasks, return_exceptions=True)
            except asyncio.CancelledError:
                for t in self._tasks:
                    t.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                raise
            errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
            if errors and exc is None:
                raise errors[0]


if hasattr(asyncio, "timeout"):
    timeout = asyncio.timeout
else:  # pragma: no cover - exercised only on 3.10
    @contextlib.asynccontextmanager
    async def timeout(delay):
        task = asyncio.current_task()
        handle = asyncio.get_running_loop().call_later(delay, task.cancel)
        try:
            yield
        except asyncio.CancelledError as e:
            raise asyncio.TimeoutError() from e
        finally:
            handle.cancel()


@contextlib.asynccontextmanager
async def side_task(coro: Coroutine[Any, Any, Any], name: str, *, grace_s: float = 0.0
                    ) -> AsyncIterator[asyncio.Task]:
    """``coro`` as a task owned by the block (a progress bar, a watcher, a page): at the block's end
    it gets ``grace_s`` to finish, is cancelled, and is awaited either way. Its failure is logged,
    never raised into the block: a side task must not end what it serves. Not a TaskGroup, which
    would also wrap the block's own exceptions in an ExceptionGroup."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    try:
        yield task
    finally:
        if grace_s and not task.done():
            await asyncio.wait({task}, timeout=grace_s)
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, Exception):
            logger.warning("{}: {!r}", name, result)
