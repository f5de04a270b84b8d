"""agentenv inside verl, on verl's own agent-loop machinery (verl 0.9.1, installed without its
transformers pin), the tiny model on the real vLLM CPU server and real desktops.

The narrowest real verl entry that turns agent-loop outputs into the batch its trainer reads is
``AgentLoopWorker.generate_sequences``: our loop is registered through verl's agent-loop config
file, instantiated by verl with hydra, and its outputs padded, position-encoded (M-RoPE) and
batched by verl. The server manager is ``HTTPServerManager`` (verl's ``LLMServerClient``) over the
real vLLM server's tokens-in/tokens-out route.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.osworld.test_streaming_task_sampling import CLICK_ONLY, tasks

pytestmark = pytest.mark.slow

verl_mod = pytest.importorskip("agentenv.integrations.verl", reason="verl is installed by scripts/install.sh")

from agentenv.config import TINY_MODEL  # noqa: E402
from agentenv.integrations.verl import (AGENT_NAME, HTTPServerManager, StreamingVerlRollout,  # noqa: E402
                                        VerlBatcher, close_worker_pools, write_dataset)
from agentenv.rollout.llm import TokenServerLLM, as_llm  # noqa: E402
from agentenv.types import Task  # noqa: E402

# setup writes the file the evaluator wants: a reward of 1 that only our evaluator can give
FREE = Task(id="free-reward", instruction="Nothing to do.",
            config=[{"type": "execute", "parameters": {"command": "printf %s ok > ~/Documents/ready.txt",
                                                        "shell": True}}],
            evaluator={"func": "exact_match", "result": {"type": "vm_file", "path": "~/Documents/ready.txt"},
                       "expected": {"type": "rule", "rules": {"expected": "ok"}}})


def verl_config(loop_config: Path, *, response_length: int = 2048):
    import verl
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    r = cfg.actor_rollout_ref.rollout
    cfg.actor_rollout_ref.model.path = str(TINY_MODEL)
    r.name, r.prompt_length, r.response_length = "vllm", 8192, response_length
    r.calculate_log_probs, r.temperature = True, 1.0
    r.agent.agent_loop_config_path = str(loop_config)
    return cfg


def agentenv_config(env_service, tiny_pixels, *, history: int, max_steps: int) -> dict:
    return {"env": {"services": [{"url": env_service.url, "token": env_service.token}]},
            "agent": {"history_images": history, "min_pixels": tiny_pixels[0], "max_pixels": tiny_pixels[1],
                      "wait_s": 0.2},
            "sampling": {"max_tokens": 48, "regex": CLICK_ONLY}, "loop": {"max_steps": max_steps}}


class RecordingServer(HTTPServerManager):
    """The real server manager, keeping what the server returned, to compare with the batch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.returned: list[list[int]] = []

    async def generate(self, request_id, **kw):
        out = await super().generate(request_id, **kw)
        self.returned.append(list(out.token_ids))
        return out


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every run of ones."""
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


async def test_verl_agent_loop_worker_builds_the_trainer_batch(vllm_server, env_service, tmp_path, tiny_pixels):
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    cfg_file = tmp_path / "agentenv.json"
    cfg_file.write_text(json.dumps(agentenv_config(env_service, tiny_pixels, history=3, max_steps=3)))
    loops = tmp_path / "agent_loops.yaml"
    loops.write_text(f"- name: {AGENT_NAME}\n  _target_: agentenv.integrations.verl.AgentenvAgentLoop\n"
                     f"  agentenv_config: {cfg_file}\n  mode: sequence\n")
    config = verl_config(loops)
    worker = AgentLoopWorker(config, llm_client=None)
    server = RecordingServer(vllm_server.url, worker.processor, model=vllm_server.model, policy_version=4)
    worker.llm_client = server
    chosen = [FREE, *tasks()[:2]]
    import pyarrow.parquet as pq
    from verl.protocol import DataProto

    rows = pq.read_table(write_dataset(chosen, tmp_path / "train.parquet")).to_pylist()
    batch = DataProto.from_single_dict({
        "raw_prompt": np.array([r["prompt"] for r in rows], dtype=object),
        "agent_name": np.array([r["agent_name"] for r in rows], dtype=object),
        "extra_info": np.array([r["extra_info"] for r in rows], dtype=object),
        "index": np.array([r["extra_info"]["index"] for r in rows]),
        "data_source": np.array([r["data_source"] for r in rows], dtype=object),
    })
    try:
        out = await worker.generate_sequences(batch)
    finally:
        await server.aclose()
        await close_worker_pools()

    b, nt = out.batch, out.non_tensor_batch
    assert b["responses"].shape[0] == 3 and b["position_ids"].shape[1] == 4  # M-RoPE: text + 3 vision axes
    tok = worker.tokenizer
    returned = {tuple(t) for t in server.returned}
    for i, task in enumerate(chosen):
        info = nt["agentenv"][i]  # our extra_fields, as verl puts them in the batch
        assert info["task_id"] == task.id and info["status"] in ("max_steps", "finished", "call_user"), info
        mask = b["response_mask"][i].tolist()
        resp = b["responses"][i].tolist()
        runs = _runs(mask)
        # the mask is one exactly on the model's tokens: each run is a reply the server returned, whole
        assert len(runs) == len(info["policy_versions"]) >= 1
        for s, e in runs:
            assert tuple(resp[s:e]) in returned
            assert tok.decode(resp[s:e], skip_special_tokens=True).startswith("Thought: ")
        # ... and zero on what the template and the environment added (image placeholders included)
        pad = worker.processor.image_token_id
        assert all(m == 0 for t, m in zip(resp, mask) if t == pad)
        # every screenshot the sequence shows is in the sample's multi-modal inputs
        mm = nt["multi_modal_inputs"][i]
        assert mm["image_grid_thw"].shape[0] == len(runs) and mm["pixel_values"].shape[0] > 0
        assert info["policy_versions"] == [4] * len(runs)  # the server's global step, per turn
        # the reward is our evaluator's, on the last response token
        reward = float(b["rm_scores"][i].sum())
        assert reward == (1.0 if task is FREE else 0.0)
        logp = b["rollout_log_probs"][i].tolist()
        # the server's logprobs on the model's tokens (0 where the action grammar left one choice), none elsewhere
        assert all(lp <= 0 for lp, m in zip(logp, mask) if m) and any(lp < 0 for lp, m in zip(logp, mask) if m)
        assert all(lp == 0 for lp, m in zip(logp, mask) if not m)
    _each_turn_scores_as_its_own_prompt(out)


def _each_turn_scores_as_its_own_prompt(out) -> None:
    """What the actor computes for the PPO ratio: one forward pass of the model over the whole sample
    (the batch's M-RoPE positions, every screenshot) must score each reply as the model scored it on
    that turn's own prompt (that prefix, with only the screenshots it showed). A prompt that did not
    extend the previous turn, a lost reply or images out of order would show as a large difference.
    (Not compared with the server's logprobs: the tiny model decodes under the action grammar, so those
    are the constrained distribution's; an unconstrained model's match the forward pass.)"""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    vision_start = model.config.vision_start_token_id
    b, nt = out.batch, out.non_tensor_batch
    P = b["prompts"].shape[1]
    checked = 0
    for i in range(len(out)):
        am = b["attention_mask"][i].bool()
        mm = nt["multi_modal_inputs"][i]
        ids = b["input_ids"][i][am]
        plen, rlen = int(b["attention_mask"][i, :P].sum()), int(b["attention_mask"][i, P:].sum())
        with torch.no_grad():
            whole = model(input_ids=ids[None], position_ids=b["position_ids"][i][:, am].unsqueeze(1),
                          pixel_values=mm["pixel_values"].float(), image_grid_thw=mm["image_grid_thw"]).logits[0]
        whole = torch.log_softmax(whole.float(), -1)
        patches = mm["image_grid_thw"].prod(-1).tolist()
        for s, e in _runs(b["response_mask"][i, :rlen].tolist()):
            start, end = plen + s, plen + e
            shown = int((ids[:start] == vision_start).sum())
            with torch.no_grad():
                turn = model(input_ids=ids[None, :end], pixel_values=mm["pixel_values"][:sum(patches[:shown])].float(),
                             image_grid_thw=mm["image_grid_thw"][:shown]).logits[0]
            turn = torch.log_softmax(turn.float(), -1)
            at, tok = start - 1 + torch.arange(e - s), ids[start:end]
            diff = (whole[at, tok] - turn[at, tok]).abs()
            assert float(diff.max()) < 0.1, (i, (s, e), float(diff.max()))
            checked += 1
    assert checked >= len(out)


async def test_streaming_mode_feeds_complete_groups_in_step_mode(vllm_server, env_service, tmp_path, tiny_pixels):
    """Our scheduler feeds the trainer: UI-TARS-like history (2 screenshots, 4 steps) is not one
    sequence, so each step is a sample; groups share a uid; policy versions ride along."""
    from agentenv.config import SchedulerConfig
    from agentenv.config import ServiceConfig
    from agentenv.envs.pool import EnvPool
    from agentenv.rollout.agent import UITarsAgent
    from agentenv.rollout.buffer import TrajectoryBuffer
    from agentenv.rollout.llm import Sampling
    from agentenv.rollout.loop import Rollout
    from agentenv.rollout.scheduler import StreamingScheduler
    from agentenv.rollout.sources import TaskSource
    from agentenv.config import LoopConfig

    loops = tmp_path / "agent_loops.yaml"
    loops.write_text("[]\n")
    batcher = VerlBatcher(verl_config(loops), mode="step")
    pool = await EnvPool([ServiceConfig(url=env_service.url, token=env_service.token)]).start()
    agent = UITarsAgent(history_images=2, min_pixels=tiny_pixels[0], max_pixels=tiny_pixels[1], wait_s=0.2)
    rollout = Rollout(as_llm(vllm_server.url, model=vllm_server.model), agent,
                      Sampling(max_tokens=48, regex=CLICK_ONLY, logprobs=True), LoopConfig(max_steps=4))
    sched = StreamingScheduler(rollout, pool, TrajectoryBuffer(tmp_path / "run", 2), TaskSource(tasks()[:3]),
                               SchedulerConfig(rollout_n=2), policy_version=2)
    try:
        async with StreamingVerlRollout(sched, batcher) as stream:  # the scheduler's task is the block's
            first = await stream.next_batch(2, timeout=600)
            rest = await stream.next_batch(1, timeout=600)
    finally:
        await pool.aclose()
    summary = stream.summary
    assert summary is not None and summary["groups"] == 3
    from agentenv.rollout.buffer import read_trajectories

    trajs = read_trajectories(tmp_path / "run")
    for out, n_groups in ((first, 2), (rest, 1)):
        uids = list(out.non_tensor_batch["uid"])
        assert len(set(uids)) == n_groups
        # one row per step of every trajectory of those groups, all rows of a group under its uid
        assert len(out) == sum(len(t.steps) for t in trajs if t.task_id in set(uids))
        assert all(v == 2 for v in out.non_tensor_batch["agentenv_policy_version"])
        for i in range(len(out)):
            mask = out.batch["response_mask"][i].tolist()
            assert mask == out.batch["attention_mask"][i, -len(mask):].tolist()  # every response token is the model's
            assert out.non_tensor_batch["multi_modal_inputs"][i]["image_grid_thw"].shape[0] in (1, 2)
    # at least one trajectory went past the 2-screenshot window, where step mode is needed
    assert any(len(t.steps) > 2 for t in trajs)


async def test_as_llm_takes_verls_server_manager(vllm_server, env_service, tiny_pixels):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(TINY_MODEL)
    server = HTTPServerManager(vllm_server.url, proc, model=vllm_server.model)
    try:
        with pytest.raises(TypeError, match="processor="):
            as_llm(server)
        llm = as_llm(server, processor=proc)
        assert isinstance(llm, TokenServerLLM)
        from tests.osworld.test_llm import GREEDY, screenshot_messages
        from agentenv.rollout.llm import ServiceLLM

        here = await llm.chat(screenshot_messages(), GREEDY, session="s")
        service = ServiceLLM(vllm_server.url, vllm_server.model)
        there = await service.chat(screenshot_messages(), GREEDY)
        await service.aclose()
        # the same prompt, token for token, as the server's own chat endpoint renders it; the same reply
        assert here.prompt_token_ids == there.prompt_token_ids and here.token_ids == there.token_ids
        assert here.text == there.text
    finally:
        await server.aclose()


def test_the_gpu_example_composes_and_instantiates_our_loop(tmp_path, monkeypatch):
    """examples/verl: verl's own hydra config composes with the example's file (every key is one
    verl knows), and the agent loop it names is instantiated the way verl's worker does it. The
    training itself needs GPUs (examples/verl/README.md)."""
    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap

    from agentenv.integrations.verl import AgentenvAgentLoop

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    monkeypatch.setenv("DATA", str(tmp_path))
    with initialize_config_dir(config_dir=str(root / "examples" / "verl"), version_base=None):
        cfg = compose(config_name="grpo_uitars", overrides=[f"actor_rollout_ref.model.path={TINY_MODEL}"])
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.actor_rollout_ref.rollout.n == 8
    assert cfg.trainer.use_v1 and cfg.data.train_files == f"{tmp_path}/train.parquet"
    loops = OmegaConf.load(cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path)
    (entry,) = [e for e in loops if e.name == cfg.actor_rollout_ref.rollout.agent.default_agent_loop]
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    worker = AgentLoopWorker(cfg, llm_client=None)
    loop = hydra.utils.instantiate(entry, trainer_config=DictConfigWrap(cfg), server_manager=None,
                                   tokenizer=worker.tokenizer, processor=worker.processor, hf_model_type="qwen2_5_vl",
                                   dataset_cls=worker.dataset_cls, data_config=DictConfigWrap(cfg.data))
    assert isinstance(loop, AgentenvAgentLoop) and loop.mode == "step"
    assert loop.cfg.agent.history_images == 5 and loop.cfg.agent.max_pixels == cfg.data.mm_processor_kwargs.max_pixels
    # and the dataset step of the recipe writes what verl's RLHFDataset reads
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "agentenv", "verl-dataset", "--out", str(tmp_path / "train.parquet")],
                       capture_output=True, text=True, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    from verl.utils.dataset.rl_dataset import RLHFDataset

    ds = RLHFDataset(str(tmp_path / "train.parquet"), worker.tokenizer, cfg.data, worker.processor)
    row = ds[0]
    assert row["agent_name"] == "agentenv_gui" and json.loads(row["extra_info"]["task"])["id"] == row["extra_info"]["task_id"]


def test_sequence_mode_with_a_window_is_refused_at_start(tmp_path):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap

    from agentenv.integrations.verl import AgentenvAgentLoop

    loops = tmp_path / "loops.yaml"
    loops.write_text("[]\n")
    cfg = verl_config(loops)
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    worker = AgentLoopWorker(cfg, llm_client=None)
    with pytest.raises(ValueError, match="history_images >= loop.max_steps.*mode: step"):
        AgentenvAgentLoop(DictConfigWrap(cfg), None, worker.tokenizer, worker.processor, worker.dataset_cls,
                          DictConfigWrap(cfg.data), agentenv_config={"agent": {"history_images": 5}}, mode="sequence")
