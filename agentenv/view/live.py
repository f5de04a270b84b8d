"""The live page of a running ``agentenv run`` (``output.live_port``): progress, throughput,
desktops busy, the latest screenshot of every trajectory in flight, recent failures with their
reasons, refreshed every two seconds. Loopback only, bearer token like the env service.

The token is never printed or logged: the page's URL with its token is written to
``RUN_DIR/live-url`` (mode 600). A browser opens that URL once; the page then keeps the token in
an HttpOnly cookie and drops it from the address bar. Scripts send ``Authorization: Bearer``.

The page is one of the scheduler's ``listeners``: it hears of each screenshot saved (the latest
of every trajectory in flight) and of each trajectory that finishes. ``serve_live`` runs the
server and a sampler in the caller's event loop and stops both on exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Request   # at module level: the routes' annotations are resolved from here
from loguru import logger

from agentenv.compat import TaskGroup, side_task
from agentenv.types import Status, Trajectory
from agentenv.view import plots

HERE = Path(__file__).parent
COOKIE = "agentenv_live"
HISTORY = 3600           # samples kept (one a second: the last hour)


@dataclasses.dataclass
class InFlight:
    task_id: str
    sample: int
    step: str
    screenshot: str
    at: float
    env_id: str


class LivePage:
    """State and routes of the live page over a running ``StreamingScheduler``."""

    def __init__(self, sched: Any, run_dir: str | Path | None, *, token: str | None = None, recent: int = 50,
                 total_groups: int | None = None):
        self.sched = sched
        self.run_dir = Path(run_dir).resolve() if run_dir else None
        self.token = token or os.environ.get("AGENTENV_LIVE_TOKEN") or secrets.token_urlsafe(24)
        self.total_groups = total_groups
        self.in_flight: dict[tuple[str, int], InFlight] = {}
        self.finished: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self.failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self.history: collections.deque[tuple[float, int, int, int]] = collections.deque(maxlen=HISTORY)
        self.t0 = time.time()
        self._plot: tuple[float, bytes] = (0.0, b"")
        self._stop = asyncio.Event()
        self.server: Any = None
        self.port: int | None = None

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        self.sched.listeners.append(self)

    def detach(self) -> None:
        if self in self.sched.listeners:
            self.sched.listeners.remove(self)

    def on_screenshot(self, traj: Trajectory, name: str, path: str) -> None:
        if path:
            self.in_flight[traj.key] = InFlight(traj.task_id, traj.sample, name, path, time.time(), traj.env_id)

    def on_finished(self, traj: Trajectory) -> None:
        self.in_flight.pop(traj.key, None)
        row = {"task": traj.task_id, "sample": traj.sample, "status": traj.status.value, "reward": traj.reward,
               "reason": traj.reason, "steps": len(traj.steps), "at": traj.ended_at or time.time()}
        self.finished.appendleft(row)
        if traj.status not in (Status.FINISHED, Status.CALL_USER, Status.MAX_STEPS):
            self.failures.appendleft(row)

    # ------------------------------------------------------------------ state
    def sample(self) -> None:
        s = self.sched
        self.history.append((time.time(), s.stats.steps, s.pool.busy, s.buffer.trajectories_done))

    def _rate(self, window: float = 10.0) -> float:
        if len(self.history) < 2:
            return 0.0
        t1, n1 = self.history[-1][0], self.history[-1][1]
        older = [h for h in self.history if t1 - h[0] >= window]
        t0, n0 = (older[-1][0], older[-1][1]) if older else (self.history[0][0], self.history[0][1])
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def state(self) -> dict[str, Any]:
        s = self.sched
        summary = s.summary()
        now = time.time()
        shots = sorted(self.in_flight.values(), key=lambda f: -f.at)
        return {
            "now": now, "elapsed_s": now - self.t0, "summary": summary,
            "groups_total": self.total_groups, "steps_per_s_now": round(self._rate(), 3),
            "desktops": s.pool.size, "busy": s.pool.busy, "llm_in_flight": s.stats.llm_in_flight,
            "paused": s.paused, "stopping": s.stopping, "admitted": s.stats.admitted,
            "in_flight": [{**dataclasses.asdict(f), "age_s": round(now - f.at, 1),
                           "env": f.env_id.rsplit("/", 1)[-1]} for f in shots],
            "finished": list(self.finished)[:20], "failures": list(self.failures)[:20],
        }

    def plot_png(self) -> bytes:
        """Steps/s and desktops busy over the run so far (redrawn at most every 2 s)."""
        if time.monotonic() - self._plot[0] < 2.0 and self._plot[1]:
            return self._plot[1]
        import io

        plt = plots.pyplot()
        h = list(self.history)
        fig, ax = plt.subplots(figsize=(8, 2.6))
        if len(h) > 1:
            xs = [(t - h[0][0]) for t, *_ in h[1:]]
            rate = [(b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else 0.0 for a, b in zip(h, h[1:])]
            k = 5   # a 5-sample moving average: one-second counts are jumpy
            smooth = [sum(rate[max(0, i - k + 1):i + 1]) / len(rate[max(0, i - k + 1):i + 1]) for i in range(len(rate))]
            ax.plot(xs, smooth, color="#283593", label="steps/s")
            ax2 = ax.twinx()
            ax2.step(xs, [b[2] for b in h[1:]], where="post", color="#ef6c00", label="desktops busy")
            ax2.set_ylim(0, max(1, self.sched.pool.size) + 0.5)
            ax2.set_ylabel("desktops busy", color="#ef6c00")
        ax.set_xlabel("seconds since the page started")
        ax.set_ylabel("steps / s", color="#283593")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        self._plot = (time.monotonic(), buf.getvalue())
        return self._plot[1]

    # ------------------------------------------------------------------ HTTP
    def app(self):
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        page = Environment(loader=FileSystemLoader(HERE / "templates"),
                           autoescape=select_autoescape(["html", "j2"])).get_template("live.html.j2")
        app = FastAPI(title="agentenv live", docs_url=None, redoc_url=None, openapi_url=None)
        expected = f"Bearer {self.token}".encode()

        def authorized(request: Request) -> bool:
            given = request.headers.get("authorization", "")
            if given and secrets.compare_digest(given.encode(), expected):
                return True
            cookie = request.cookies.get(COOKIE, "")
            return bool(cookie) and secrets.compare_digest(cookie.encode(), self.token.encode())

        def check(request: Request) -> None:
            if not authorized(request):
                raise HTTPException(401, "missing or wrong token (open the URL in the run's live-url file)",
                                    headers={"WWW-Authenticate": "Bearer"})

        @app.get("/")
        def index(request: Request, token: str | None = None):
            if token is not None:
                if not secrets.compare_digest(token.encode(), self.token.encode()):
                    raise HTTPException(401, "wrong token")
                r = RedirectResponse("/", status_code=303)   # keep the token out of the address bar
                r.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                return r
            check(request)
            return HTMLResponse(page.render(run_dir=str(self.run_dir or "(not saved)"), state=self.state()))

        @app.get("/api/state")
        def api_state(request: Request):
            check(request)
            return JSONResponse(self.state())

        @app.get("/plot.png")
        def plot(request: Request):
            check(request)
            return Response(self.plot_png(), media_type="image/png", headers={"Cache-Control": "no-store"})

        @app.get("/shot/{path:path}")
        def shot(path: str, request: Request):
            check(request)
            if self.run_dir is None:
                raise HTTPException(404, "screenshots are not saved in this run")
            p = (self.run_dir / path).resolve()
            if not p.is_relative_to(self.run_dir / "screenshots") or not p.is_file():
                raise HTTPException(404, "no such screenshot")
            return FileResponse(p, media_type="image/png")

        return app

    async def serve(self, sock: socket.socket) -> None:
        """Serve on ``sock`` and sample the state every second until ``stop()``."""
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):   # the run owns SIGINT/SIGTERM, not the page
                yield

        self.server = _Server(uvicorn.Config(self.app(), log_level="warning", lifespan="off", access_log=False,
                                             timeout_graceful_shutdown=2))

        async def sampler() -> None:
            while True:
                self.sample()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                    return

        async with TaskGroup() as tg:
            tg.create_task(self.server.serve(sockets=[sock]))
            tg.create_task(sampler())

    @property
    def started(self) -> bool:
        return self.server is not None and self.server.started

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.should_exit = True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


@contextlib.asynccontextmanager
async def serve_live(sched: Any, port: int | None, run_dir: str | Path | None, *,
                     token: str | None = None) -> AsyncIterator[LivePage | None]:
    """The live page for the duration of the block (nothing when ``port`` is None). A port that is
    taken is logged and the run goes on without the page."""
    if port is None:
        yield None
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        logger.error("live page: cannot listen on 127.0.0.1:{} ({}); the run goes on without it", port, e)
        yield None
        return
    total = None
    with contextlib.suppress(TypeError, AttributeError):
        total = len(sched.source) if sched.source.finite else None
    page = LivePage(sched, run_dir, token=token, total_groups=total)
    page.attach()
    try:
        async with side_task(page.serve(sock), "live page", grace_s=5.0) as task:  # failures logged only
            try:
                yield await _started(page, task, sock, run_dir)
            finally:
                page.stop()  # a graceful shutdown (side_task gives it 5 s), else the task is cancelled
    finally:
        sock.close()
        page.detach()


async def _started(page: LivePage, task: asyncio.Task, sock: socket.socket,
                   run_dir: str | Path | None) -> LivePage | None:
    """The page once its server listens (its URL written and logged), or None if it did not start."""
    for _ in range(100):   # up to 10 s for the server to start
        if page.started or task.done():
            break
        await asyncio.sleep(0.1)
    if not page.started:
        logger.error("live page: the server did not start{}; the run goes on without it",
                     f" ({task.exception()!r})" if task.done() and not task.cancelled() and task.exception() else "")
        return None
    page.port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{page.port}/?token={page.token}"
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        _write_private(Path(run_dir) / "live-url", url + "\n")
        logger.info("live page on http://127.0.0.1:{}/ (open the URL in {}, which holds its token)", page.port,
                    Path(run_dir) / "live-url")
    else:
        logger.info("live page on http://127.0.0.1:{}/ (its token: $AGENTENV_LIVE_TOKEN)", page.port)
    return page
