#!/usr/bin/env python
"""ServiceLLM against the plain openai client on the same vLLM server, same prompts (one
screenshot each), side by side in one run, at concurrency 1, 8 and 32.

    python scripts/bench_llm.py [--url http://127.0.0.1:8000/v1] [--rounds 3]

Without --url (or $VLLM_SERVER_URL) it starts the tiny model itself and stops it afterwards.
Both sides send identical requests (greedy, the UI-TARS action regex, return_token_ids), rounds
alternate ours/plain to cancel drift (after one warm-up pass over the same prompts, so the
server's prefix cache treats both alike), and the figure per side is the median over rounds.
Last line: JSON with ``overhead_ratio`` (ours / plain throughput, the worst concurrency) and
the per-concurrency figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.rollout.llm import Sampling, ServiceLLM  # noqa: E402
from agentenv.rollout.uitars import ACTION_REGEX  # noqa: E402


CPU = {"ours": 0.0, "plain": 0.0}  # client-side CPU seconds, per side


def messages(i: int) -> list[dict]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1280, 720), (30 + i % 50, 80, 140))
    ImageDraw.Draw(img).rectangle([100 + i % 200, 100, 600, 400], fill=(240, 240, 240))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": f"Task {i}: click the white box."},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


async def run_ours(llm: ServiceLLM, prompts, conc: int, sampling: Sampling) -> tuple[float, int]:
    sem = asyncio.Semaphore(conc)
    tokens = 0

    async def one(i, m):
        nonlocal tokens
        async with sem:
            c = await llm.chat(m, sampling, session=f"s{i}")
            tokens += len(c.token_ids)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*[one(i, m) for i, m in enumerate(prompts)])
    CPU["ours"] += time.process_time() - c0
    return time.perf_counter() - t0, tokens


async def run_plain(client, model: str, prompts, conc: int, sampling: Sampling) -> tuple[float, int]:
    sem = asyncio.Semaphore(conc)
    tokens = 0

    async def one(m):
        nonlocal tokens
        async with sem:
            r = await client.chat.completions.create(
                model=model, messages=m, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                extra_body={"return_token_ids": True, "structured_outputs": {"regex": sampling.regex}})
            tokens += len(r.model_dump()["choices"][0]["token_ids"])

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*[one(m) for m in prompts])
    CPU["plain"] += time.process_time() - c0
    return time.perf_counter() - t0, tokens


async def bench(url: str, model: str, rounds: int) -> dict:
    import httpx
    import openai

    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=40, regex=ACTION_REGEX)
    ours = ServiceLLM(url, model, timeout_s=120)
    plain = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0,
                               timeout=httpx.Timeout(120, connect=5))
    results = {}
    try:
        await run_ours(ours, [messages(0)] * 4, 4, sampling)  # warm up both paths
        await run_plain(plain, model, [messages(0)] * 4, 4, sampling)
        for conc in (1, 8, 32):
            n = 16 if conc == 1 else 6 * conc
            prompts = [messages(i) for i in range(n)]
            await run_plain(plain, model, prompts, conc, sampling)  # warm the prefix cache for both
            CPU.update(ours=0.0, plain=0.0)
            o_rps, p_rps, o_tps, p_tps = [], [], [], []
            for r in range(rounds):
                order = [("ours", run_ours(ours, prompts, conc, sampling)),
                         ("plain", run_plain(plain, model, prompts, conc, sampling))]
                if r % 2:
                    order.reverse()
                for name, coro in order:
                    dt, toks = await coro
                    (o_rps if name == "ours" else p_rps).append(n / dt)
                    (o_tps if name == "ours" else p_tps).append(toks / dt)
            res = {"ours_rps": statistics.median(o_rps), "plain_rps": statistics.median(p_rps),
                   "ours_tok_s": statistics.median(o_tps), "plain_tok_s": statistics.median(p_tps)}
            res["ratio"] = res["ours_rps"] / res["plain_rps"]
            res["ours_client_cpu_ms_per_req"] = CPU["ours"] / (rounds * n) * 1000
            res["plain_client_cpu_ms_per_req"] = CPU["plain"] / (rounds * n) * 1000
            results[conc] = {k: round(v, 3) for k, v in res.items()}
            print(f"concurrency {conc:2d}: ours {res['ours_rps']:.2f} req/s {res['ours_tok_s']:.0f} tok/s | "
                  f"plain {res['plain_rps']:.2f} req/s {res['plain_tok_s']:.0f} tok/s | ratio {res['ratio']:.3f} | "
                  f"client CPU/request ours {res['ours_client_cpu_ms_per_req']:.1f} ms, "
                  f"plain {res['plain_client_cpu_ms_per_req']:.1f} ms",
                  flush=True)
    finally:
        await ours.aclose()
        await plain.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("VLLM_SERVER_URL"))
    ap.add_argument("--model", default=os.environ.get("VLLM_MODEL_NAME", "tiny-uitars"))
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    svc = None
    if not a.url:
        from agentenv.services import VLLMService

        svc = VLLMService(port=18500).start()
        a.url, a.model = svc.url, svc.model
    try:
        results = asyncio.run(bench(a.url, a.model, a.rounds))
    finally:
        if svc is not None:
            svc.stop()
    print(json.dumps({"overhead_ratio": round(min(r["ratio"] for r in results.values()), 3),
                      "by_concurrency": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
