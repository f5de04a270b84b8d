"""The agent holds only the screenshots its history window can still show (pure logic)."""

from __future__ import annotations

from agentenv.rollout.agent import UITarsAgent


def test_screenshots_out_of_the_window_leave_memory_and_the_prompt_is_unchanged():
    agent = UITarsAgent(history_images=3)
    state = agent.start("do it", (1920, 1080))
    for i in range(8):
        agent.observe(state, bytes([i]) * 100)
        agent.record_reply(state, f"Thought: {i}\nAction: wait()")
    assert [bool(t.image_url) for t in state.turns] == [False] * 5 + [True] * 3
    msgs = agent.messages(state)
    images = [c["image_url"]["url"] for m in msgs if isinstance(m["content"], list)
              for c in m["content"] if c.get("type") == "image_url"]
    assert images == [t.image_url for t in state.turns[5:]]  # the window's three, in order
    assert sum(1 for m in msgs if m["role"] == "assistant") == 8  # every reply is still a turn
