"""UI-TARS-1.5: the computer-use prompt, image sizing and reply parsing. Pure functions, no I/O.

Coordinates: UI-TARS-1.5 (a Qwen2.5-VL model) answers in pixels of the image *as the processor
resized it* (``smart_resize``: factor 28, within min/max pixels). The ``ui-tars`` package turns
those into fractions of the resized image; we multiply by the real screen size. Both sides must
use the server's ``--mm-processor-kwargs`` min/max pixels, or every click lands elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

from agentenv.types import Action

# UI-TARS-1.5's computer-use prompt (UI-TARS repository, README "COMPUTER_USE"), plus the
# call_user() line the OSWorld harness adds so the agent can give up on infeasible tasks.
COMPUTER_USE = """You are a GUI agent. You are given a task and your action history, with screenshots. You need to perform the next action to complete the task.

## Output Format
```
Thought: ...
Action: ...
```

## Action Space
click(start_box='<|box_start|>(x1,y1)<|box_end|>')
left_double(start_box='<|box_start|>(x1,y1)<|box_end|>')
right_single(start_box='<|box_start|>(x1,y1)<|box_end|>')
drag(start_box='<|box_start|>(x1,y1)<|box_end|>', end_box='<|box_start|>(x3,y3)<|box_end|>')
hotkey(key='')
type(content='') #If you want to submit your input, use "\\n" at the end of `content`.
scroll(start_box='<|box_start|>(x1,y1)<|box_end|>', direction='down or up or right or left')
wait() #Sleep for 5s and take a screenshot to check for any changes.
finished(content='xxx') # Use escape characters \\', \\", and \\n in content part to ensure we can parse the content in normal python string format.
call_user() # Submit the task and call the user when the task is unsolvable, or when you need the user's help.


## Note
- Use {language} in `Thought` part.
- Write a small plan and finally summarize your next action (with its target element) in one sentence in `Thought` part.

## User Instruction
{instruction}
"""

FACTOR = 28
UITARS_MIN_PIXELS = 100 * 28 * 28
UITARS_MAX_PIXELS = 16384 * 28 * 28

# A regex for vLLM structured outputs that only admits well-formed UI-TARS replies. Random-weight
# test models need it to produce parseable actions; a real checkpoint does not.
_BOX = r"'\([12]?\d{1,2},[12]?\d{1,2}\)'"  # 0..299: inside any image of >= 300x300
ACTION_REGEX = (
    r"Thought: [a-z ]{1,24}\nAction: ("
    rf"click\(start_box={_BOX}\)|left_double\(start_box={_BOX}\)|right_single\(start_box={_BOX}\)"
    rf"|scroll\(start_box={_BOX}, direction='(up|down|left|right)'\)"
    r"|type\(content='[a-z ]{1,12}'\)|hotkey\(key='(ctrl a|ctrl s|enter|esc)'\)"
    r"|finished\(content='[a-z ]{0,8}'\))"
)


def prompt(instruction: str, language: str = "English") -> str:
    return COMPUTER_USE.format(instruction=instruction, language=language)


def smart_resize(width: int, height: int, min_pixels: int = UITARS_MIN_PIXELS,
                 max_pixels: int = UITARS_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the image the model sees for a ``width`` x ``height`` screenshot."""
    from ui_tars.action_parser import smart_resize as _sr

    h, w = _sr(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


@dataclass
class ParsedReply:
    thought: str = ""
    actions: list[Action] = field(default_factory=list)
    error: str = ""            # non-empty: the reply is invalid, and this says why

    @property
    def valid(self) -> bool:
        return not self.error and bool(self.actions)


_KEY_FIX = {"arrowleft": "left", "arrowright": "right", "arrowup": "up", "arrowdown": "down",
            "page_down": "pagedown", "page_up": "pageup"}


def _unescape(s: str) -> str:
    # The model escapes quotes and newlines "in normal python string format" (see the prompt).
    return s.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")


def _point(box: str | None, screen: tuple[int, int], name: str) -> tuple[float, float]:
    if not box:
        raise ValueError(f"missing {name}")
    try:
        nums = [float(v) for v in box.strip("[]() ").split(",")]
    except ValueError as e:
        raise ValueError(f"bad {name} {box!r}") from e
    if len(nums) != 4:
        raise ValueError(f"bad {name} {box!r}")
    fx, fy = (nums[0] + nums[2]) / 2, (nums[1] + nums[3]) / 2
    if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
        raise ValueError(f"{name} {box!r} is outside the image")
    w, h = screen
    return min(fx * w, w - 1), min(fy * h, h - 1)


def to_action(action_type: str, inputs: dict[str, str], screen: tuple[int, int], wait_s: float = 5.0) -> Action:
    """One ui-tars structured action -> our Action in screen pixels. Raises ValueError if invalid."""
    if not isinstance(action_type, str):
        raise ValueError(f"no action name in {action_type!r}")
    t = action_type.strip()
    if t in ("click", "left_single", "left_double", "right_single", "hover"):
        x, y = _point(inputs.get("start_box"), screen, "start_box")
        kind = {"click": "click", "left_single": "click", "left_double": "double_click",
                "right_single": "right_click", "hover": "move"}[t]
        return Action(kind, x=x, y=y)
    if t in ("drag", "select"):
        x, y = _point(inputs.get("start_box"), screen, "start_box")
        x2, y2 = _point(inputs.get("end_box"), screen, "end_box")
        return Action("drag", x=x, y=y, x2=x2, y2=y2)
    if t == "scroll":
        direction = (inputs.get("direction") or "").strip().lower()
        if direction not in ("up", "down", "left", "right"):
            raise ValueError(f"bad scroll direction {direction!r}")
        if inputs.get("start_box"):
            x, y = _point(inputs.get("start_box"), screen, "start_box")
            return Action("scroll", x=x, y=y, direction=direction)
        return Action("scroll", direction=direction)
    if t == "type":
        return Action("type", text=_unescape(inputs.get("content", "")))
    if t in ("hotkey", "press", "keydown", "keyup"):
        raw = inputs.get("key") or inputs.get("hotkey") or ""
        keys = [_KEY_FIX.get(k.lower(), k) for k in raw.split()]
        if not keys:
            raise ValueError(f"{t} without a key")
        return Action("hotkey" if len(keys) > 1 else "key", keys=keys)
    if t == "wait":
        return Action("wait", seconds=wait_s)
    if t == "finished":
        return Action("finished", text=_unescape(inputs.get("content", "")))
    if t == "call_user":
        return Action("call_user")
    raise ValueError(f"unknown action {t!r}")


def parse_reply(text: str, screen: tuple[int, int], min_pixels: int = UITARS_MIN_PIXELS,
                max_pixels: int = UITARS_MAX_PIXELS, wait_s: float = 5.0) -> ParsedReply:
    """Parse a UI-TARS-1.5 reply with the ``ui-tars`` package; never raises."""
    from ui_tars.action_parser import parse_action_to_structure_output

    # Box tokens are special tokens: servers usually drop them from the text, but not always.
    text = text.replace("<|box_start|>", "").replace("<|box_end|>", "")
    thought_m = re.search(r"Thought:(.*?)(?=\n?Action:|$)", text, re.DOTALL)
    thought = thought_m.group(1).strip() if thought_m else ""
    if "Action:" not in text:
        return ParsedReply(thought, error="no 'Action:' in the reply")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the parser prints on failure
            parsed = parse_action_to_structure_output(
                text, FACTOR, screen[1], screen[0], model_type="qwen25vl",
                min_pixels=min_pixels, max_pixels=max_pixels)
    except Exception as e:  # it raises bare AssertionError/ValueError/SyntaxError on junk
        return ParsedReply(thought, error=f"unparseable action: {type(e).__name__}: {e}"[:300])
    actions = []
    try:
        for p in parsed:
            actions.append(to_action(p["action_type"], p.get("action_inputs") or {}, screen, wait_s))
    except (ValueError, TypeError, AttributeError) as e:  # AttributeError: no action name (``f()()``)
        return ParsedReply(thought, error=str(e)[:300] or type(e).__name__)
    if not actions:
        return ParsedReply(thought, error="no action in the reply")
    return ParsedReply(thought, actions)
