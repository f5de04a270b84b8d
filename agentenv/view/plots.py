"""The overview's plots, drawn with matplotlib (Agg) into PNG files next to the report."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from agentenv.types import Trajectory
from agentenv.view import model

STATUS_COLORS = {
    "finished": "#2e7d32", "call_user": "#7cb342", "max_steps": "#f9a825", "invalid": "#ef6c00",
    "timeout": "#8e24aa", "env_error": "#c62828", "llm_error": "#ad1457", "eval_error": "#6a1b9a",
    "error": "#b71c1c", "cancelled": "#757575", "task_error": "#4e342e",
}
MAX_LANES = 64     # more desktops than this: the timeline shows the busy count only
MAX_TASK_BARS = 40


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "figure.dpi": 100, "savefig.bbox": "tight"})
    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, format="png")
    pyplot().close(fig)
    return path.name


def statuses(counts: dict[str, int], path: Path) -> str:
    plt = pyplot()
    names = list(counts)
    fig, ax = plt.subplots(figsize=(5, 0.35 * len(names) + 0.9))
    ax.barh(names, [counts[n] for n in names], color=[STATUS_COLORS.get(n, "#607d8b") for n in names])
    for i, n in enumerate(names):
        ax.text(counts[n], i, f" {counts[n]}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("trajectories")
    ax.set_title("How trajectories ended")
    return _save(fig, path)


def success_by_task(rows: Sequence[model.TaskRow], path: Path) -> str:
    plt = pyplot()
    if len(rows) <= MAX_TASK_BARS:
        fig, ax = plt.subplots(figsize=(5, 0.22 * len(rows) + 1.0))
        ax.barh([r.task_id for r in rows], [r.success for r in rows], color="#1565c0")
        for i, r in enumerate(rows):
            ax.text(r.success, i, f" {round(r.success * r.samples)}/{r.samples}", va="center", fontsize=7)
        ax.set_xlim(0, 1.12)
        ax.invert_yaxis()
        ax.set_xlabel("success rate (reward >= 1)")
        ax.tick_params(axis="y", labelsize=7)
    else:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist([r.success for r in rows], bins=20, range=(0, 1), color="#1565c0")
        ax.set_xlabel(f"success rate per task ({len(rows)} tasks)")
        ax.set_ylabel("tasks")
    ax.set_title("Success rate by task")
    return _save(fig, path)


def rewards(trajs: Sequence[Trajectory], path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist([t.reward for t in trajs], bins=20, color="#00838f")
    ax.set_xlabel("reward")
    ax.set_ylabel("trajectories")
    ax.set_title("Reward distribution")
    return _save(fig, path)


def throughput(trajs: Sequence[Trajectory], times: dict | None, path: Path) -> str:
    plt = pyplot()
    xs, ys = model.throughput(trajs, times)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(xs, ys, color="#283593")
    ax.fill_between(xs, ys, alpha=0.2, color="#283593")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("steps / s")
    ax.set_title("Throughput (steps finished per second)")
    return _save(fig, path)


def timeline(trajs: Sequence[Trajectory], path: Path) -> str:
    """Per desktop, a bar per trajectory coloured by how it ended; under it, desktops busy."""
    plt = pyplot()
    lanes, _ = model.lanes(trajs)
    xs, ys = model.busy_series(trajs)
    show_lanes = 0 < len(lanes) <= MAX_LANES
    if show_lanes:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 0.28 * len(lanes) + 2.4), sharex=True,
                                      gridspec_kw={"height_ratios": [max(1.0, 0.28 * len(lanes)), 1.2]})
        for i, lane in enumerate(lanes):
            ax.broken_barh([(a, max(b - a, 1e-3)) for a, b, _ in lane.spans], (i - 0.4, 0.8),
                           facecolors=[STATUS_COLORS.get(s, "#607d8b") for *_, s in lane.spans],
                           edgecolor="white", linewidth=0.5)
        ax.set_yticks(range(len(lanes)), [lane.env_id.rsplit("/", 1)[-1] for lane in lanes], fontsize=7)
        ax.invert_yaxis()
        ax.set_title("Desktops over time (one bar per trajectory, coloured by status)")
    else:
        fig, ax2 = plt.subplots(figsize=(10, 2.4))
        ax2.set_title(f"Desktops busy over time ({len(lanes)} desktops)")
    ax2.step(xs, ys, where="post", color="#37474f")
    ax2.set_ylabel("busy")
    ax2.set_xlabel("seconds since the run started")
    ax2.set_ylim(bottom=0)
    return _save(fig, path)


def latencies(trajs: Sequence[Trajectory], path: Path) -> str:
    plt = pyplot()
    llm = [s.llm_latency_s for t in trajs for s in t.steps if s.llm_latency_s > 0]
    env = [s.env_latency_s for t in trajs for s in t.steps if s.env_latency_s > 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, xs, what, color in ((axes[0], llm, "model call", "#6a1b9a"), (axes[1], env, "desktop step", "#ef6c00")):
        if xs:
            ax.hist(xs, bins=40, color=color)
        ax.set_xlabel(f"{what} latency (s)")
        ax.set_ylabel("steps")
        ax.set_title(f"{what.capitalize()} latency ({len(xs)} steps)")
    return _save(fig, path)


def all_plots(trajs: Sequence[Trajectory], rows: Sequence[model.TaskRow], counts: dict[str, int],
              out: Path, times: dict | None = None) -> dict[str, str]:
    """Every overview plot into ``out``; returns name -> file name."""
    out.mkdir(parents=True, exist_ok=True)
    return {
        "statuses": statuses(counts, out / "statuses.png"),
        "success": success_by_task(rows, out / "success_by_task.png"),
        "rewards": rewards(trajs, out / "rewards.png"),
        "throughput": throughput(trajs, times, out / "throughput.png"),
        "timeline": timeline(trajs, out / "timeline.png"),
        "latency": latencies(trajs, out / "latency.png"),
    }
