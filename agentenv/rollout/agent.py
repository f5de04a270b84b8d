"""Agents turn (instruction, history, screenshot) into chat messages, and replies into actions.

Pure logic, no I/O: the loop (``agentenv.rollout.loop``) calls the LLM and the desktop.
Agents are registered by name (``@register_agent``) so a config can pick one; to plug in another
model format, subclass ``Agent``, implement ``messages`` and ``parse``, and register it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Callable

from agentenv.rollout import uitars
from agentenv.rollout.uitars import ParsedReply

AGENTS: dict[str, type["Agent"]] = {}


def register_agent(name: str) -> Callable[[type["Agent"]], type["Agent"]]:
    def deco(cls: type[Agent]) -> type[Agent]:
        AGENTS[name] = cls
        cls.name = name
        return cls
    return deco


def make_agent(name: str, **kwargs: Any) -> "Agent":
    if name not in AGENTS:
        raise KeyError(f"unknown agent {name!r}; registered: {sorted(AGENTS)}")
    return AGENTS[name](**kwargs)


@dataclass
class Turn:
    image_url: str        # the screenshot as a data URL, encoded once and reused every turn ("": out of the window)
    reply: str | None = None  # the model's reply to it (None until it answered; "" is a reply)


@dataclass
class AgentState:
    """One trajectory's memory: what the agent saw and said."""

    instruction: str
    screen: tuple[int, int]
    turns: list[Turn] = field(default_factory=list)
    invalid_in_row: int = 0


class Agent:
    name = "base"

    def image_size(self, screen: tuple[int, int]) -> tuple[int, int]:
        """The size the env should send screenshots at (the size the model sees)."""
        return screen

    def start(self, instruction: str, screen: tuple[int, int]) -> AgentState:
        return AgentState(instruction=instruction, screen=screen)

    def observe(self, state: AgentState, png: bytes) -> None:
        state.turns.append(Turn(image_url="data:image/png;base64," + base64.b64encode(png).decode()))

    def image_steps(self, state: AgentState) -> list[int]:
        """The steps whose screenshots ``messages(state)`` shows, in order."""
        return list(range(len(state.turns)))

    def record_reply(self, state: AgentState, text: str) -> None:
        state.turns[-1].reply = text

    def messages(self, state: AgentState) -> list[dict[str, Any]]:
        raise NotImplementedError

    def parse(self, state: AgentState, text: str) -> ParsedReply:
        raise NotImplementedError


@register_agent("uitars")
class UITarsAgent(Agent):
    """UI-TARS-1.5 computer use: the prompt, every earlier reply as text, the last K screenshots."""

    def __init__(self, history_images: int = 5, language: str = "English",
                 min_pixels: int = uitars.UITARS_MIN_PIXELS, max_pixels: int = uitars.UITARS_MAX_PIXELS,
                 wait_s: float = 5.0):
        if history_images < 1:
            raise ValueError("history_images must be at least 1 (the current screenshot)")
        self.history_images = history_images
        self.language = language
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.wait_s = wait_s

    def image_size(self, screen: tuple[int, int]) -> tuple[int, int]:
        return uitars.smart_resize(screen[0], screen[1], self.min_pixels, self.max_pixels)

    def messages(self, state: AgentState) -> list[dict[str, Any]]:
        # [system, user(prompt), (user(image_i)?, assistant(reply_i))..., user(image_t)]
        # Older turns keep their reply but lose their image. While no image leaves the window,
        # step t+1's messages are step t's plus its reply and the new image: the prefix cache hits.
        msgs: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": uitars.prompt(state.instruction, self.language)}]},
        ]
        first_image = self._first_image(state)
        for i, turn in enumerate(state.turns):
            if i >= first_image:
                msgs.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": turn.image_url}}]})
            # an empty reply is still a turn: leaving it out would break the token-level
            # extension from one step's prompt to the next (sequence mode)
            if turn.reply is not None:
                msgs.append({"role": "assistant", "content": turn.reply})
        return msgs

    def observe(self, state: AgentState, png: bytes) -> None:
        super().observe(state, png)
        # The screenshot that just left the history window is never shown again: drop its data URL,
        # so a trajectory holds at most history_images screenshots, not one per step.
        gone = len(state.turns) - self.history_images - 1
        if gone >= 0:
            state.turns[gone].image_url = ""

    def _first_image(self, state: AgentState) -> int:
        return max(0, len(state.turns) - self.history_images)

    def image_steps(self, state: AgentState) -> list[int]:
        return list(range(self._first_image(state), len(state.turns)))

    def parse(self, state: AgentState, text: str) -> ParsedReply:
        return uitars.parse_reply(text, state.screen, self.min_pixels, self.max_pixels, self.wait_s)
