"""UI-TARS-1.5 replies -> actions in screen pixels (pure logic, no servers)."""

from __future__ import annotations

import pytest

from agentenv.rollout.agent import UITarsAgent, make_agent
from agentenv.rollout.uitars import ACTION_REGEX, parse_reply, prompt, smart_resize

FHD, HD = (1920, 1080), (1280, 720)


def test_smart_resize_matches_the_processor():
    assert smart_resize(*FHD) == (1932, 1092)
    assert smart_resize(*HD) == (1288, 728)
    w, h = smart_resize(1920, 1080, 28 * 28 * 4, 28 * 28 * 256)
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 28 * 28 * 256


def px(screen, x, y):
    rw, rh = smart_resize(*screen)
    return x / rw * screen[0], y / rh * screen[1]


@pytest.mark.parametrize("screen", [FHD, HD])
@pytest.mark.parametrize("reply,kind", [
    ("Thought: Click the Save button.\nAction: click(start_box='<|box_start|>(600,300)<|box_end|>')", "click"),
    ("Thought: Open the file.\nAction: left_double(start_box='(600,300)')", "double_click"),
    ("Thought: Context menu.\nAction: right_single(start_box='<|box_start|>(600,300)<|box_end|>')", "right_click"),
    ("Thought: Hover.\nAction: click(point='<point>600 300</point>')", "click"),
])
def test_pointer_actions_map_to_screen_pixels(reply, kind, screen):
    r = parse_reply(reply, screen)
    assert r.valid, r.error
    (a,) = r.actions
    assert a.type == kind
    ex, ey = px(screen, 600, 300)
    assert a.x == pytest.approx(ex, abs=0.01) and a.y == pytest.approx(ey, abs=0.01)


def test_published_example_pixel():
    a = parse_reply("Thought: x\nAction: click(start_box='(1500,900)')", FHD).actions[0]
    assert (round(a.x, 1), round(a.y, 1)) == (1490.7, 890.1)


@pytest.mark.parametrize("screen", [FHD, HD])
def test_drag(screen):
    r = parse_reply("Thought: Move it.\nAction: drag(start_box='(100,200)', end_box='(700,500)')", screen)
    (a,) = r.actions
    assert a.type == "drag"
    assert (a.x, a.y) == pytest.approx(px(screen, 100, 200))
    assert (a.x2, a.y2) == pytest.approx(px(screen, 700, 500))


def test_hotkey_and_single_key():
    assert parse_reply("Thought: copy\nAction: hotkey(key='ctrl c')", FHD).actions[0].keys == ["ctrl", "c"]
    a = parse_reply("Thought: submit\nAction: hotkey(key='enter')", FHD).actions[0]
    assert a.type == "key" and a.keys == ["enter"]
    a = parse_reply("Thought: save\nAction: hotkey(key='ctrl shift s')", FHD).actions[0]
    assert a.type == "hotkey" and a.keys == ["ctrl", "shift", "s"]


@pytest.mark.parametrize("content,expected", [
    ("hello world", "hello world"),
    ("It\\'s \\\"quoted\\\"", "It's \"quoted\""),
    ("line one\\nline two\\n", "line one\nline two\n"),
    ("Grüße, 世界 — ok", "Grüße, 世界 — ok"),
])
def test_type_content(content, expected):
    r = parse_reply(f"Thought: Type it.\nAction: type(content='{content}')", FHD)
    assert r.valid, r.error
    assert r.actions[0].type == "type" and r.actions[0].text == expected


@pytest.mark.parametrize("direction", ["up", "down", "left", "right"])
@pytest.mark.parametrize("screen", [FHD, HD])
def test_scroll_each_direction(direction, screen):
    r = parse_reply(f"Thought: more\nAction: scroll(start_box='(400,400)', direction='{direction}')", screen)
    (a,) = r.actions
    assert a.type == "scroll" and a.direction == direction
    assert (a.x, a.y) == pytest.approx(px(screen, 400, 400))


def test_wait_finished_call_user():
    assert parse_reply("Thought: loading\nAction: wait()", FHD, wait_s=2.5).actions[0].seconds == 2.5
    a = parse_reply("Thought: done\nAction: finished(content='The answer is 42')", FHD).actions[0]
    assert a.type == "finished" and a.text == "The answer is 42" and a.is_terminal
    a = parse_reply("Thought: I cannot do this.\nAction: call_user()", FHD).actions[0]
    assert a.type == "call_user" and a.is_terminal


def test_thought_is_kept():
    r = parse_reply("Thought: I will click OK.\nAction: click(start_box='(1,1)')", FHD)
    assert r.thought == "I will click OK."


@pytest.mark.parametrize("reply,needle", [
    ("Thought: I am thinking but never act", "no 'Action:'"),
    ("", "no 'Action:'"),
    ("Thought: x\nAction: teleport(start_box='(1,1)')", "unknown action"),
    ("Thought: x\nAction: click(start_box='(abc,def)')", ""),
    ("Thought: x\nAction: click()", "missing start_box"),
    ("Thought: x\nAction: click(start_box='(5000,100)')", "outside"),
    ("Thought: x\nAction: scroll(start_box='(1,1)', direction='diagonal')", "direction"),
    ("Thought: x\nAction: click(start_box='(10,", ""),
    ("Thought: x\nAction: type(content='unterminated", ""),
    ("Action: ))))((((", ""),
    ("Thought: x\nAction: hotkey(key='')", ""),
])
def test_malformed_replies_are_invalid_not_exceptions(reply, needle):
    r = parse_reply(reply, FHD)
    if r.valid:  # the parser may repair a truncated type(); it must then be a harmless action
        assert all(a.type == "type" for a in r.actions), r
        return
    assert r.error and needle in r.error


def test_regex_replies_parse():
    import re

    ok = "Thought: click here\nAction: click(start_box='(120,45)')"
    assert re.fullmatch(ACTION_REGEX, ok)
    assert parse_reply(ok, FHD).valid


def _agent_state(agent, n_turns):
    st = agent.start("Do the thing.", FHD)
    for i in range(n_turns):
        agent.observe(st, f"png-{i}".encode())
        if i < n_turns - 1:
            agent.record_reply(st, f"Thought: t{i}\nAction: wait()")
    return st


def test_history_keeps_last_k_images_and_all_replies():
    agent = UITarsAgent(history_images=3)
    msgs = agent.messages(_agent_state(agent, 6))
    images = [m for m in msgs if m["role"] == "user" and m["content"][0]["type"] == "image_url"]
    replies = [m for m in msgs if m["role"] == "assistant"]
    assert len(images) == 3 and len(replies) == 5
    assert msgs[-1] == images[-1]
    assert "Do the thing." in msgs[1]["content"][0]["text"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prefix_stays_byte_identical_while_no_image_leaves(k):
    agent = make_agent("uitars", history_images=k)
    checked_extension = checked_window = 0
    for t in range(1, 8):
        before = agent.messages(_agent_state(agent, t))
        st = _agent_state(agent, t + 1)
        after = agent.messages(st)
        images = [i for i, m in enumerate(after) if m["role"] == "user" and m["content"][0]["type"] == "image_url"]
        # the last min(k, turns) screenshots, and the agent says which steps they are
        assert len(images) == min(k, t + 1) and agent.image_steps(st) == list(range(max(0, t + 1 - k), t + 1))
        if t + 1 <= k:  # no screenshot left the window: the new prompt extends the old one
            reply = {"role": "assistant", "content": st.turns[t - 1].reply}
            assert after[:len(before)] == before
            assert after[len(before)] == reply
            assert len(after) == len(before) + 2
            checked_extension += 1
        else:  # the oldest screenshot left: the prompts agree only up to where it was
            first_old_image = next(i for i, m in enumerate(before)
                                   if m["role"] == "user" and m["content"][0]["type"] == "image_url")
            assert after[:first_old_image] == before[:first_old_image]
            assert after[first_old_image] != before[first_old_image]
            checked_window += 1
    assert checked_extension == min(k - 1, 7) and checked_window == 7 - checked_extension


def test_empty_reply_is_still_an_assistant_turn():
    # the model can answer nothing; the next prompt must still extend the previous prompt plus
    # that (empty) reply, or the trajectory cannot become one token sequence
    agent = UITarsAgent(history_images=5)
    st = agent.start("Do the thing.", (100, 100))
    agent.observe(st, b"png0")
    before = agent.messages(st)
    agent.record_reply(st, "")
    agent.observe(st, b"png1")
    after = agent.messages(st)
    assert after[:len(before)] == before
    assert after[len(before)] == {"role": "assistant", "content": ""}
    assert [m["role"] for m in after[len(before):]] == ["assistant", "user"]


def test_prompt_has_language_and_instruction():
    p = prompt("Open the file", "Chinese")
    assert "Open the file" in p and "Use Chinese in `Thought` part." in p and "call_user()" in p


def test_unknown_agent_is_named():
    with pytest.raises(KeyError, match="unknown agent 'nope'"):
        make_agent("nope")
