"""agentenv inside verl: GUI trajectories on real desktops as verl agent-loop outputs.

Two ways in, both on verl's own agent-loop machinery (verl 0.9.x, ``verl.experimental.agent_loop``):

- **Agent loop** (``AgentenvAgentLoop``, registered as ``agentenv_gui``): verl's
  ``AgentLoopWorker`` runs one agentenv trajectory per dataset row. The loop leases a desktop from
  this worker process's ``EnvPool``, talks to the model through verl's server manager (token in,
  token out, one token stream per trajectory: ``TokenServerLLM`` with verl's continuous-token
  builder), scores with our evaluators, and returns ``AgentLoopOutput``: one sequence
  (``mode: sequence``; verl's classic trainer) or one output per step (``mode: step``; verl's
  streaming trainer, ``trainer/ppo/v1``, which takes a list per session and broadcasts the final
  output's advantage to the others).
- **Streaming** (``StreamingVerlRollout``): agentenv's own ``StreamingScheduler`` runs rollouts
  continuously and hands the trainer complete groups as they finish, converted by verl's own
  post-processing into the ``DataProto`` its trainer reads (padding, M-RoPE position ids,
  multi-modal inputs, ``rm_scores``, ``uid`` per group), with each step's policy version and the
  buffer's staleness bound.

``HTTPServerManager`` is verl's server-manager interface over vLLM servers you run yourself
(``scripts/start_vllm_service.sh --tokens-api``): for standalone rollout servers, and for tests on
the CPU build.

This module depends on ``agentenv.rollout`` and ``agentenv.envs``; nothing there imports it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import time
import weakref
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from pydantic import Field
from verl.experimental.agent_loop.agent_loop import (AgentLoopBase, AgentLoopMetrics, AgentLoopOutput,
                                                     AgentLoopWorker, register)
from verl.protocol import DataProto
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.replica import TokenOutput
from verl.workers.rollout.utils import qwen2_5_vl_dedup_image_tokens

from agentenv.config import RunConfig, StrictModel, load_config
from agentenv.envs.pool import EnvPool
from agentenv.rollout.llm import LLMError, Sampling, TokenServerLLM
from agentenv.rollout.loop import Rollout
from agentenv.rollout.samples import Mode, SequenceModeError, TrainSample, load_images, trajectory_samples
from agentenv.rollout.runner import run_leased
from agentenv.rollout.scheduler import StreamingScheduler
from agentenv.types import Group, Task, Trajectory

AGENT_NAME = "agentenv_gui"


# ----------------------------------------------------------------------------- settings


class VerlOptions(StrictModel):
    """The agent loop's own settings, from verl's agent-loop config file (the keys beside ``name``
    and ``_target_``). ``agentenv_config`` is an agentenv YAML (sections ``agent``, ``sampling``,
    ``loop``, ``env``, ``scheduler``; environment variables apply as for ``agentenv run``)."""

    agentenv_config: str | dict[str, Any] | None = None
    overrides: list[str] = Field(default_factory=list)   # section.key=value, as --set
    mode: Mode = "sequence"

    def run_config(self) -> RunConfig:
        if isinstance(self.agentenv_config, dict):
            return RunConfig.model_validate(self.agentenv_config)
        return load_config(self.agentenv_config, self.overrides)


def verl_sampling(s: Sampling, params: dict[str, Any], response_length: int) -> Sampling:
    """Our sampling with what verl's trainer sets for this call (``sampling_params``: temperature,
    top_p, logprobs) over it, and no more tokens than verl's ``response_length``; every other
    setting of ``s`` as it is."""
    mine = {k: params[k] for k in ("temperature", "top_p", "logprobs") if params.get(k) is not None}
    return Sampling.model_validate({**s.model_dump(), **mine, "max_tokens": min(s.max_tokens, response_length)})


# ----------------------------------------------------------------------------- desktops per process

_POOLS: dict[str, EnvPool] = {}
_POOLS_LOCK: asyncio.Lock | None = None


async def worker_pool(cfg: RunConfig) -> EnvPool:
    """The EnvPool of this worker process for ``cfg.env.services``: made once, shared by every
    agent loop the worker runs (each loop instance lives for one sample)."""
    global _POOLS_LOCK
    if not cfg.env.services:
        raise ValueError("the verl agent loop needs env services: set env.services in the agentenv config "
                         "(or ENV_SERVER_URL / ENV_TOKEN), one entry per `agentenv serve-envs`")
    key = json.dumps([[s.url, s.token, s.desktops] for s in cfg.env.services])
    if _POOLS_LOCK is None:
        _POOLS_LOCK = asyncio.Lock()
    async with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = await EnvPool(list(cfg.env.services), timeout_s=cfg.loop.step_timeout_s).start()
        return pool


async def close_worker_pools() -> None:
    while _POOLS:
        await _POOLS.popitem()[1].aclose()


# ----------------------------------------------------------------------------- samples -> verl outputs


def png_to_image(png: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB")


def to_output(sample: TrainSample, images: list[Any], traj: Trajectory, *, response_length: int,
              mm_processor_kwargs: dict[str, Any] | None = None) -> AgentLoopOutput:
    """One verl ``AgentLoopOutput`` from one train sample. The response is cut to verl's
    ``response_length`` (the cut is recorded in ``extra_fields``)."""
    n = response_length
    steps = traj.steps if sample.step is None else [traj.steps[sample.step]]
    versions = sample.policy_versions or [0]
    info = {"task_id": traj.task_id, "sample": traj.sample, "step": sample.step, "status": traj.status.value,
            "reason": traj.reason, "policy_versions": sample.policy_versions,
            "truncated": max(0, len(sample.response_ids) - n)}
    return AgentLoopOutput(
        prompt_ids=sample.prompt_ids, response_ids=sample.response_ids[:n], response_mask=sample.response_mask[:n],
        response_logprobs=sample.response_logprobs[:n] if sample.response_logprobs is not None else None,
        multi_modal_data={"images": images} if images else None,
        mm_processor_kwargs=mm_processor_kwargs or None,
        reward_score=float(sample.reward), num_turns=sample.num_turns + 1,
        metrics=AgentLoopMetrics(generate_sequences=sum(s.llm_latency_s for s in steps),
                                 tool_calls=sum(s.env_latency_s for s in steps)),
        # the reward is ours already: verl computes none, and its reward_extra_info is empty
        extra_fields={"agentenv": info, "turn_scores": [], "tool_rewards": [], "reward_extra_info": {},
                      "min_global_steps": min(versions), "max_global_steps": max(versions)})


# ----------------------------------------------------------------------------- the agent loop


def task_of(row: dict[str, Any]) -> Task:
    """The agentenv task of a verl dataset row: ``extra_info.task`` (its JSON, as ``write_dataset``
    writes it)."""
    extra = row.get("extra_info") or {}
    raw = extra.get("task") if isinstance(extra, dict) else None
    if raw is None:
        raise ValueError("the dataset row has no extra_info.task: write the dataset with "
                         "agentenv.integrations.verl.write_dataset (or `agentenv verl-dataset`)")
    return Task.from_dict(json.loads(raw) if isinstance(raw, str) else raw, source="verl dataset")


_SAMPLES = itertools.count()


@register(AGENT_NAME)
class AgentenvAgentLoop(AgentLoopBase):
    """One agentenv trajectory per verl sample (see the module docstring).

    verl's agent-loop config file::

        - name: agentenv_gui
          _target_: agentenv.integrations.verl.AgentenvAgentLoop
          agentenv_config: /path/to/agentenv.yaml
          mode: sequence            # or step (verl's streaming trainer, trainer/ppo/v1)
    """

    def __init__(self, trainer_config: Any, server_manager: Any, tokenizer: Any, processor: Any, *args: Any,
                 agentenv_config: str | dict | None = None, overrides: list[str] | None = None,
                 mode: Mode = "sequence", **kwargs: Any):
        super().__init__(trainer_config, server_manager, tokenizer, processor, *args, **kwargs)
        opts = VerlOptions(agentenv_config=_plain(agentenv_config), overrides=list(overrides or []), mode=mode)
        self.mode = opts.mode
        self.cfg = opts.run_config()
        if self.mode == "sequence" and self.cfg.agent.history_images < self.cfg.loop.max_steps:
            raise ValueError(
                f"mode sequence needs every screenshot kept (agent.history_images >= loop.max_steps), got "
                f"{self.cfg.agent.history_images} < {self.cfg.loop.max_steps}: once the agent drops an old "
                "screenshot its prompts stop extending each other. Use mode: step (verl's streaming trainer) "
                "for UI-TARS's 5-screenshot window.")
        self.response_length = self.rollout_config.response_length

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput | list[AgentLoopOutput]:
        task = task_of(kwargs)
        pool = await worker_pool(self.cfg)
        pngs: dict[str, bytes] = {}

        def keep(traj: Trajectory, name: str, png: bytes) -> str:
            pngs[name] = png
            return name

        llm = TokenServerLLM(self.server_manager, self.processor, builder=self.continuous_token_builder,
                             mm_processor_kwargs=self.mm_processor_kwargs, name="verl")
        rollout = Rollout.from_config(self.cfg, llm)
        rollout.sampling = verl_sampling(rollout.sampling, sampling_params, self.response_length)
        rollout.save_screenshot = keep
        traj = Trajectory(task_id=task.id, sample=int(kwargs.get("session_id", next(_SAMPLES))), started_at=time.time())
        await run_leased(traj, task, pool, rollout, self.cfg.scheduler)  # the scheduler's own policy
        return self._outputs(traj, pngs, task)

    def _outputs(self, traj: Trajectory, pngs: dict[str, bytes], task: Task
                 ) -> AgentLoopOutput | list[AgentLoopOutput]:
        def images(sample: TrainSample) -> list[Any]:
            return [png_to_image(pngs[f"step-{k:03d}"]) for k in sample.image_steps]

        kw = dict(response_length=self.response_length, mm_processor_kwargs=self.mm_processor_kwargs)
        if traj.status.trainable and traj.steps:
            try:
                samples = trajectory_samples(traj, self.mode)
            except SequenceModeError as e:
                logger.warning("{}: {}; the sample is returned with no tokens to learn from", traj.key, e)
                traj.reason += f"; not one sequence: {e}"
            else:
                outs = [to_output(s, images(s), traj, **kw) for s in samples]
                return outs if self.mode == "step" else outs[0]
        if self.mode == "step":
            return []  # verl's streaming trainer drops a session with no outputs
        # verl's classic trainer needs an output for every sample: one with nothing to learn from
        return self._masked_output(traj, task, images, kw)

    def _masked_output(self, traj: Trajectory, task: Task, images: Any, kw: dict[str, Any]) -> AgentLoopOutput:
        """The trajectory as one sequence whose mask is all zeros: an infrastructure failure, a broken
        task or a trajectory that is not one sequence gives the trainer no gradient, only its row."""
        if traj.steps:
            prompts = traj.prompt_ids()
            first = traj.steps[0]
            sample = TrainSample(traj.task_id, traj.sample, None, prompts[0], list(first.token_ids),
                                 [0] * len(first.token_ids),
                                 [0.0] * len(first.token_ids) if first.logprobs is not None else None,
                                 list(first.image_steps), 0.0, [first.policy_version], 2)
        else:
            prompt = self.continuous_token_builder.build_initial_tokens([{"role": "user", "content": task.instruction}])
            eos = self.tokenizer.eos_token_id
            sample = TrainSample(traj.task_id, traj.sample, None, [int(t) for t in prompt], [eos], [0], None, [],
                                 0.0, [], 0)
        return to_output(sample, images(sample), traj, **kw)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


# ----------------------------------------------------------------------------- datasets


def write_dataset(tasks: list[Task], path: str | Path, *, data_source: str = "agentenv") -> Path:
    """A parquet file verl's RLHFDataset reads: one row per task, ``agent_name`` set to this loop,
    the task itself in ``extra_info.task`` (its instruction as the row's prompt, for verl's logs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": data_source, "agent_name": AGENT_NAME,
             "prompt": [{"role": "user", "content": t.instruction}],
             "reward_model": {"style": "rule", "ground_truth": ""},
             "extra_info": {"index": i, "task_id": t.id, "task": json.dumps(t.to_dict())}}
            for i, t in enumerate(tasks)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ----------------------------------------------------------------------------- a server manager over HTTP


class HTTPServerManager(LLMServerClient):
    """verl's server manager (``LLMServerClient``) over vLLM servers reached by HTTP, through vLLM's
    tokens-in/tokens-out route ``/inference/v1/generate`` (``start_vllm_service.sh --tokens-api``).
    A request id sticks to one server (hash), so a trajectory's turns share its prefix cache.
    ``policy_version`` is reported as ``extra_fields["global_steps"]``, as verl's own servers do."""

    def __init__(self, urls: str | list[str], processor: Any, *, model: str | None = None,
                 timeout_s: float = 300.0, policy_version: int = 0, config: Any = None):
        super().__init__(config=config or OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "vllm"}}}))
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.roots = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.processor, self.model, self.policy_version = processor, model, policy_version
        self.timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None  # made in the event loop that uses it
        self._urls: dict[int, str] = {}  # PNG data URL of each live image: a trajectory resends its images

    def __getstate__(self) -> dict[str, Any]:  # verl hands its server manager to Ray actors
        return {**self.__dict__, "_http": None, "_urls": {}}

    def _url(self, image: Any) -> str:
        key = id(image)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = _data_url(image)
            weakref.finalize(image, self._urls.pop, key, None)
        return url

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=5.0))
        return self._http

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: list[Any] | None = None, video_data: Any = None, audio_data: Any = None,
                       mm_processor_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> TokenOutput:
        if video_data or audio_data:
            raise ValueError("HTTPServerManager sends images only")
        root = self.roots[zlib.crc32(str(request_id).encode()) % len(self.roots)]
        params = {k: v for k, v in sampling_params.items() if v is not None}
        params["logprobs"] = 0 if params.pop("logprobs", False) else None
        so = params.get("structured_outputs")
        if so is not None and not isinstance(so, dict):  # vLLM's own type, from TokenServerLLM
            params["structured_outputs"] = {"regex": so.regex}
        body: dict[str, Any] = {
            # the server expands each image's single placeholder itself, as verl's vLLM server does
            "token_ids": qwen2_5_vl_dedup_image_tokens(list(prompt_ids), self.processor),
            "sampling_params": params, "request_id": f"{request_id}-{next(_SAMPLES)}",
        }
        if self.model:
            body["model"] = self.model
        if image_data:
            body["content_parts"] = [{"type": "image_url", "url": self._url(im)} for im in image_data]
        r = await self.http.post(root + "/inference/v1/generate", json=body)
        if r.status_code >= 400:
            raise LLMError(root, r.text[:500], r.status_code)
        choice = r.json()["choices"][0]
        lp = (choice.get("logprobs") or {}).get("content")
        return TokenOutput(token_ids=choice["token_ids"], log_probs=[c["logprob"] for c in lp] if lp else None,
                           stop_reason="completed", extra_fields={"global_steps": self.policy_version})

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- streaming mode


class VerlBatcher:
    """agentenv groups -> the ``DataProto`` a verl trainer reads, made by verl's own post-processing
    (``AgentLoopWorker._agent_loop_postprocess`` per sample, ``_postprocess`` for the batch)."""

    def __init__(self, verl_config: DictConfig, *, mode: Mode = "step"):
        self.worker = AgentLoopWorker(verl_config, llm_client=None)
        self.mode = mode
        self.response_length = self.worker.rollout_config.response_length
        self.mm_processor_kwargs = dict(self.worker.mm_processor_kwargs or {})

    async def batch(self, groups: list[Group], run_dir: str | Path) -> DataProto:
        outputs, uids, versions = [], [], []
        for g in groups:
            for t in g.trajectories:
                for s in trajectory_samples(t, self.mode):
                    images = await asyncio.to_thread(load_images, run_dir, t, s)
                    outputs.append(to_output(s, images, t, response_length=self.response_length,
                                             mm_processor_kwargs=self.mm_processor_kwargs))
                    uids.append(g.task_id)
                    versions.append(min(s.policy_versions or [0]))
        if not outputs:
            raise ValueError("no trainable samples in these groups")
        rows = {"raw_prompt": np.array([[{"role": "user", "content": ""}]] * len(outputs), dtype=object)}
        padded = [await self.worker._agent_loop_postprocess(o, False, **{k: v[i] for k, v in rows.items()})
                  for i, o in enumerate(outputs)]
        out = self.worker._postprocess(padded)
        out.non_tensor_batch["uid"] = np.array(uids, dtype=object)
        out.non_tensor_batch["agentenv_policy_version"] = np.array(versions, dtype=np.int64)
        return out


class StreamingVerlRollout:
    """agentenv's StreamingScheduler feeding a verl trainer.

    The scheduler runs in the caller's event loop and keeps every desktop busy; ``next_batch``
    returns as soon as ``n_groups`` complete groups are in the buffer (older than the buffer's
    ``max_staleness`` policy versions: dropped or flagged), as one ``DataProto``; ``update_weights``
    swaps weights without stopping rollouts (or pauses, swaps and resumes, for an LLM that cannot).

        async with StreamingVerlRollout(scheduler, VerlBatcher(verl_config, mode="step")) as stream:
            for step in range(steps):
                batch = await stream.next_batch(8)   # 8 groups, uid = group, rm_scores = our rewards
                ...update the policy with batch...
                await stream.update_weights(step + 1, path=checkpoint_dir)   # endpoint by endpoint
        stream.summary                                 # the scheduler's, once it stopped

    The scheduler's task belongs to the stream: the block's end (or ``stop()``, after ``start()``)
    stops admission and awaits it; an error in the block cancels it (trajectories in flight are
    abandoned, their desktops given back).
    """

    def __init__(self, scheduler: StreamingScheduler, batcher: VerlBatcher):
        if scheduler.buffer.dir is None or not scheduler.buffer.save_screenshots:
            raise ValueError("streaming mode reads each sample's screenshots from the run directory: give the "
                             "buffer a directory and keep output.screenshots on")
        self.scheduler, self.batcher = scheduler, batcher
        self.summary: dict[str, Any] | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "StreamingVerlRollout":
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, *exc: object) -> None:
        if et is None:
            await self.stop()
            return
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        await asyncio.gather(*([task] if task else []), return_exceptions=True)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("this stream was started already")
        self._task = asyncio.get_running_loop().create_task(self.scheduler.run(), name="agentenv:scheduler")

    async def next_batch(self, n_groups: int, timeout: float | None = None) -> DataProto:
        assert self._task is not None, "start() the stream first"
        get = asyncio.ensure_future(self.scheduler.buffer.get_batch(n_groups))
        try:
            await asyncio.wait({get, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:  # the getter is ours: it never outlives this call
            if not get.done():
                get.cancel()
            await asyncio.gather(get, return_exceptions=True)
        if get.cancelled():
            if self._task.done():
                raise RuntimeError(f"the scheduler ended before {n_groups} more groups were complete: "
                                   f"{self._task.result()}")
            raise TimeoutError(f"fewer than {n_groups} complete groups after {timeout}s")
        return await self.batcher.batch(get.result(), self.scheduler.buffer.dir)

    async def update_weights(self, version: int, *, swap: Any = None, **how: Any) -> None:
        """Serve policy ``version``. ``how`` goes to the LLM's rolling update, endpoint by endpoint
        (``ServiceLLM``: ``path=`` or ``lora=``); with ``swap`` (an async callable that swaps the
        weights itself, e.g. through verl's checkpoint engine) rollouts pause around it instead."""
        if swap is None:
            await self.scheduler.update_weights(version, **how)
            return
        await self.scheduler.pause()
        try:
            await swap()
        finally:
            self.scheduler.resume(version)

    async def stop(self) -> dict[str, Any]:
        """Stop admitting, let the trajectories in flight finish, and return the scheduler's summary."""
        self.scheduler.stop()
        assert self._task is not None, "start() the stream first"
        self.summary = await self._task
        return self.summary
