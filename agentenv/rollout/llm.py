"""One async LLM protocol, ``chat(messages, sampling) -> Completion``, and its adapters.

``as_llm(obj)`` picks the adapter by what the object can do (duck typing):

- a URL string or a list of URLs         -> ServiceLLM (OpenAI-compatible vLLM servers)
- an OpenAI / AsyncOpenAI client          -> ServiceLLM around that client
- an object with ``generate_with_messages`` -> WrapperLLM
- ``vllm.LLM`` (synchronous, in-process)  -> InProcessLLM (worker thread, batched calls)
- vLLM's async engine (``AsyncLLM``)      -> AsyncEngineLLM
- something that already speaks ``chat``  -> itself

RL needs the token ids the server actually produced, so every adapter returns them from the
engine (``return_token_ids`` over HTTP); text is never re-tokenized.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx
from loguru import logger

Messages = list[dict[str, Any]]


@dataclass
class Sampling:
    """Sampling settings for one call. ``regex`` constrains the reply (vLLM structured outputs)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    logprobs: bool = False
    regex: str | None = None
    stop: list[str] | None = None


@dataclass
class Completion:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str = ""
    logprobs: list[float] | None = None
    latency_s: float = 0.0
    endpoint: str = ""


class LLMError(RuntimeError):
    """An LLM call failed. ``endpoint`` says where, ``reason`` what the server or network said."""

    def __init__(self, endpoint: str, reason: str, status: int | None = None, retryable: bool = True):
        self.endpoint, self.reason, self.status, self.retryable = endpoint, reason, status, retryable
        where = f"{endpoint}: " if endpoint else ""
        code = f"HTTP {status}: " if status else ""
        super().__init__(f"{where}{code}{reason}")


class LLMRequestError(LLMError):
    """The server refused the request (4xx). Not retried: the same request fails again."""

    def __init__(self, endpoint: str, reason: str, status: int | None = None):
        super().__init__(endpoint, reason, status, retryable=False)


class LLMUnavailableError(LLMError):
    """No endpoint answered within the retry budget."""


@runtime_checkable
class LLM(Protocol):
    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion: ...

    async def aclose(self) -> None: ...


# ----------------------------------------------------------------------------- HTTP service


@dataclass
class _Endpoint:
    url: str                    # base URL ending in /v1
    client: Any                 # openai.AsyncOpenAI (or a sync OpenAI wrapped by to_thread)
    is_async: bool = True
    in_flight: int = 0
    down_until: float = 0.0     # monotonic time before which the endpoint is not tried
    failures: int = 0
    served: int = 0
    requests: int = 0           # requests sent, successful or not

    @property
    def root(self) -> str:
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url


def _normalize_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"LLM endpoint must be an http(s) URL, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class ServiceLLM:
    """OpenAI-compatible vLLM servers, one or many.

    Routing: the turns of one trajectory (``session``) stick to one endpoint so its prefix cache
    hits; a new session goes to the endpoint with the fewest requests in flight. A connection
    error, timeout or 5xx marks the endpoint down for ``down_s`` and retries elsewhere with
    backoff; an endpoint whose down time passed is health-checked (``/health``) before use.
    4xx is not retried and raises ``LLMRequestError`` naming the endpoint.
    """

    def __init__(
        self,
        endpoints: str | list[str] | Any,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        down_s: float = 5.0,
        mm_processor_kwargs: dict[str, Any] | None = None,
        max_sessions: int = 100_000,
    ):
        import openai

        self.model = model or os.environ.get("VLLM_MODEL_NAME") or None
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_retries, self.backoff_s, self.down_s = max_retries, backoff_s, down_s
        self.mm_processor_kwargs = mm_processor_kwargs
        self._sessions: dict[str, _Endpoint] = {}
        self._max_sessions = max_sessions
        self._model_lock = asyncio.Lock()
        key = api_key or os.environ.get("VLLM_API_KEY") or "EMPTY"
        if isinstance(endpoints, str):
            endpoints = [u for u in endpoints.split(",") if u.strip()]
        if isinstance(endpoints, (list, tuple)):
            if not endpoints:
                raise ValueError("ServiceLLM needs at least one endpoint URL")
            self._endpoints = [
                _Endpoint(url=(u := _normalize_url(e)),
                          client=openai.AsyncOpenAI(base_url=u, api_key=key, timeout=self.timeout,
                                                    max_retries=0))
                for e in endpoints
            ]
        else:  # an OpenAI or AsyncOpenAI client given by the caller
            client = endpoints
            is_async = asyncio.iscoroutinefunction(client.chat.completions.create)
            self._endpoints = [_Endpoint(url=str(client.base_url).rstrip("/"), client=client,
                                         is_async=is_async)]

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._endpoints]

    def stats(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {e.url: {"in_flight": e.in_flight, "served": e.served, "failures": e.failures,
                        "requests": e.requests, "up": e.failures == 0 and e.down_until <= now}
                for e in self._endpoints}

    async def _healthy(self, ep: _Endpoint) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0) as http:
                r = await http.get(ep.root + "/health")
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def _mark_down(self, ep: _Endpoint) -> None:
        ep.failures += 1
        ep.down_until = time.monotonic() + self.down_s
        for s in [s for s, e in self._sessions.items() if e is ep]:
            del self._sessions[s]

    async def _pick(self, session: str | None, exclude: set[int]) -> _Endpoint | None:
        if session is not None:
            ep = self._sessions.get(session)
            if ep is not None and id(ep) not in exclude and ep.down_until <= time.monotonic():
                return ep
        now = time.monotonic()
        up = [e for e in self._endpoints if e.down_until <= now and id(e) not in exclude]
        # Endpoints back from their down time get one health probe before they take traffic.
        for e in up:
            if e.failures and not await self._healthy(e):
                e.down_until = time.monotonic() + self.down_s
        up = [e for e in up if e.down_until <= time.monotonic()]
        if not up:
            return None
        for e in up:
            if e.failures:
                logger.info("LLM endpoint {} is back up", e.url)
                e.failures = 0
        ep = min(up, key=lambda e: (e.in_flight, e.served))
        if session is not None:
            if len(self._sessions) >= self._max_sessions:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session] = ep
        return ep

    async def _model_name(self, ep: _Endpoint) -> str:
        if self.model:
            return self.model
        async with self._model_lock:
            if not self.model:
                models = await ep.client.models.list() if ep.is_async else \
                    await asyncio.to_thread(ep.client.models.list)
                self.model = models.data[0].id
        return self.model

    def release_session(self, session: str) -> None:
        """Forget a finished trajectory's endpoint binding."""
        self._sessions.pop(session, None)

    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion:
        import openai

        sampling = sampling or Sampling()
        tried: set[int] = set()
        last: LLMError | None = None
        for attempt in range(self.max_retries + 1):
            ep = await self._pick(session, tried)
            if ep is None:
                tried.clear()  # every endpoint failed once: wait, then try them all again
                await asyncio.sleep(self.backoff_s * (2 ** attempt) * (0.5 + random.random()))
                ep = await self._pick(session, tried)
                if ep is None:
                    last = LLMUnavailableError(",".join(self.endpoints), "no endpoint is up")
                    continue
            ep.in_flight += 1
            ep.requests += 1
            t0 = time.perf_counter()
            try:
                resp = await self._create(ep, messages, sampling)
            except openai.APIStatusError as e:
                if 400 <= e.status_code < 500:
                    raise LLMRequestError(ep.url, _error_message(e), e.status_code) from e
                last = LLMError(ep.url, _error_message(e), e.status_code)
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                kind = "timeout" if isinstance(e, openai.APITimeoutError) else "connection error"
                last = LLMError(ep.url, f"{kind}: {e.__cause__ or e}")
            else:
                ep.served += 1
                return _completion_from_openai(resp, ep.url, time.perf_counter() - t0)
            finally:
                ep.in_flight -= 1
            logger.warning("LLM call failed (attempt {}/{}): {}", attempt + 1, self.max_retries + 1, last)
            self._mark_down(ep)
            tried.add(id(ep))
        assert last is not None
        raise LLMUnavailableError(last.endpoint, f"gave up after {self.max_retries + 1} attempts: {last.reason}",
                                  last.status)

    async def _create(self, ep: _Endpoint, messages: Messages, sampling: Sampling):
        extra: dict[str, Any] = {"return_token_ids": True}
        if self.mm_processor_kwargs:
            extra["mm_processor_kwargs"] = self.mm_processor_kwargs
        if sampling.regex:
            extra["structured_outputs"] = {"regex": sampling.regex}
        kwargs: dict[str, Any] = dict(
            model=await self._model_name(ep), messages=messages, temperature=sampling.temperature,
            top_p=sampling.top_p, max_tokens=sampling.max_tokens, extra_body=extra,
        )
        if sampling.seed is not None:
            kwargs["seed"] = sampling.seed
        if sampling.stop:
            kwargs["stop"] = sampling.stop
        if sampling.logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = 0
        if ep.is_async:
            return await ep.client.chat.completions.create(**kwargs)
        return await asyncio.to_thread(ep.client.chat.completions.create, **kwargs)

    async def aclose(self) -> None:
        for ep in self._endpoints:
            if ep.is_async and hasattr(ep.client, "close"):
                await ep.client.close()


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or (body.get("error") or {}).get("message") if isinstance(
            body.get("error"), dict) else body.get("message")
        if msg:
            return str(msg)
    return str(getattr(e, "message", e))


def _completion_from_openai(resp: Any, endpoint: str, latency: float) -> Completion:
    data = resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)
    choice = data["choices"][0]
    token_ids = choice.get("token_ids")
    prompt_ids = data.get("prompt_token_ids")
    if token_ids is None or prompt_ids is None:
        raise LLMRequestError(endpoint, "the server returned no token ids; it must be a vLLM "
                              "server that supports return_token_ids")
    lp = choice.get("logprobs")
    logprobs = [c["logprob"] for c in lp["content"]] if lp and lp.get("content") else None
    return Completion(
        text=choice["message"]["content"] or "", prompt_token_ids=list(prompt_ids),
        token_ids=list(token_ids), finish_reason=choice.get("finish_reason") or "",
        logprobs=logprobs, latency_s=latency, endpoint=endpoint,
    )


# ----------------------------------------------------------------------------- in-process vLLM


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


class InProcessLLM:
    """A synchronous ``vllm.LLM`` in this process.

    ``vllm.LLM`` blocks and is not thread-safe, so one worker thread owns it. Calls that arrive
    while it is busy are queued and handed to ``LLM.chat`` together as one batch, which is how
    the engine wants them. The chat template and image processing are the engine's own.
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
            try:
                kw = {"mm_processor_kwargs": self.mm_processor_kwargs} if self.mm_processor_kwargs else {}
                outs = self.llm.chat([b[0] for b in batch], [_vllm_sampling(b[1]) for b in batch],
                                     use_tqdm=False, **kw)
                results: list[Any] = list(outs)
            except Exception as e:  # hand the failure to every caller in the batch
                results = [e] * len(batch)
            latency = time.perf_counter() - t0
            for (_, _, loop, fut), res in zip(batch, results):
                loop.call_soon_threadsafe(_settle, fut, res, latency)

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


class AsyncEngineLLM:
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


def render_chat(processor: Any, messages: Messages) -> tuple[str, list[Any]]:
    """Chat messages in OpenAI format -> (prompt text, PIL images in order)."""
    from PIL import Image

    images: list[Any] = []
    hf_messages = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            hf_messages.append(m)
            continue
        parts = []
        for part in content:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if not url.startswith("data:"):
                    raise ValueError("in-process LLMs take images as data: URLs")
                images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        hf_messages.append({"role": m["role"], "content": parts})
    text = processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    return text, images


# ----------------------------------------------------------------------------- other wrappers


class WrapperLLM:
    """An object with ``generate_with_messages(messages, **sampling)`` (sync or async).

    It may return a ``Completion``, a dict with ``text`` and token ids, or plain text (then the
    token ids are empty: such a wrapper is fine for evaluation, not for RL training).
    """

    def __init__(self, obj: Any):
        self.obj = obj

    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion:
        s = sampling or Sampling()
        kw = dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
        fn = self.obj.generate_with_messages
        t0 = time.perf_counter()
        if asyncio.iscoroutinefunction(fn):
            res = await fn(messages, **kw)
        else:
            res = await asyncio.to_thread(fn, messages, **kw)
        latency = time.perf_counter() - t0
        if isinstance(res, Completion):
            return res
        if isinstance(res, dict):
            return Completion(text=res.get("text", ""), prompt_token_ids=list(res.get("prompt_token_ids", [])),
                              token_ids=list(res.get("token_ids", [])),
                              finish_reason=res.get("finish_reason", ""), latency_s=latency,
                              endpoint=type(self.obj).__name__)
        return Completion(text=str(res), prompt_token_ids=[], token_ids=[], latency_s=latency,
                          endpoint=type(self.obj).__name__)

    async def aclose(self) -> None:
        return None


def as_llm(obj: Any = None, **kwargs: Any) -> LLM:
    """Pick the adapter for ``obj`` by what it can do. ``None`` means ``$VLLM_SERVER_URL``."""
    if obj is None:
        obj = os.environ.get("VLLM_SERVER_URL")
        if not obj:
            raise TypeError("as_llm(None): set VLLM_SERVER_URL or pass a URL, a client or an engine")
    if isinstance(obj, (str, list, tuple)):
        return ServiceLLM(obj, **kwargs)
    if hasattr(obj, "chat") and asyncio.iscoroutinefunction(getattr(obj, "chat", None)):
        return obj  # already speaks our protocol
    completions = getattr(getattr(obj, "chat", None), "completions", None)
    if completions is not None and hasattr(completions, "create"):
        return ServiceLLM(obj, **kwargs)
    if hasattr(obj, "generate_with_messages"):
        return WrapperLLM(obj)
    cls = type(obj)
    mod = cls.__module__ or ""
    if mod.startswith("vllm") and hasattr(obj, "chat") and hasattr(obj, "llm_engine"):
        return InProcessLLM(obj, **kwargs)
    if mod.startswith("vllm") and hasattr(obj, "generate") and asyncio.iscoroutinefunction(
            getattr(obj, "abort", None)):
        return AsyncEngineLLM(obj, **kwargs)
    raise TypeError(
        f"as_llm: don't know how to talk to {cls.__module__}.{cls.__qualname__}; expected a URL or "
        "list of URLs, an OpenAI/AsyncOpenAI client (.chat.completions.create), an object with "
        "generate_with_messages(), a vllm.LLM (.chat + .llm_engine), vLLM's async engine "
        "(.generate + async .abort), or an object with an async chat(messages, sampling)"
    )
