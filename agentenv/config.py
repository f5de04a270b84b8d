"""One config object for a run, loaded from YAML, then environment variables, then CLI overrides.

    cfg = load_config("run.yaml", overrides=["scheduler.rollout_n=4", "loop.max_steps=10"])

Each section is the settings object of one concern, and the code of that concern takes it as
is: ``Sampling`` goes to the LLM, ``LoopConfig`` to the trajectory loop, ``SchedulerConfig`` to
the scheduler. Nothing is copied field by field from one to another.

Environment variables: VLLM_SERVER_URL, VLLM_MODEL_NAME (llm.url, llm.model), ENV_SERVER_URL,
ENV_TOKEN (env.services), AGENTENV_HOME (where the tiny model lives).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

AGENTENV_HOME = Path(os.environ.get("AGENTENV_HOME", Path.home() / ".cache" / "agentenv"))
TINY_MODEL = AGENTENV_HOME / "models" / "tiny-uitars"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMConfig(_Strict):
    url: str | list[str] | None = Field(None, description="vLLM endpoint(s); None: start the tiny model locally")
    model: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    port: int = 8000                 # for the locally started service


class Sampling(_Strict):
    """Sampling settings of a model call. ``regex`` constrains the reply (vLLM structured outputs).

    The defaults are an RL run's: greedy decoding would make every sample of a group the same.
    (OSWorld's evaluation harness uses temperature 0, top_p 0.9.)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1000           # capped at 64 for the tiny model by `agentenv run`
    seed: int | None = None
    logprobs: bool = False
    regex: str | None = None         # `agentenv run`: None = the UI-TARS regex for the tiny model, none otherwise
    stop: list[str] | None = None


class AgentConfig(_Strict):
    """Which agent turns screenshots into prompts and replies into actions (``make_agent``)."""

    name: str = "uitars"
    history_images: int = 5
    language: str = "English"
    min_pixels: int | None = None    # None: the tiny model's bounds when it is served, else UI-TARS-1.5's
    max_pixels: int | None = None
    wait_s: float = 5.0


class LoopConfig(_Strict):
    """Limits of one trajectory (``run_trajectory``)."""

    max_steps: int = 15
    max_invalid_in_row: int = 3
    step_timeout_s: float = 120.0    # one model call


class ServiceConfig(_Strict):
    url: str
    token: str | None = None
    desktops: int | None = None


class EnvConfig(_Strict):
    services: list[ServiceConfig] = Field(default_factory=list)
    local_desktops: int = 4          # when no service is given, start one with this many desktops
    local_port: int = 8100
    width: int = 1920
    height: int = 1080
    # Each desktop in a bubblewrap sandbox (its own user, mount, PID, IPC and network namespaces;
    # agentenv/envs/sandbox.py). false: apps and task commands run on this host as the desktop user.
    sandbox: bool = True
    sandbox_network: bool = False    # sandboxes share the host's network (tasks that need it; reaches loopback too)
    upload_roots: list[str] = Field(default_factory=list)  # folders upload_file steps may read (besides the task source's)


class RayConfig(_Strict):
    """Desktops on a Ray cluster (``agentenv run --ray [ADDRESS]``; ``agentenv.integrations.ray``).
    Each node advertises ``resource`` (``ray start --resources '{"desktop": 8}'``): one unit, one
    desktop. The env services run as Ray actors; the scheduler talks to them over HTTP."""

    address: str | None = None       # None: no Ray; auto: the cluster this machine joined; local: one of our own; HOST:PORT
    namespace: str = "agentenv"
    resource: str = "desktop"
    desktops_per_actor: int | None = Field(None, ge=1)  # None: one env service per node with all its desktops
    actors: int | None = Field(None, ge=1)  # with desktops_per_actor; None: as many as the cluster's resource allows
    host: str | None = None          # what the env services bind; None: their node's address
    max_restarts: int = -1           # Ray restarts a lost env service or vLLM actor this often (-1: always)
    watch_s: float = Field(1.0, gt=0)  # how often lost and returned services are looked for
    return_timeout_s: float = 600.0  # an empty pool, or an LLM with no endpoint up, waits this long for one back
    start_timeout_s: float = 300.0   # every env service up, or `run` stops
    local_cpus: int = 2              # address=local: the cluster of our own (its desktops: env.local_desktops)
    # Start nothing: use the actors another run of this namespace started (rank 0 of tasks.world_size
    # schedulers): this run's share (tasks.rank) of the env services, and its vLLM actors if llm.url is unset.
    attach: bool = False
    # Model servers as Ray actors when llm.url is unset (else llm.url's servers are used as given),
    # restarted by Ray (max_restarts) and taken back in by ServiceLLM like the env services:
    vllm_actors: int = Field(0, ge=0)
    vllm_resources: dict[str, float] = Field(default_factory=lambda: {"GPU": 1.0})  # each actor's
    vllm_args: list[str] = Field(default_factory=list)  # start_vllm_service.sh options: --model PATH, ...


class TaskConfig(_Strict):
    source: str = "builtin"          # builtin | a task JSON file | a folder | .jsonl | .parquet
    ids: list[str] | None = None
    limit: int | None = None
    epochs: int = 1                  # 0: cycle forever
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = False


class DownloadConfig(_Strict):
    """Files OSWorld tasks fetch (``download`` steps, ``cloud_file`` gold files): a cache keyed by URL
    (``agentenv.envs.tasks.cache``). Setup steps run in the env service, which reads this from its
    environment (``AGENTENV_CACHE_DIR`` or ``AGENTENV_HOME``, ``AGENTENV_OFFLINE=1``); `agentenv run`
    sets those for the service it starts."""

    cache_dir: str | None = None     # None: $AGENTENV_HOME/cache/downloads
    offline: bool = False            # fetch nothing: a URL not in the cache is an error naming it
    timeout_s: float = 60.0          # connect/read timeout of one fetch
    max_bytes: int = 2 * 2**30       # one file

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "DownloadConfig":
        env = os.environ if environ is None else environ
        return cls(offline=env.get("AGENTENV_OFFLINE", "").strip().lower() in ("1", "true", "yes"),
                   cache_dir=env.get("AGENTENV_CACHE_DIR") or cls().resolved_dir(env))

    def to_env(self) -> dict[str, str]:
        """What an env service started by `agentenv run` reads (``from_env``)."""
        return {"AGENTENV_OFFLINE": "1" if self.offline else "", "AGENTENV_CACHE_DIR": self.resolved_dir()}

    def resolved_dir(self, environ: dict[str, str] | None = None) -> str:
        env = os.environ if environ is None else environ
        if self.cache_dir:
            return self.cache_dir
        return str(Path(env.get("AGENTENV_HOME") or AGENTENV_HOME) / "cache" / "downloads")


class SchedulerConfig(_Strict):
    """How the scheduler admits and supervises trajectories (``StreamingScheduler``)."""

    rollout_n: int = 2
    trajectory_timeout_s: float = 1800.0
    env_retries: int = 2             # reruns of a trajectory whose desktop died
    max_llm_in_flight: int = 64      # model calls in flight across all trajectories
    max_rps: float | None = None     # model requests per second (asyncio-throttle)
    max_staleness: int | None = None
    stale_policy: Literal["drop", "flag"] = "flag"
    llm_wait_s: float = 2.0          # while the model service is down, probe it this often before admitting more


class OutputConfig(_Strict):
    """Where trajectories go. Each run gets a new ``<root>/<stamp>`` and ``<root>/latest`` points at
    it; ``dir`` names an exact directory instead. Continuing a run is explicit: ``resume``
    (``agentenv run --resume [DIR]``; "latest": ``<root>/latest``)."""

    root: str = "runs"
    dir: str | None = None
    resume: str | None = None
    screenshots: bool = True
    live_port: int | None = None     # serve the live page on 127.0.0.1:PORT (0: any free port); its URL: <dir>/live-url
    max_screenshots: int = Field(100, ge=0)  # per trajectory attempt; later ones are not saved (steps still run)
    max_ready_groups: int | None = Field(None, ge=0)  # complete groups held for get_batch(); None: no bound


class RunConfig(_Strict):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    sampling: Sampling = Field(default_factory=Sampling)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    downloads: DownloadConfig = Field(default_factory=DownloadConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics_port: int | None = None
    progress: bool = True


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                environ: dict[str, str] | None = None) -> RunConfig:
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config {path}: the top level must be a mapping")
    if env.get("VLLM_SERVER_URL") and not data.get("llm", {}).get("url"):
        _set(data, "llm.url", env["VLLM_SERVER_URL"])
    if env.get("VLLM_MODEL_NAME") and not data.get("llm", {}).get("model"):
        _set(data, "llm.model", env["VLLM_MODEL_NAME"])
    if env.get("ENV_SERVER_URL") and not data.get("env", {}).get("services"):
        _set(data, "env.services", [{"url": u, "token": env.get("ENV_TOKEN")}
                                    for u in env["ENV_SERVER_URL"].split(",")])
    for o in overrides or []:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like section.key=value")
        k, v = o.split("=", 1)
        _set(data, k.strip(), _parse_value(v))
    return RunConfig.model_validate(data)


def tiny_model_pixels() -> tuple[int, int] | None:
    meta = TINY_MODEL / "agentenv_tiny.json"
    if not meta.exists():
        return None
    d = json.loads(meta.read_text())
    return d["min_pixels"], d["max_pixels"]
