"""asyncio.TaskGroup and asyncio.timeout on Python 3.10 (minimal equivalents)."""

from __future__ import annotations

import asyncio

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
    import contextlib

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
