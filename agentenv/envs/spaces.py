"""The gymnasium action space of our structured actions."""

from __future__ import annotations

from typing import Any

import gymnasium

from agentenv.types import ACTION_TYPES, SCROLL_DIRECTIONS, Action

# Actions that sample() draws: safe ones only (no terminal actions, no code).
_SAMPLED = ("click", "double_click", "right_click", "move", "drag", "scroll", "type", "key", "wait")


class ActionSpace(gymnasium.Space):
    """Structured actions on a ``width`` x ``height`` screen (``agentenv.types.Action``)."""

    def __init__(self, width: int, height: int, seed: int | None = None):
        super().__init__(shape=None, dtype=None, seed=seed)
        self.width, self.height = width, height

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> Action:
        r = self.np_random
        kind = _SAMPLED[int(r.integers(len(_SAMPLED)))]
        x, y = float(r.integers(self.width)), float(r.integers(self.height))
        if kind == "drag":
            return Action(kind, x=x, y=y, x2=float(r.integers(self.width)), y2=float(r.integers(self.height)))
        if kind == "scroll":
            return Action(kind, x=x, y=y, direction=SCROLL_DIRECTIONS[int(r.integers(4))], amount=int(r.integers(1, 5)))
        if kind == "type":
            return Action(kind, text="".join(chr(int(c)) for c in r.integers(97, 123, size=5)))
        if kind == "key":
            return Action(kind, keys=["Escape"])
        if kind == "wait":
            return Action(kind, seconds=0.1)
        return Action(kind, x=x, y=y)

    def contains(self, x: Any) -> bool:
        if isinstance(x, dict):
            try:
                x = Action.from_dict(x)
            except (ValueError, TypeError):
                return False
        if not isinstance(x, Action) or x.type not in ACTION_TYPES:
            return False
        for px, py in ((x.x, x.y), (x.x2, x.y2)):
            if px is not None and not (0 <= px < self.width and py is not None and 0 <= py < self.height):
                return False
        return True

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ActionSpace) and (other.width, other.height) == (self.width, self.height)

    def __repr__(self) -> str:
        return f"ActionSpace({self.width}x{self.height})"
