"""The LLM protocol every adapter speaks: ``chat(messages, sampling, session=) -> Completion``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agentenv.config import Sampling

Messages = list[dict[str, Any]]

__all__ = ["Completion", "LLM", "LLMError", "LLMNoEndpointError", "LLMRequestError", "LLMUnavailableError", "Messages",
           "Sampling"]


@dataclass
class Completion:
    """One model reply with the token ids the engine produced (RL never re-tokenizes text)."""

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str = ""
    logprobs: list[float] | None = None
    latency_s: float = 0.0
    endpoint: str = ""
    policy_version: int | None = None   # the weights that produced it, when the adapter knows


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


class LLMNoEndpointError(LLMUnavailableError):
    """No endpoint is up now, and one is on its way back (a model server that Ray restarts): await
    the LLM's ``wait_for_endpoint()``, then call again. Raised at once instead of waited out inside
    the call, so the wait does not count against the call's own timeout (``loop.step_timeout_s``)."""


@runtime_checkable
class LLM(Protocol):
    """What the rollout asks of a model. Only ``chat`` is required: an adapter inherits this class
    and gets the no-op defaults for the rest (``as_llm`` wraps an object that has ``chat`` only).
    ``ServiceLLM`` overrides them all (sticky sessions, health, failover, rolling weight updates)."""

    async def chat(self, messages: Messages, sampling: Sampling | None = None, *,
                   session: str | None = None) -> Completion: ...

    async def aclose(self) -> None:
        return None

    def release_session(self, session: str) -> None:
        """The trajectory ``session`` ended: whatever the LLM keeps for it (an endpoint binding, a
        token stream) can go."""

    async def ready(self) -> bool:
        """Whether the model answers now (the scheduler waits for this after an ``llm_error``)."""
        return True

    @property
    def exhausted(self) -> bool:
        """No call can ever be served again (every server lost, none expected back)."""
        return False

    async def wait_for_endpoint(self) -> None:
        """Return once a call can be served (after ``LLMNoEndpointError``, which only ServiceLLM raises)."""

    async def update_weights(self, version: int, **how: Any) -> None:
        """Serve weights ``version`` without stopping rollouts, endpoint by endpoint."""
        raise TypeError(f"{type(self).__name__} cannot swap weights endpoint by endpoint; "
                        "use await pause(), swap them, then resume(policy_version)")

    @property
    def endpoints(self) -> list[str]:
        """The OpenAI-compatible servers behind it (none for an in-process engine)."""
        return []

    def api_key(self, url: str) -> str | None:
        """The key sent to the endpoint ``url`` (one of ``endpoints``)."""
        return None

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: calls served, failures, version... (for a run's summary)."""
        return {}
