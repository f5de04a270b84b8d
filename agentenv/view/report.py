"""``agentenv view RUN_DIR``: a self-contained HTML report of a run, in ``RUN_DIR/report/``.

One overview page (numbers, plots, every task, recent failures, the determinism table of any
replays) and one page per task with its group's samples side by side, step by step: screenshot
with the action drawn on it, thought, raw reply, tokens, latencies, policy version; the final
screen, reward, status and reason; a replay's screenshots and divergence next to the original.

Opens from disk: no server, no CDN, nothing fetched from outside the run directory (screenshots
are linked from ``RUN_DIR/screenshots``; large ones get JPEG thumbnails, cached between builds).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from agentenv.rollout.buffer import read_trajectories
from agentenv.types import Trajectory
from agentenv.view import model, plots
from agentenv.view.runinfo import RunInfo, load_run_info, load_tasks

HERE = Path(__file__).parent
THUMB_WIDTH = 400          # thumbnails are this wide
THUMB_OVER = 800           # screenshots wider than this get a thumbnail; smaller ones are shown as they are
REPLAYS = "replays"


@dataclass
class Built:
    path: Path             # the overview page
    pages: int
    thumbnails: int        # made by this build (cached ones are not counted)
    seconds: float
    bytes: int             # the report folder's size on disk (screenshots are not in it)


def load_replays(run_dir: Path) -> dict[tuple[str, int], model.ReplayResult]:
    out: dict[tuple[str, int], model.ReplayResult] = {}
    for p in sorted((run_dir / REPLAYS).glob("*/*/replay.json")):
        try:
            r = model.ReplayResult.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError) as e:
            logger.warning("skipping replay record {}: {}", p, e)
            continue
        out[(r.task_id, r.sample)] = r
    return out


# ------------------------------------------------------------------ thumbnails
def _make_thumb(job: tuple[str, str]) -> bool:
    from PIL import Image

    src, dst = job
    try:
        with Image.open(src) as img:
            img.thumbnail((THUMB_WIDTH, THUMB_WIDTH * 4), Image.Resampling.BILINEAR, reducing_gap=2.0)
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(dst, "JPEG", quality=80)
        return True
    except OSError:
        return False


class Images:
    """Where each screenshot is shown from: the file itself, or its thumbnail when it is large."""

    def __init__(self, run_dir: Path, out: Path):
        self.run_dir, self.out = run_dir, out
        self.jobs: dict[str, str] = {}
        self._big: dict[str, bool] = {}

    def _is_big(self, rel: str) -> bool:
        # One header read per folder (a trajectory's screenshots share a size): never decode here.
        folder = rel.rsplit("/", 1)[0]
        if folder not in self._big:
            from PIL import Image

            try:
                with Image.open(self.run_dir / rel) as img:
                    self._big[folder] = img.size[0] > THUMB_OVER
            except OSError:
                return False
        return self._big[folder]

    def shown(self, rel: str) -> str:
        """The path (relative to the run dir or the report) of the image to put on the page."""
        if not rel or not self._is_big(rel):
            return rel
        thumb = f"thumbs/{rel.rsplit('.', 1)[0]}.jpg"
        dst = self.out / thumb
        src = self.run_dir / rel
        if not (dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime):
            self.jobs[str(src)] = str(dst)
        return "@" + thumb   # '@': relative to the report folder

    def make(self, workers: int | None = None) -> int:
        jobs = list(self.jobs.items())
        if not jobs:
            return 0
        if len(jobs) < 64:
            return sum(map(_make_thumb, jobs))
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 2) as ex:
            return sum(ex.map(_make_thumb, jobs, chunksize=32))


# ------------------------------------------------------------------ page data
def _tokens(t: Trajectory) -> list[int]:
    try:
        return [len(p) for p in t.prompt_ids()]
    except (IndexError, StopIteration, TypeError):  # a row written by another version: show no counts
        return [0] * len(t.steps)


def _link(images: Images, rel: str, up: str) -> dict[str, str]:
    """img (what is shown) and full (what a click opens) for a screenshot, as links from a page."""
    if not rel:
        return {"img": "", "full": ""}
    shown = images.shown(rel)
    img = f"{up}/report/{shown[1:]}" if shown.startswith("@") else f"{up}/{shown}"
    return {"img": img, "full": f"{up}/{rel}"}


def _sample_column(t: Trajectory, info: RunInfo, images: Images, up: str,
                   replay: model.ReplayResult | None) -> dict[str, Any]:
    W, H = model.screen_of(t.env_id, info.screens, info.screen)
    prompt_lens = _tokens(t)
    steps = []
    for i, s in enumerate(t.steps):
        steps.append({
            "index": s.index, **_link(images, s.screenshot, up), "markers": model.action_markers(s.action),
            "summary": model.action_summary(s.action), "action_json": json.dumps(s.action, ensure_ascii=False),
            "thought": s.thought, "text": s.text, "valid": s.valid, "error": s.error,
            "env_error": (s.env_info or {}).get("error", ""), "prompt_tokens": prompt_lens[i] if i < len(prompt_lens) else 0,
            "completion_tokens": len(s.token_ids), "llm": s.llm_latency_s, "env": s.env_latency_s,
            "policy_version": s.policy_version, "finish_reason": s.finish_reason,
            "images_in_prompt": len(s.image_steps),
        })
    final = getattr(t, "final_screenshot", "") or ""
    rsteps: dict[Any, dict[str, Any]] = {}
    if replay is not None:
        for r in replay.steps:
            rsteps["final" if r.final else r.index] = {**_link(images, r.screenshot, up), "r": r}
    return {
        "t": t, "W": W, "H": H, "steps": steps, "final": _link(images, final, up),
        "duration": (t.ended_at - t.started_at) if t.ended_at and t.started_at else 0.0,
        "versions": sorted(set(t.policy_versions)), "replay": replay, "rsteps": rsteps,
        "tokens": sum(len(s.token_ids) for s in t.steps),
    }


# ------------------------------------------------------------------ build
def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["secs"] = lambda v: f"{v:.2f} s" if v < 100 else f"{v:.0f} s"
    env.filters["pct"] = lambda v: f"{100 * v:.1f} %"
    env.globals["status_colors"] = plots.STATUS_COLORS
    return env


def _saved_at(run_dir: Path, t: Trajectory) -> list[float | None]:
    """When each screenshot of ``t`` (and its final one) was saved: the steps' real timestamps."""
    out: list[float | None] = []
    for rel in [s.screenshot for s in t.steps] + [getattr(t, "final_screenshot", "")]:
        try:
            out.append(os.stat(run_dir / rel).st_mtime if rel else None)
        except OSError:
            out.append(None)
    return out


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_report(run_dir: str | Path, *, workers: int | None = None) -> Built:
    """Build ``RUN_DIR/report/`` from the run's trajectories (and replays, if any)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    trajs = read_trajectories(run_dir)
    out = run_dir / "report"
    pages_dir = out / "tasks"
    if pages_dir.exists():
        shutil.rmtree(pages_dir)   # pages of tasks no longer in the run must not linger
    pages_dir.mkdir(parents=True)
    shutil.copy(HERE / "static" / "report.css", out / "report.css")
    info = load_run_info(run_dir)
    tasks = load_tasks(run_dir)
    replays = load_replays(run_dir)
    rows = model.task_rows(trajs)
    ov = model.overview(trajs)
    times = {t.key: model.step_times(t, _saved_at(run_dir, t)) for t in trajs}
    plot_files = plots.all_plots(trajs, rows, ov["statuses"], out / "plots", times) if trajs else {}
    images = Images(run_dir, out)
    env = _env()
    by_task: dict[str, list[Trajectory]] = {}
    for t in trajs:
        by_task.setdefault(t.task_id, []).append(t)
    page = env.get_template("task.html.j2")
    for i, row in enumerate(rows):
        samples = sorted(by_task[row.task_id], key=lambda t: t.sample)
        cols = [_sample_column(t, info, images, "../..", replays.get(t.key)) for t in samples]
        task = tasks.get(model.base_task_id(row.task_id))
        html = page.render(row=row, cols=cols, task=task, depth=max((len(c["steps"]) for c in cols), default=0),
                           prev=rows[i - 1] if i else None, next=rows[i + 1] if i + 1 < len(rows) else None,
                           run_dir=run_dir, info=info)
        (pages_dir / f"{row.page}.html").write_text(html)
    made = images.make(workers)
    cfg = info.config
    fails = model.failures(trajs)
    index = env.get_template("index.html.j2").render(
        run_dir=run_dir, ov=ov, rows=rows, plots=plot_files, fails=fails, info=info, cfg=cfg,
        replays=sorted(replays.values(), key=lambda r: (r.task_id, r.sample)),
        pages={r.task_id: r.page for r in rows}, built=time.strftime("%Y-%m-%d %H:%M:%S"),
        mean_busy=model.mean_busy(*model.busy_series(trajs)))
    (out / "index.html").write_text(index)
    return Built(out / "index.html", len(rows) + 1, made, time.perf_counter() - t0, _dir_size(out))
