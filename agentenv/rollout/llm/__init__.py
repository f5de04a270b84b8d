"""The LLM layer: one async protocol, ``chat(messages, sampling) -> Completion``
(the rest of ``LLM`` has no-op defaults), and its adapters.

- ``base``: the protocol, ``Completion`` and the errors;
- ``service``: ``ServiceLLM``, routing over OpenAI-compatible vLLM endpoints (sticky sessions,
  failover, per-endpoint weight updates);
- ``engines``: in-process vLLM (``InProcessLLM``, ``AsyncEngineLLM``) and ``render_chat``;
- ``adapters``: ``TokenServerLLM`` (verl's server manager), ``WrapperLLM``, ``ChatLLM`` (an object
  with ``chat`` only) and ``as_llm``, which picks the adapter by duck typing.

RL needs the token ids the engine actually produced, so every adapter returns them; text is
never re-tokenized.
"""

from agentenv.rollout.llm.adapters import ChatLLM, TokenServerLLM, WrapperLLM, as_llm
from agentenv.rollout.llm.base import (LLM, Completion, LLMError, LLMNoEndpointError, LLMRequestError,
                                       LLMUnavailableError, Messages, Sampling)
from agentenv.rollout.llm.engines import AsyncEngineLLM, InProcessLLM, render_chat
from agentenv.rollout.llm.service import ServiceLLM

__all__ = ["LLM", "AsyncEngineLLM", "ChatLLM", "Completion", "InProcessLLM", "LLMError", "LLMNoEndpointError", "LLMRequestError",
           "LLMUnavailableError", "Messages", "Sampling", "ServiceLLM", "TokenServerLLM", "WrapperLLM", "as_llm",
           "render_chat"]
