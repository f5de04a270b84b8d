"""In-process vLLM engines: a synchronous ``vllm.LLM`` (worker thread, batched calls) and vLLM's
async engine. Both render chats with the model's own processor and keep the engine's token ids.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import queue
import threading
import time
from typing import Any

from agentenv.rollout.llm.base import LLM, Completion, LLMError, Messages, Sampling


def _vllm_sampling(sampling: Sampling):
    from vllm import SamplingParams

    kw: dict[str, Any] = dict(temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_tokens, seed=sampling.seed,
                              stop=sampling.stop, logprobs=0 if sampling.logprobs else None)
    if sampling.regex:
        from vllm.sampling_params import StructuredOutputsParams

        kw["structured_outputs"] = StructuredOutputsParams(regex=sampling.regex)
    return SamplingParams(**kw)


def _completion_from_vllm(out: Any, latency: float, endpoint: str) -> Completion:
    o = out.outputs[0]
    logprobs = None
    if o.logprobs is not None:
        logprobs = [float(d[t].logprob) for d, t in zip(o.logprobs, o.token_ids)]
    return Completion(text=o.text, prompt_token_ids=list(out.prompt_token_ids),
                      token_ids=list(o.token_ids), finish_reason=o.finish_reason or "",
                      logprobs=logprobs, latency_s=latency, endpoint=endpoint)


class InProcessLLM(LLM):
    """A synchronous ``vllm.LLM`` in this process.

    ``vllm.LLM`` blocks and is not thread-safe, so one worker thread owns it. Calls that arrive
    while it is busy are queued and handed to ``LLM.chat`` together as one batch, which is how
    the engine wants them; a batch that fails is split so one bad prompt fails only its own call.
    The chat template and image processing are the engine's own.
    """

    def __init__(self, llm: Any, *, max_batch: int = 64, mm_processor_kwargs: dict | None = None):
        self.llm = llm
        self.max_batch = max_batch
        self.mm_processor_kwargs = mm_processor_kwargs
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="agentenv-vllm", daemon=True)
                self._thread.start()

    def _worker(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            t0 = time.perf_counter()
            results = self._generate(batch)
            latency = time.perf_counter() - t0
            for (_, _, loop, fut), res in zip(batch, results):
                loop.call_soon_threadsafe(_settle, fut, res, latency)

    def _generate(self, batch: list[tuple]) -> list[Any]:
        """Outputs (or the exception) per call. A batch that fails is retried call by call, so
        one bad prompt fails only its own caller."""
        kw = {"mm_processor_kwargs": self.mm_processor_kwargs} if self.mm_processor_kwargs else {}
        try:
            return list(self.llm.chat([b[0] for b in batch], [_vllm_sampling(b[1]) for b in batch],
                                      use_tqdm=False, **kw))
        except Exception as e:
            if len(batch) == 1:
                return [e]
        return [r for b in batch for r in self._generate([b])]

    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion:
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((messages, sampling or Sampling(), loop, fut))
        out, latency = await fut
        return _completion_from_vllm(out, latency, "in-process")

    async def aclose(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)


def _settle(fut: asyncio.Future, res: Any, latency: float) -> None:
    if fut.done():
        return
    if isinstance(res, BaseException):
        fut.set_exception(LLMError("in-process", f"{type(res).__name__}: {res}", retryable=False))
    else:
        fut.set_result((res, latency))


class AsyncEngineLLM(LLM):
    """vLLM's async engine (``vllm.v1.engine.async_llm.AsyncLLM``) in this event loop.

    The engine takes prompts, not chats, so the model's own processor renders the chat and the
    images travel as ``multi_modal_data``.
    """

    _ids = itertools.count()

    def __init__(self, engine: Any, processor: Any = None, *, mm_processor_kwargs: dict | None = None):
        self.engine = engine
        self.mm_processor_kwargs = mm_processor_kwargs
        if processor is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(engine.model_config.model)
        self.processor = processor

    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion:
        text, images = render_chat(self.processor, messages)
        prompt: dict[str, Any] = {"prompt": text}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        if self.mm_processor_kwargs:
            prompt["mm_processor_kwargs"] = self.mm_processor_kwargs
        t0 = time.perf_counter()
        final = None
        async for out in self.engine.generate(prompt, _vllm_sampling(sampling or Sampling()),
                                              request_id=f"agentenv-{next(self._ids)}"):
            final = out
        if final is None:
            raise LLMError("async-engine", "the engine returned no output")
        return _completion_from_vllm(final, time.perf_counter() - t0, "async-engine")

    async def aclose(self) -> None:
        return None


def hf_messages(messages: Messages, images: dict[str, Any] | None = None) -> tuple[Messages, list[Any]]:
    """Chat messages in OpenAI format -> (the same in the processor's format, with each image as a
    PIL image block; the images in order). ``images`` caches decoded images by data URL, so the
    turns of one conversation share the very same image objects."""
    from PIL import Image

    cache = {} if images is None else images
    found: list[Any] = []
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append(m)
            continue
        parts = []
        for part in content:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if not url.startswith("data:"):
                    raise ValueError("images must be data: URLs here (the engine is in this process)")
                img = cache.get(url)
                if img is None:
                    img = cache[url] = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                found.append(img)
                parts.append({"type": "image", "image": img})
            else:
                parts.append(part)
        out.append({"role": m["role"], "content": parts})
    return out, found


def render_chat(processor: Any, messages: Messages) -> tuple[str, list[Any]]:
    """Chat messages in OpenAI format -> (prompt text, PIL images in order)."""
    hf, images = hf_messages(messages)
    return processor.apply_chat_template(hf, tokenize=False, add_generation_prompt=True), images
