"""Step mode through verl's v1 (streaming) trainer machinery: verl's ``AgentLoopWorkerTQ`` as a
real Ray actor on a local Ray cluster bound to loopback, our agent loop inside it, one output per
step put into verl's TransferQueue, the tiny model on the vLLM CPU server, real desktops.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.osworld.test_streaming_task_sampling import CLICK_ONLY, tasks

pytestmark = pytest.mark.slow
pytest.importorskip("transfer_queue", reason="installed by scripts/install.sh")

from agentenv.config import TINY_MODEL  # noqa: E402
from agentenv.integrations.verl import AGENT_NAME, HTTPServerManager, write_dataset  # noqa: E402
from tests.verl.test_verl import verl_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_ray():
    """A Ray cluster of our own, on loopback, ended with the test (never someone else's)."""
    import ray

    os.environ["PYTHONPATH"] = str(ROOT)  # the actor imports agentenv
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace=f"agentenv-test-{uuid.uuid4().hex[:6]}", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


async def test_step_outputs_go_into_verls_transfer_queue(local_ray, vllm_server, env_service, tmp_path, tiny_pixels):
    import transfer_queue as tq
    from omegaconf import OmegaConf
    from transformers import AutoProcessor
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    a = tmp_path / "agentenv.json"
    a.write_text(json.dumps({"env": {"services": [{"url": env_service.url, "token": env_service.token}]},
                             "agent": {"history_images": 2, "min_pixels": tiny_pixels[0],
                                       "max_pixels": tiny_pixels[1], "wait_s": 0.2},
                             "sampling": {"max_tokens": 48, "regex": CLICK_ONLY}, "loop": {"max_steps": 3}}))
    loops = tmp_path / "loops.yaml"
    loops.write_text(f"- name: {AGENT_NAME}\n  _target_: agentenv.integrations.verl.AgentenvAgentLoop\n"
                     f"  agentenv_config: {a}\n  mode: step\n")
    cfg = verl_config(loops)
    cfg.actor_rollout_ref.rollout.n = 2
    cfg.data.return_raw_chat = True
    tq.init(OmegaConf.create({"backend": {"storage_backend": "SimpleStorage",
                                          "SimpleStorage": {"total_storage_size": 1000, "num_data_storage_units": 1}}}))
    try:
        proc = AutoProcessor.from_pretrained(TINY_MODEL)
        worker = AgentLoopWorkerTQ.options(num_cpus=0).remote(
            cfg, HTTPServerManager(vllm_server.url, proc, model=vllm_server.model, policy_version=3))
        chosen = tasks()[:2]
        ds = RLHFDataset(str(write_dataset(chosen, tmp_path / "train.parquet")), proc.tokenizer, cfg.data, proc)
        rows = collate_fn([ds[i] for i in range(len(ds))])
        rows["uid"] = np.array([str(uuid.uuid4()) for _ in chosen], dtype=object)
        batch = tu.get_tensordict(rows)
        tu.assign_non_tensor_data(batch, "global_steps", 3)
        uids = list(batch["uid"])
        tq.kv_batch_put(keys=uids, partition_id="train",
                        tags=[{"is_prompt": True, "status": "pending", "global_steps": 3}] * len(uids))
        await worker.generate_sequences.remote(batch)  # returns at once: the loops run in the actor
        for _ in range(900):
            listed = (await tq.async_kv_list(partition_id="train"))["train"]
            if all(listed[u]["status"] != "pending" for u in uids) and \
                    all(listed[u]["status"] in ("finished", "failure") for u in uids):
                break
            await asyncio.sleep(0.5)
        assert all(listed[u]["status"] == "finished" for u in uids), {u: listed[u] for u in uids}
        keys = sorted(k for k in listed if k not in uids)
        data = await tq.async_kv_batch_get(keys=keys, partition_id="train")
    finally:
        tq.close()
    # one output per step, keyed {uid}_{session}_{step}: both sessions (rollout.n) of both prompts
    sessions: dict[str, list[int]] = {}
    for k in keys:
        uid, session, step = k.rsplit("_", 2)
        sessions.setdefault(f"{uid}_{session}", []).append(int(step))
    assert len(sessions) == 2 * 2 and all(sorted(v) == list(range(len(v))) for v in sessions.values())
    infos = list(data["extra_fields"])
    for i, k in enumerate(keys):
        info = infos[i]["agentenv"]
        assert info["step"] == int(k.rsplit("_", 1)[1]) and info["policy_versions"] == [3]
        assert data["response_mask"][i].sum() == data["responses"][i].numel()  # step mode: all the model's
        assert len(data["multi_modal_inputs"][i]["image_grid_thw"]) == min(2, info["step"] + 1)  # the window
    # the steps of a session carry the trajectory's reward (verl broadcasts the final output's advantage)
    rewards: dict[str, set[float]] = {}
    for i, k in enumerate(keys):
        rewards.setdefault(k.rsplit("_", 1)[0], set()).add(float(data["rm_scores"][i].sum()))
    assert all(len(r) == 1 for r in rewards.values()), rewards
