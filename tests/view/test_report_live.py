"""The live page during a real run, then the report of that run in a real headless Chromium.

A short real run (the tiny model on vLLM, real desktops): the live page answers during it and
shows the desktops busy; the report of the run renders its plots, every step's screenshot with
the action marker at the recorded pixel, links between pages work, and no request leaves the
run directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

import httpx
import pytest

from agentenv.config import LoopConfig, RunConfig, Sampling, SchedulerConfig, ServiceConfig
from agentenv.envs.pool import EnvPool
from agentenv.envs.tasks import builtin_tasks
from agentenv.rollout.agent import UITarsAgent
from agentenv.rollout.buffer import TrajectoryBuffer, read_trajectories
from agentenv.rollout.llm import as_llm
from agentenv.rollout.loop import Rollout
from agentenv.rollout.scheduler import StreamingScheduler
from agentenv.rollout.sources import TaskSource
from agentenv.rollout.uitars import _BOX
from agentenv.view import model
from agentenv.view.live import serve_live
from agentenv.view.report import build_report
from agentenv.view.runinfo import load_run_info, record_run

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
TASK_IDS = ["editor-type-hello", "terminal-mkdir"]
ROLLOUT_N = 2
# Pointer actions (markers to check), typing and keys (badges); never finished: 3 steps each.
REGEX = (r"Thought: [a-z ]{1,12}\nAction: ("
         rf"click\(start_box={_BOX}\)|drag\(start_box={_BOX}, end_box={_BOX}\)"
         r"|type\(content='[a-z]{1,8}'\)|hotkey\(key='ctrl a'\))")


async def _browser(p):
    return await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


@pytest.fixture(scope="module")
async def live_run(vllm_server, env_service, tmp_path_factory, tiny_pixels):
    """Run 2 tasks x 2 samples with the live page on; watch the page in Chromium meanwhile."""
    from playwright.async_api import async_playwright

    out = tmp_path_factory.mktemp("run") / "run"
    by_id = {t.id: t for t in builtin_tasks()}
    tasks = [by_id[i] for i in TASK_IDS]
    spec = ServiceConfig(url=env_service.url, token=env_service.token)
    pool = await EnvPool([spec]).start()
    agent = UITarsAgent(min_pixels=tiny_pixels[0], max_pixels=tiny_pixels[1], wait_s=0.2)
    rollout = Rollout(as_llm(vllm_server.url), agent, Sampling(temperature=1.0, max_tokens=48, regex=REGEX),
                      LoopConfig(max_steps=3))
    sched = StreamingScheduler(rollout, pool, TrajectoryBuffer(out, ROLLOUT_N), TaskSource(tasks),
                               SchedulerConfig(rollout_n=ROLLOUT_N))
    cfg = RunConfig(loop=LoopConfig(max_steps=3), scheduler=SchedulerConfig(rollout_n=ROLLOUT_N))
    await record_run(out, cfg, [spec], tasks)   # as `agentenv run` does
    seen: dict = {"states": [], "browser_busy": [], "shot_status": None, "unauthorized": None}
    try:
        async with serve_live(sched, 0, out) as page, async_playwright() as p:
            base = f"http://127.0.0.1:{page.port}"
            browser = await _browser(p)
            try:
                tab = await browser.new_page()
                await tab.goto((out / "live-url").read_text().strip())   # token -> cookie -> redirect
                seen["url_after_login"] = tab.url
                async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                    seen["unauthorized"] = (await http.get("/api/state")).status_code
                    seen["traversal"] = (await http.get("/shot/../run.json",
                                                        headers={"Authorization": f"Bearer {page.token}"})).status_code
                    # the run starts once the page is open: a slow browser start must not miss it
                    run = asyncio.ensure_future(sched.run())
                    while not run.done():
                        s = (await http.get("/api/state", headers={"Authorization": f"Bearer {page.token}"})).json()
                        seen["states"].append(s)
                        if s["in_flight"] and seen["shot_status"] is None:
                            r = await http.get("/shot/" + s["in_flight"][0]["screenshot"],
                                               headers={"Authorization": f"Bearer {page.token}"})
                            seen["shot_status"] = (r.status_code, r.content[:8])
                        busy = (await tab.inner_text("#busy")).strip()
                        seen["browser_busy"].append(busy)
                        await asyncio.sleep(0.4)
                seen["summary"] = await run
                seen["final_page"] = await tab.inner_text("#trajs")
            finally:
                await browser.close()
    finally:
        await pool.aclose()
        await sched.llm.aclose()
    return out, seen


async def test_live_page_answers_during_a_real_run_and_shows_desktops_busy(live_run):
    out, seen = live_run
    assert seen["summary"]["trajectories"] == len(TASK_IDS) * ROLLOUT_N
    assert seen["unauthorized"] == 401 and seen["traversal"] == 404
    assert "token=" not in seen["url_after_login"]   # the page dropped it from the address bar
    live_url = out / "live-url"
    assert stat.S_IMODE(live_url.stat().st_mode) == 0o600
    # the JSON state and the page in the browser both showed desktops busy while the run went on
    assert max(s["busy"] for s in seen["states"]) >= 1
    assert any(int(b.split("/")[0]) >= 1 for b in seen["browser_busy"] if "/" in b), seen["browser_busy"]
    assert any(s["in_flight"] for s in seen["states"])
    assert seen["shot_status"] == (200, b"\x89PNG\r\n\x1a\n")
    assert seen["states"][-1]["summary"]["trajectories"] >= seen["states"][0]["summary"]["trajectories"]


async def test_report_of_a_real_run_in_chromium(live_run, tmp_path):
    from playwright.async_api import async_playwright

    out, _ = live_run
    built = build_report(out)
    trajs = read_trajectories(out)
    assert built.pages == len(TASK_IDS) + 1
    root = out.resolve().as_uri() + "/"
    requests: list[str] = []
    failed: list[str] = []
    async with async_playwright() as p:
        browser = await _browser(p)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            # a navigation aborts the images still loading on the page it leaves: not a failure
            page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}")
                    if "ERR_ABORTED" not in (r.failure or "") else None)
            await page.goto(built.path.as_uri())
            await page.wait_for_load_state("load")
            # the overview: six plots drawn, numbers, one link per task
            plots = page.locator(".plot img")
            assert await plots.count() == 6
            for i in range(6):
                img = plots.nth(i)
                await img.scroll_into_view_if_needed()
                assert await img.evaluate("i => i.complete && i.naturalWidth > 100"), await img.get_attribute("src")
            assert (await page.inner_text(".cards .card b >> nth=0")).strip() == str(len(trajs))
            await page.set_viewport_size({"width": 1280, "height": 1000})
            await page.evaluate("window.scrollTo(0, 0)")
            await page.screenshot(path=str(tmp_path / "report.png"))
            links = page.locator("a.task-link")
            assert await links.count() == len(TASK_IDS)
            for task_id in TASK_IDS:
                await page.goto(built.path.as_uri())
                await page.click(f"a.task-link:text-is('{task_id}')")
                await page.wait_for_load_state("load")
                assert page.url.endswith(f"/tasks/{model.slug(task_id)}.html")
                await _check_task_page(page, [t for t in trajs if t.task_id == task_id])
                await page.evaluate("window.scrollTo(0, 0)")
                await page.screenshot(path=str(tmp_path / f"report-{task_id}.png"))
                await page.click("a.up")   # back to the overview
                assert page.url.endswith("/index.html#tasks")
        finally:
            await browser.close()
    docs = os.environ.get("AGENTENV_REPORT_SCREENSHOTS")   # the README's pictures: a folder
    if docs:
        shutil.copy(tmp_path / "report.png", Path(docs) / "report.png")
        shutil.copy(tmp_path / f"report-{TASK_IDS[0]}.png", Path(docs) / "report-task.png")
    assert requests and not failed, failed
    outside = [u for u in requests if not u.startswith(root)]
    assert outside == [], outside


def page_run_dir(page) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(page.url).path)).parents[2]   # RUN_DIR/report/tasks/x.html


async def _check_task_page(page, trajs) -> None:
    assert len(trajs) == ROLLOUT_N
    info = load_run_info(trajs and page_run_dir(page))
    for t in trajs:
        W, H = model.screen_of(t.env_id, info.screens, info.screen)
        assert info.known and t.env_id in info.screens
        assert (await page.inner_text(f"#s{t.sample}")).count(t.status.value) >= 1
        for s in t.steps:
            card = page.locator(f"article.step[data-sample='{t.sample}'][data-step='{s.index}']")
            assert await card.count() == 1
            img = card.locator("figure.shot img")
            await img.scroll_into_view_if_needed()
            await page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=await img.element_handle())
            box = await img.bounding_box()
            markers = model.action_markers(s.action)
            for m in markers:
                if m.kind == "point":
                    el = card.locator("circle.marker").first
                    c = await el.bounding_box()
                    cx, cy = c["x"] + c["width"] / 2, c["y"] + c["height"] / 2
                    assert abs(cx - (box["x"] + m.x / W * box["width"])) <= 1.0, (s.action, c, box)
                    assert abs(cy - (box["y"] + m.y / H * box["height"])) <= 1.0, (s.action, c, box)
                elif m.kind == "drag":
                    line = card.locator("line.marker")
                    x1, y1 = float(await line.get_attribute("x1")), float(await line.get_attribute("y1"))
                    assert (x1, y1) == (m.x, m.y)
                    ends = await card.locator("circle.marker-end").bounding_box()
                    ex, ey = ends["x"] + ends["width"] / 2, ends["y"] + ends["height"] / 2
                    assert abs(ex - (box["x"] + m.x2 / W * box["width"])) <= 1.0
                    assert abs(ey - (box["y"] + m.y2 / H * box["height"])) <= 1.0
                elif m.kind in ("text", "keys"):
                    assert m.label in await card.locator(".badges").inner_text()
            assert s.thought in await card.inner_text()
        final = page.locator(f"#s{t.sample}-final figure.shot img")
        await final.scroll_into_view_if_needed()
        await page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=await final.element_handle())
