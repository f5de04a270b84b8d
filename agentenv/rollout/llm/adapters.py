"""Adapters for models that are not an OpenAI-compatible server, and ``as_llm`` which picks one.

``as_llm(obj)`` picks the adapter by what the object can do (duck typing):

- a URL string or a list of URLs           -> ServiceLLM (OpenAI-compatible vLLM servers)
- an OpenAI / AsyncOpenAI client            -> ServiceLLM around that client
- an ``LLM`` (an adapter, or any class that inherits it) -> itself
- something else with an async ``chat``    -> ChatLLM (its ``chat`` and ``aclose``; the
  protocol's no-op defaults for the rest)
- a token-in/token-out server: verl's server manager, or anything with
  ``async generate(request_id, *, prompt_ids, sampling_params, image_data=None)``
                                            -> TokenServerLLM (needs ``processor=``)
- an object with ``generate_with_messages`` -> WrapperLLM
- ``vllm.LLM`` (synchronous, in-process)    -> InProcessLLM (worker thread, batched calls)
- vLLM's async engine (``AsyncLLM``)        -> AsyncEngineLLM
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agentenv.rollout.llm.base import LLM, Completion, LLMError, Messages, Sampling
from agentenv.rollout.llm.engines import AsyncEngineLLM, InProcessLLM, hf_messages
from agentenv.rollout.llm.service import ServiceLLM


class ChatLLM(LLM):
    """An object with ``async chat(messages, sampling, *, session=)`` and nothing else of the
    protocol (a simulated model, say): its ``chat`` and ``aclose``, the no-op defaults for the rest.
    To take part in more (health, sessions, weight updates), inherit ``LLM`` instead."""

    def __init__(self, obj: Any):
        self.obj = obj
        self._aclose = getattr(obj, "aclose", None)

    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion:
        return await self.obj.chat(messages, sampling, session=session)

    async def aclose(self) -> None:
        if self._aclose is not None:
            await self._aclose()


class WrapperLLM(LLM):
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


@dataclass
class _Stream:
    """One conversation's token stream: the messages so far (with the last reply) and their ids."""

    messages: Messages
    token_ids: list[int]
    images: dict[str, Any] = field(default_factory=dict)


class TokenServerLLM(LLM):
    """A token-in/token-out server, such as verl's server manager (``LLMServerClient``).

    We render the chat with the model's processor (the same template and image placeholders the
    server's own chat endpoint would use), send the prompt's token ids plus the images, and decode
    the reply's token ids for the agent; the ids stay exactly as the server produced them. The
    trajectory's session id is the request id, so a sticky server keeps a trajectory's turns on
    one replica. ``policy_version`` comes from the server's ``extra_fields["global_steps"]`` (verl)
    when it sends one.

    With a ``builder`` (verl's continuous-token builder: ``build_initial_tokens``,
    ``merge_assistant_tokens``, ``merge_context_tokens``) the turns of a session form one token
    stream: a turn whose messages extend the last turn's plus its reply appends only the new
    messages' tokens, so earlier replies are never re-tokenized and each prompt extends the last
    prompt plus its reply, token for token (what sequence-mode training needs). A turn that does
    not extend the last (the agent dropped an old screenshot) is rendered afresh.
    """

    def __init__(self, server: Any, processor: Any, *, builder: Any = None,
                 mm_processor_kwargs: dict[str, Any] | None = None, name: str = ""):
        self.server = server
        self.processor = processor
        self.builder = builder
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        self.name = name or type(server).__name__
        self._streams: dict[str, _Stream] = {}

    def _render(self, hf: Messages, images: list[Any]) -> list[int]:
        if self.builder is not None:
            return [int(t) for t in self.builder.build_initial_tokens(hf, images=images or None)]
        text = self.processor.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
        enc = self.processor(text=[text], images=images or None, **(self.mm_processor_kwargs if images else {}))
        ids = enc["input_ids"][0]
        return [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]

    def prompt_ids(self, messages: Messages, session: str | None = None
                   ) -> tuple[list[int], list[Any], Messages, dict[str, Any]]:
        """The prompt's token ids (image placeholders expanded), its images in order, the messages
        in the processor's format, and the session's decoded images by URL."""
        stream = self._streams.get(session) if session is not None else None
        cache = stream.images if stream is not None else {}
        hf, images = hf_messages(messages, cache)
        if stream is not None:
            n = len(stream.messages)
            if len(hf) > n and hf[:n] == stream.messages:
                merged = self.builder.merge_context_tokens(stream.messages, hf, stream.token_ids)
                return [int(t) for t in merged.token_ids], images, hf, cache
        return self._render(hf, images), images, hf, cache

    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion:
        s = sampling or Sampling()
        prompt_ids, images, hf, cache = await asyncio.to_thread(self.prompt_ids, messages, session)
        params: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                                  "logprobs": s.logprobs}
        if s.seed is not None:
            params["seed"] = s.seed
        if s.stop:
            params["stop"] = list(s.stop)
        if s.regex:
            params["structured_outputs"] = _structured_outputs(s.regex)
        kw: dict[str, Any] = {"image_data": images or None}
        if self.mm_processor_kwargs:
            kw["mm_processor_kwargs"] = self.mm_processor_kwargs
        t0 = time.perf_counter()
        try:
            out = await self.server.generate(request_id=session or uuid.uuid4().hex, prompt_ids=prompt_ids,
                                             sampling_params=params, **kw)
        except LLMError:
            raise
        except Exception as e:  # the server's own exception types are not ours to know
            raise LLMError(self.name, f"{type(e).__name__}: {e}") from e
        if getattr(out, "stop_reason", None) == "aborted":
            raise LLMError(self.name, "the server aborted the request (weights being updated?)")
        token_ids = [int(t) for t in out.token_ids]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if self.builder is not None and session is not None:
            merged = self.builder.merge_assistant_tokens(prompt_ids, token_ids)
            self._streams[session] = _Stream(hf + [{"role": "assistant", "content": text}],
                                             [int(t) for t in merged.token_ids], cache)
        extra = getattr(out, "extra_fields", None) or {}
        version = extra.get("global_steps")
        return Completion(
            text=text, prompt_token_ids=prompt_ids, token_ids=token_ids,
            finish_reason=getattr(out, "stop_reason", None) or "",
            logprobs=list(out.log_probs) if getattr(out, "log_probs", None) else None,
            latency_s=time.perf_counter() - t0, endpoint=self.name,
            policy_version=int(version) if isinstance(version, (int, float)) else None)

    def release_session(self, session: str) -> None:
        self._streams.pop(session, None)

    async def aclose(self) -> None:
        self._streams.clear()


def _structured_outputs(regex: str) -> Any:
    # verl's vLLM server builds SamplingParams(**params), which wants vLLM's own type; a server
    # reached over JSON gets the plain dict.
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        return {"regex": regex}
    return StructuredOutputsParams(regex=regex)


def _is_token_server(obj: Any) -> bool:
    gen = getattr(obj, "generate", None)
    if gen is None or not asyncio.iscoroutinefunction(gen):
        return False
    try:
        params = inspect.signature(gen).parameters
    except (TypeError, ValueError):
        return False
    return "prompt_ids" in params and "sampling_params" in params


def as_llm(obj: Any = None, **kwargs: Any) -> LLM:
    """Pick the adapter for ``obj`` by what it can do. ``None`` means ``$VLLM_SERVER_URL``."""
    if obj is None:
        obj = os.environ.get("VLLM_SERVER_URL")
        if not obj:
            raise TypeError("as_llm(None): set VLLM_SERVER_URL or pass a URL, a client or an engine")
    if isinstance(obj, (str, list, tuple)):
        return ServiceLLM(obj, **kwargs)
    if LLM in type(obj).__mro__:  # nominal: a proxy answers every hasattr, a protocol check would pass it
        return obj  # already speaks our protocol
    if asyncio.iscoroutinefunction(getattr(obj, "chat", None)):
        return ChatLLM(obj)
    completions = getattr(getattr(obj, "chat", None), "completions", None)
    if completions is not None and hasattr(completions, "create"):
        return ServiceLLM(obj, **kwargs)
    if _is_token_server(obj):
        if kwargs.get("processor") is None:
            raise TypeError(f"as_llm: {type(obj).__name__} is a token-in/token-out server; pass processor= "
                            "(the model's AutoProcessor) so chats can be rendered into token ids")
        return TokenServerLLM(obj, **kwargs)
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
        "list of URLs, an OpenAI/AsyncOpenAI client (.chat.completions.create), a token-in/token-out "
        "server (async generate(request_id, *, prompt_ids, sampling_params, ...), e.g. verl's server "
        "manager), an object with generate_with_messages(), a vllm.LLM (.chat + .llm_engine), vLLM's "
        "async engine (.generate + async .abort), or an object with an async chat(messages, sampling)"
    )
