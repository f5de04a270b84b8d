"""ServiceLLM: routing over one or many OpenAI-compatible vLLM endpoints.

Routing: the turns of one trajectory (``session``) stick to one endpoint so its prefix cache
hits; a new session goes to the endpoint with the fewest requests in flight. Failures are
judged per request, not per endpoint, so one slow call under load cannot take an endpoint and
all its sessions out (a cascade):

- connection refused / unreachable: the endpoint is marked down for ``down_s`` at once;
- a timeout or a 5xx counts as a failure; ``failure_threshold`` in a row mark it down;
- 429 (overloaded) is retried after a backoff (``Retry-After`` when given), never marks it down;
- another 4xx is not retried and raises ``LLMRequestError`` naming the endpoint.

A session whose endpoint went down moves to another on its next turn. An endpoint back from its
down time is health-checked (``/health``) before it takes traffic again.

Weights: ``update_weights`` swaps the weights one endpoint at a time (drain it, load, mark it
up with the new policy version), so rollouts never all stop; every ``Completion`` carries the
policy version of the endpoint that produced it.

Endpoints that come and go (model servers as Ray actors, restarted on a new port with a new key:
``agentenv.integrations.ray``): ``drop_endpoint`` takes a lost one out (its sessions move on their
next turn), ``add_endpoint`` takes a new one in, first loading the weights of the last
``update_weights`` into it (a restarted server starts from its checkpoint). While ``expecting`` says
servers are on their way back and none is up, ``chat`` raises ``LLMNoEndpointError`` at once and
``wait_for_endpoint()`` waits for one, instead of the call failing its retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from loguru import logger

from agentenv.rollout.llm.base import (LLM, Completion, LLMError, LLMNoEndpointError, LLMRequestError,
                                       LLMUnavailableError, Messages, Sampling)


@dataclass
class _Endpoint:
    url: str                    # base URL ending in /v1
    client: Any                 # openai.AsyncOpenAI (or a sync OpenAI wrapped by to_thread)
    is_async: bool = True
    in_flight: int = 0
    down_until: float = 0.0     # monotonic time before which the endpoint is not tried
    failures: int = 0           # failures in a row (reset by a success)
    down_count: int = 0         # times it was marked down
    served: int = 0
    requests: int = 0           # requests sent, successful or not
    draining: bool = False      # takes no new calls (a weight update is under way)
    model: str | None = None    # the model name to send, when it differs per endpoint (a LoRA adapter)
    version: int | None = None  # the policy version its weights are
    api_key: str = "EMPTY"      # its bearer token (vLLM --api-key / VLLM_API_KEY)
    removed: bool = False       # dropped (its server is gone): never picked again
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def root(self) -> str:
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    def usable(self, now: float) -> bool:
        return not self.draining and not self.removed and self.down_until <= now


def _normalize_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"LLM endpoint must be an http(s) URL, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class ServiceLLM(LLM):
    """OpenAI-compatible vLLM servers, one or many (see the module docstring for routing)."""

    def __init__(
        self,
        endpoints: str | list[str] | Any,
        model: str | None = None,
        *,
        api_key: str | dict[str, str] | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        down_s: float = 5.0,
        failure_threshold: int = 3,
        mm_processor_kwargs: dict[str, Any] | None = None,
        max_sessions: int = 100_000,
        policy_version: int | None = None,
    ):
        self.model = model or os.environ.get("VLLM_MODEL_NAME") or None
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_retries, self.backoff_s, self.down_s = max_retries, backoff_s, down_s
        self.failure_threshold = failure_threshold
        self.mm_processor_kwargs = mm_processor_kwargs
        self._sessions: dict[str, _Endpoint] = {}
        self._max_sessions = max_sessions
        self._model_lock = asyncio.Lock()
        self.expecting = 0            # endpoints on their way back (set by whoever watches them)
        self._changed = asyncio.Event()  # set, and replaced, when endpoints or ``expecting`` change
        self._retired: list[_Endpoint] = []   # dropped ones: their clients are closed by aclose()
        self._version = policy_version  # what a new endpoint serves, until update_weights says otherwise
        self._last_update: dict[str, Any] | None = None  # replayed on endpoints added later
        # One key for every endpoint, or a key per endpoint URL (servers that made their own: Ray actors).
        keys = {_normalize_url(u): k for u, k in api_key.items()} if isinstance(api_key, dict) else {}
        self._api_key = (None if isinstance(api_key, dict) else api_key) or os.environ.get("VLLM_API_KEY") or "EMPTY"
        if isinstance(endpoints, str):
            endpoints = [u for u in endpoints.split(",") if u.strip()]
        if isinstance(endpoints, (list, tuple)):
            if not endpoints:
                raise ValueError("ServiceLLM needs at least one endpoint URL")
            self._endpoints = [self._endpoint(u, keys.get(_normalize_url(u))) for u in endpoints]
        else:  # an OpenAI or AsyncOpenAI client given by the caller
            client = endpoints
            is_async = asyncio.iscoroutinefunction(client.chat.completions.create)
            self._endpoints = [_Endpoint(url=str(client.base_url).rstrip("/"), client=client,
                                         is_async=is_async, version=policy_version, api_key=self._api_key)]

    def _endpoint(self, url: str, api_key: str | None) -> _Endpoint:
        import openai

        u, key = _normalize_url(url), api_key or self._api_key
        return _Endpoint(url=u, client=openai.AsyncOpenAI(base_url=u, api_key=key, timeout=self.timeout, max_retries=0),
                         version=self._version, api_key=key)

    # ------------------------------------------------------------------ endpoints that come and go
    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def add_endpoint(self, url: str, api_key: str | None = None) -> None:
        """Take a new server in (a restarted one: new port, new key). It must answer ``/health``;
        after an ``update_weights`` it first loads those weights (drained meanwhile), so it never
        serves an older policy. Raises (and adds nothing) when either fails: ``LLMError`` for a
        server that does not answer."""
        ep = self._endpoint(url, api_key)
        if any(e.url == ep.url for e in self._endpoints):
            await ep.client.close()
            raise ValueError(f"LLM endpoint {ep.url} is already in use")
        if not await self._healthy(ep):
            await ep.client.close()
            raise LLMError(ep.url, "does not answer /health")
        ep.draining = self._last_update is not None  # no calls before it has the current weights
        self._endpoints.append(ep)
        if self._last_update is not None:
            try:
                await self.update_weights(**self._last_update, only=[ep.url])
            except BaseException:
                self._endpoints.remove(ep)
                await ep.client.close()
                raise
        logger.info("LLM endpoint {} added (policy version {}); endpoints now {}", ep.url, ep.version,
                    len(self._endpoints))
        self._signal()

    def drop_endpoint(self, url: str, reason: str) -> bool:
        """A server is gone (its actor restarts elsewhere): no call goes to it again, its sessions
        move to the others on their next turn; calls in flight there fail and are retried. Returns
        whether it was in use."""
        url = _normalize_url(url)
        ep = next((e for e in self._endpoints if e.url == url), None)
        if ep is None:
            return False
        ep.removed = True
        self._endpoints.remove(ep)
        self._retired.append(ep)
        for s in [s for s, e in self._sessions.items() if e is ep]:
            del self._sessions[s]
        logger.warning("LLM endpoint {} dropped ({}); endpoints now {}", url, reason, len(self._endpoints))
        self._signal()
        return True

    @property
    def exhausted(self) -> bool:
        """Every endpoint was dropped and none is expected back: no call can ever be served."""
        return not self._endpoints and not self.expecting

    def set_expecting(self, n: int) -> None:
        """How many servers are on their way back; 0 with none up makes waiters give up."""
        self.expecting = n
        self._signal()

    async def _up(self) -> list[_Endpoint]:
        """The endpoints that take calls now; one back from its down time must answer /health first."""
        now = time.monotonic()
        up = [e for e in self._endpoints if e.usable(now)]
        for e in up:
            if e.down_count and e.failures and not await self._healthy(e):
                e.down_until = time.monotonic() + self.down_s
        now = time.monotonic()
        up = [e for e in up if e.usable(now)]
        for e in up:
            if e.down_count and e.failures:
                logger.info("LLM endpoint {} is back up", e.url)
                e.failures = 0
        return up

    async def wait_for_endpoint(self) -> None:
        """Return once an endpoint takes calls. Raises ``LLMUnavailableError`` once none does and
        none is expected back (whoever sets ``expecting`` bounds the wait: ``ray.return_timeout_s``)."""
        warned = False
        while True:
            changed = self._changed  # taken before looking: a change while we look wakes us
            if await self._up():
                if warned:
                    logger.info("an LLM endpoint is up again: model calls go on")
                return
            if not self.expecting:
                raise LLMUnavailableError(",".join(self.endpoints), "no endpoint is up and none is expected back")
            if not warned:
                logger.warning("no LLM endpoint is up; {} on the way back: model calls wait", self.expecting)
                warned = True
            with contextlib.suppress(asyncio.TimeoutError):  # a down one may come back on its own
                await asyncio.wait_for(changed.wait(), self.down_s)

    # ------------------------------------------------------------------ state
    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._endpoints]

    def api_key(self, url: str) -> str:
        """The key sent to the endpoint ``url`` (one of ``endpoints``)."""
        return next(e.api_key for e in self._endpoints if e.url == url)

    def stats(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {e.url: {"in_flight": e.in_flight, "served": e.served, "failures": e.failures,
                        "down_count": e.down_count, "requests": e.requests, "draining": e.draining,
                        "version": e.version, "up": e.failures == 0 and e.down_until <= now}
                for e in self._endpoints}

    async def _healthy(self, ep: _Endpoint) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0) as http:
                r = await http.get(ep.root + "/health")
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def ready(self) -> bool:
        """Whether any endpoint answers its health check now."""
        results = await asyncio.gather(*(self._healthy(e) for e in self._endpoints))
        return any(results)

    def _failed(self, ep: _Endpoint, *, down_now: bool) -> None:
        ep.failures += 1
        if down_now or ep.failures >= self.failure_threshold:
            ep.down_until = time.monotonic() + self.down_s
            ep.down_count += 1

    async def _pick(self, session: str | None, exclude: set[int]) -> _Endpoint | None:
        if session is not None:
            ep = self._sessions.get(session)
            if ep is not None and id(ep) not in exclude and ep.usable(time.monotonic()):
                return ep
        up = [e for e in await self._up() if id(e) not in exclude]
        if not up:
            return None
        ep = min(up, key=lambda e: (e.in_flight, e.served))
        if session is not None:
            if session not in self._sessions and len(self._sessions) >= self._max_sessions:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session] = ep
        return ep

    async def _model_name(self, ep: _Endpoint) -> str:
        if ep.model:
            return ep.model
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

    # ------------------------------------------------------------------ calls
    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion:
        import openai

        sampling = sampling or Sampling()
        tried: set[int] = set()
        last: LLMError | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last))
            ep = await self._pick(session, tried)
            if ep is None and tried:
                tried.clear()  # every endpoint failed once this call: try them all again
                ep = await self._pick(session, tried)
            if ep is None and self.expecting:  # servers are restarting: the caller waits, then calls again
                raise LLMNoEndpointError(",".join(self.endpoints), f"no endpoint is up; {self.expecting} "
                                         "on the way back (await wait_for_endpoint())")
            if ep is None:  # all down: keep the last real failure as the reason
                last = last or LLMUnavailableError(",".join(self.endpoints), "no endpoint is up")
                continue
            ep.in_flight += 1
            ep.requests += 1
            ep.idle.clear()
            version = ep.version
            t0 = time.perf_counter()
            try:
                resp = await self._create(ep, messages, sampling)
            except openai.APIStatusError as e:
                last = LLMError(ep.url, _error_message(e), e.status_code)
                if e.status_code == 429:
                    last.retry_after = _retry_after(e)  # type: ignore[attr-defined]
                elif 400 <= e.status_code < 500:
                    raise LLMRequestError(ep.url, _error_message(e), e.status_code) from e
                else:
                    self._failed(ep, down_now=False)
                    tried.add(id(ep))
            except openai.APITimeoutError as e:
                last = LLMError(ep.url, f"timeout: {e.__cause__ or e}")
                self._failed(ep, down_now=False)
                tried.add(id(ep))
            except openai.APIConnectionError as e:
                last = LLMError(ep.url, f"connection error: {e.__cause__ or e}")
                self._failed(ep, down_now=True)
                tried.add(id(ep))
            except (ValueError, KeyError, TypeError, openai.APIResponseValidationError) as e:
                # an answer that does not parse (not JSON, not UTF-8, no choices): a failed attempt
                last = LLMError(ep.url, f"unreadable answer: {type(e).__name__}: {str(e)[:200]}")
                self._failed(ep, down_now=False)
                tried.add(id(ep))
            else:
                try:
                    out = _completion_from_openai(resp, ep.url, time.perf_counter() - t0, version)
                except LLMRequestError:
                    raise
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    last = LLMError(ep.url, f"unreadable answer: {type(e).__name__}: {str(e)[:200]}")
                    self._failed(ep, down_now=False)
                    tried.add(id(ep))
                else:
                    ep.served += 1
                    ep.failures = 0
                    return out
            finally:
                ep.in_flight -= 1
                if ep.in_flight == 0:
                    ep.idle.set()
            logger.warning("LLM call failed (attempt {}/{}): {}", attempt + 1, self.max_retries + 1, last)
        assert last is not None
        raise LLMUnavailableError(last.endpoint, f"gave up after {self.max_retries + 1} attempts: {last.reason}",
                                  last.status)

    def _backoff(self, attempt: int, last: LLMError | None) -> float:
        hint = getattr(last, "retry_after", None)
        if hint is not None:
            return min(hint, 30.0)
        return self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random())

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

    # ------------------------------------------------------------------ weights
    async def update_weights(self, version: int, *, path: str | None = None, lora: str | None = None,
                             lora_name: str | None = None, drain_timeout_s: float = 600.0,
                             load: Any = None, only: list[str] | None = None) -> None:
        """Serve new weights, one endpoint at a time, without stopping rollouts.

        For each endpoint: stop routing new calls to it (its sessions move to the others),
        wait for its calls in flight, load the weights, reset its prefix cache, and mark it up
        serving ``version``. ``path``: a full checkpoint directory, loaded in place
        (vLLM's ``reload_weights``; the server must run with ``VLLM_SERVER_DEV_MODE=1``, which
        ``start_vllm_service.sh --weight-updates`` sets). ``lora``: a LoRA adapter directory, loaded
        as ``lora_name`` (default ``policy-v<version>``) and used for every call afterwards (the
        server needs ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``). ``load``: a custom
        ``async load(endpoint_root)`` instead of either. ``only``: these endpoint URLs, not all.
        """
        if sum(x is not None for x in (path, lora, load)) != 1:
            raise ValueError("update_weights needs exactly one of path=, lora= or load=")
        name = lora_name or f"policy-v{version}"
        chosen = self._endpoints if only is None else [e for e in self._endpoints if e.url in
                                                       {_normalize_url(u) for u in only}]
        if only is not None and len(chosen) != len(set(only)):
            raise ValueError(f"update_weights(only={only}): not all of them are endpoints of this LLM ({self.endpoints})")
        if only is None:  # endpoints added from now on (restarted servers) load these weights first
            self._last_update = {"version": version, "path": path, "lora": lora, "lora_name": lora_name,
                                 "drain_timeout_s": drain_timeout_s, "load": load}
            self._version = version
        for ep in chosen:
            if ep.removed:  # dropped meanwhile: its replacement loads these weights when it is added
                continue
            ep.draining = True
            try:
                if ep.in_flight:
                    try:
                        await asyncio.wait_for(ep.idle.wait(), drain_timeout_s)
                    except asyncio.TimeoutError:
                        raise LLMError(ep.url, f"{ep.in_flight} calls still in flight after "
                                               f"{drain_timeout_s}s; weights not updated") from None
                t0 = time.perf_counter()
                if load is not None:
                    await load(ep.root)
                elif path is not None:
                    await self._post(ep, "/collective_rpc", {"method": "reload_weights",
                                                             "kwargs": {"weights_path": str(path)}}, timeout=600)
                else:
                    await self._post(ep, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(lora)},
                                     timeout=600)
                    ep.model = name
                # Outputs cached under the old weights must not be reused; a vision model's encoder
                # cache must be reset after a reload or the engine fails on its next image.
                for route in ("/reset_prefix_cache", "/reset_encoder_cache"):
                    await self._post(ep, route, None, timeout=60, optional=True)
                ep.version = version
                logger.info("LLM endpoint {} now serves policy version {} (loaded in {:.1f}s)",
                            ep.url, version, time.perf_counter() - t0)
            except LLMError:
                if not ep.removed:
                    raise
                logger.warning("LLM endpoint {} was dropped during its weight update", ep.url)
            finally:
                ep.draining = False

    async def _post(self, ep: _Endpoint, path: str, body: Any, *, timeout: float, optional: bool = False) -> None:
        headers = {"Authorization": f"Bearer {ep.api_key}"}
        try:
            async with httpx.AsyncClient(timeout=timeout) as http:
                r = await http.post(ep.root + path, json=body, headers=headers)
        except httpx.HTTPError as e:
            raise LLMError(ep.url, f"{path}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400 and not (optional and r.status_code == 404):
            hint = " (is the server running with VLLM_SERVER_DEV_MODE=1?)" if r.status_code == 404 else ""
            raise LLMError(ep.url, f"{path}: {r.text[:300]}{hint}", r.status_code)

    async def aclose(self) -> None:
        for ep in [*self._endpoints, *self._retired]:
            if ep.is_async and hasattr(ep.client, "close"):
                await ep.client.close()


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message")
        if msg:
            return str(msg)
    return str(getattr(e, "message", e))


def _retry_after(e: Any) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _completion_from_openai(resp: Any, endpoint: str, latency: float, version: int | None) -> Completion:
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
        logprobs=logprobs, latency_s=latency, endpoint=endpoint, policy_version=version,
    )
