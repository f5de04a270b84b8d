"""One config object for a run, loaded from YAML, then environment variables, then CLI overrides.

    cfg = load_config("run.yaml", overrides=["scheduler.rollout_n=4", "loop.max_steps=10"])

Each section is the settings object of one concern, and the code of that concern takes it as
is: ``Sampling`` goes to the LLM, ``LoopConfig`` to the trajectory loop, ``SchedulerConfig`` to
the scheduler. Nothing is copied field by field from one to another.

Environment variables: VLLM_SERVER_URL, VLLM_MODEL_NAME (llm.url, llm.model), ENV_SERVER_URL,
ENV_TOKEN (env.services), AGENTENV_OFFLINE, AGENTENV_CACHE_DIR (env.serve.downloads), AGENTENV_HOME
(where the tiny model lives).

A settings model becomes command-line options with ``add_flags`` and back with ``from_flags``
(``agentenv serve-envs``, ``agentenv tasks check``): one name and one default per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

AGENTENV_HOME = Path(os.environ.get("AGENTENV_HOME", Path.home() / ".cache" / "agentenv"))
TINY_MODEL = AGENTENV_HOME / "models" / "tiny-uitars"
DOWNLOADS_ENV = "AGENTENV_DOWNLOADS"  # an env service's DownloadConfig, JSON (set by serve())


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMConfig(StrictModel):
    url: str | list[str] | None = Field(None, description="vLLM endpoint(s); None: start the tiny model locally")
    model: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    port: int = 8000                 # for the locally started service


class Sampling(StrictModel):
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


class AgentConfig(StrictModel):
    """Which agent turns screenshots into prompts and replies into actions (``make_agent``)."""

    name: str = "uitars"
    history_images: int = 5
    language: str = "English"
    min_pixels: int | None = None    # None: the tiny model's bounds when it is served, else UI-TARS-1.5's
    max_pixels: int | None = None
    wait_s: float = 5.0


class LoopConfig(StrictModel):
    """Limits of one trajectory (``run_trajectory``)."""

    max_steps: int = 15
    max_invalid_in_row: int = 3
    step_timeout_s: float = 120.0    # one model call


class ServiceConfig(StrictModel):
    """An env service to use (``agentenv serve-envs``, or one a Ray actor runs): where, with which
    bearer token, and how many desktops to have there (None: those it has)."""

    url: str
    token: str | None = None
    desktops: int | None = None


class RayConfig(StrictModel):
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


class TaskConfig(StrictModel):
    source: str = "builtin"          # builtin | a task JSON file | a folder | .jsonl | .parquet
    ids: list[str] | None = None
    limit: int | None = None
    epochs: int = 1                  # 0: cycle forever
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = False


class DownloadConfig(StrictModel):
    """Files OSWorld tasks fetch (``download`` steps, ``cloud_file`` gold files): a cache keyed by URL
    (``agentenv.envs.tasks.cache``). Setup steps run in the env service: ``serve()`` puts its settings'
    downloads in its environment (``AGENTENV_DOWNLOADS``, JSON), where ``from_env`` reads them; a
    process without them reads ``AGENTENV_CACHE_DIR`` (or ``AGENTENV_HOME``) and ``AGENTENV_OFFLINE=1``."""

    cache_dir: str | None = Field(None, description="download cache (default $AGENTENV_HOME/cache/downloads)")
    offline: bool = Field(False, description="fetch nothing: a URL not in the download cache is an error "
                                             "naming it (AGENTENV_OFFLINE=1)")
    timeout_s: float = Field(60.0, description="connect/read timeout of one download",
                             json_schema_extra={"flag": "download-timeout-s"})
    max_bytes: int = Field(2 * 2**30, description="largest file downloaded",
                           json_schema_extra={"flag": "download-max-bytes"})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "DownloadConfig":
        env = os.environ if environ is None else environ
        if env.get(DOWNLOADS_ENV):
            return cls.model_validate_json(env[DOWNLOADS_ENV])
        return cls(offline=env.get("AGENTENV_OFFLINE", "").strip().lower() in ("1", "true", "yes"),
                   cache_dir=env.get("AGENTENV_CACHE_DIR") or cls().resolved_dir(env))

    def to_env(self) -> dict[str, str]:
        """All of it, for ``from_env`` in this process and its children (the cache folder resolved here)."""
        return {DOWNLOADS_ENV: self.model_copy(update={"cache_dir": self.resolved_dir()}).model_dump_json()}

    def resolved_dir(self, environ: dict[str, str] | None = None) -> str:
        env = os.environ if environ is None else environ
        if self.cache_dir:
            return self.cache_dir
        return str(Path(env.get("AGENTENV_HOME") or AGENTENV_HOME) / "cache" / "downloads")


class ServiceLimits(StrictModel):
    """What one request may ask of the service; larger is refused with a 413/422 that says which
    limit (``agentenv serve-envs --help`` sets each). One request must not exhaust the memory or
    the disk of a service that hosts many desktops."""

    max_body_bytes: int = Field(64 * 2**20, description="a request body (uploads included)")
    max_image_pixels: int = Field(4096 * 4096, description="a screenshot resized for the model "
                                                           "(UI-TARS-1.5 needs <= 12.8 M)")
    max_screen_side: int = Field(7680, description="a desktop's width or height (8K)")
    max_output_bytes: int = Field(2**20, description="stdout/stderr kept from an /execute command (the rest is cut)")
    max_file_bytes: int = Field(64 * 2**20, description="a file served by /file")
    execute_timeout_s: float = Field(120.0, description="an /execute command's longest run")


class EnvServiceConfig(StrictModel):
    """Everything an env service is started with but where it listens: the one object that
    ``agentenv run`` (``env.serve``), the child process of ``EnvService``, the ``serve-envs`` flags
    (``add_flags``), the Ray actor, ``serve()`` and ``agentenv tasks check`` take whole."""

    width: int = Field(1920, description="screen width of each desktop")
    height: int = Field(1080, description="screen height of each desktop")
    # Each desktop in a bubblewrap sandbox (its own user, mount, PID, IPC and network namespaces;
    # agentenv/envs/sandbox.py). false: apps and task commands run on this host as the desktop user.
    sandbox: bool = Field(True, description="run each desktop in a bubblewrap sandbox; --no-sandbox runs its "
                                            "apps and commands on this host as the desktop user")
    sandbox_network: bool = Field(False, description="sandboxed desktops share this host's network (tasks that "
                                                     "need it; reaches loopback too)")
    upload_roots: list[str] = Field(default_factory=list, json_schema_extra={"flag": "upload-root"},
                                    description="a folder whose files upload_file steps may read (repeatable; "
                                                "the built-in tasks' folder always may)")
    downloads: DownloadConfig = Field(default_factory=DownloadConfig)
    limits: ServiceLimits = Field(default_factory=ServiceLimits)


class EnvConfig(StrictModel):
    services: list[ServiceConfig] = Field(default_factory=list)
    local_desktops: int = 4          # when no service is given, start one with this many desktops
    local_port: int = 8100
    serve: EnvServiceConfig = Field(default_factory=EnvServiceConfig)  # every env service this run starts


class SchedulerConfig(StrictModel):
    """How the scheduler admits and supervises trajectories (``StreamingScheduler``)."""

    rollout_n: int = 2               # samples per task; owned by the buffer (TrajectoryBuffer.from_config)
    trajectory_timeout_s: float = 1800.0
    env_retries: int = 2             # reruns of a trajectory whose desktop died
    max_llm_in_flight: int = 64      # model calls in flight across all trajectories
    max_rps: float | None = None     # model requests per second (asyncio-throttle)
    max_staleness: int | None = None
    stale_policy: Literal["drop", "flag"] = "flag"
    llm_wait_s: float = 2.0          # while the model service is down, probe it this often before admitting more


class OutputConfig(StrictModel):
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


class RunConfig(StrictModel):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    sampling: Sampling = Field(default_factory=Sampling)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
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


# Settings that moved into env.serve: an old config gets an error that names the new key.
_MOVED = {("env", k): f"env.serve.{k}" for k in ("width", "height", "sandbox", "sandbox_network", "upload_roots")}
_MOVED[("downloads",)] = "env.serve.downloads"


def _check_moved(data: dict[str, Any]) -> None:
    for keys, new in _MOVED.items():
        d: Any = data
        for k in keys[:-1]:
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict) and keys[-1] in d:
            raise ValueError(f"{'.'.join(keys)} is {new} now")


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
    downloads = data.get("env", {}).get("serve", {}).get("downloads", {})
    if _parse_value(env.get("AGENTENV_OFFLINE") or "") in (1, True) and "offline" not in downloads:
        _set(data, "env.serve.downloads.offline", True)
    if env.get("AGENTENV_CACHE_DIR") and not downloads.get("cache_dir"):
        _set(data, "env.serve.downloads.cache_dir", env["AGENTENV_CACHE_DIR"])
    for o in overrides or []:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like section.key=value")
        k, v = o.split("=", 1)
        _set(data, k.strip(), _parse_value(v))
    _check_moved(data)
    return RunConfig.model_validate(data)


# ----------------------------------------------------------------------------- settings as CLI options

def _leaves(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """(path, field) of every field that is not itself a model; nested models are walked."""
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _leaves(f.annotation, (*path, name))
        else:
            yield (*path, name), f


def _flag(path: tuple[str, ...], f: FieldInfo) -> str:
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    return "--" + str(extra.get("flag") or path[-1].replace("_", "-"))


def add_flags(ap: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One option per setting of ``model`` (nested models flattened: ``limits.max_body_bytes`` is
    ``--max-body-bytes``), its help the field's description. An option not given is absent from the
    namespace, so the model's own default applies (``from_flags``)."""
    seen: set[str] = set()
    for path, f in _leaves(model):
        flag = _flag(path, f)
        if flag in seen:
            raise ValueError(f"two settings of {model.__name__} would be {flag}")
        seen.add(flag)
        default = f.get_default(call_default_factory=True)
        kw: dict[str, Any] = {"dest": ".".join(path), "default": argparse.SUPPRESS,
                              "help": (f.description or ".".join(path))
                              + ("" if default is None else f" (default {default})")}
        ann = f.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is list:
            kw.update(action="append", type=args[0] if args else str, metavar=path[-1].upper())
        else:
            kw["metavar"] = path[-1].upper()
            kw["type"] = args[0] if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union else ann
        ap.add_argument(flag, **kw)


def from_flags(ns: argparse.Namespace, model: type[BaseModel], base: BaseModel | None = None) -> Any:
    """``base`` (or the defaults) with the options of ``add_flags`` that were given."""
    data = base.model_dump() if base is not None else {}
    given = vars(ns)
    for path, _ in _leaves(model):
        if ".".join(path) in given:
            _set(data, ".".join(path), given[".".join(path)])
    return model.model_validate(data)


def tiny_model_pixels() -> tuple[int, int] | None:
    meta = TINY_MODEL / "agentenv_tiny.json"
    if not meta.exists():
        return None
    d = json.loads(meta.read_text())
    return d["min_pixels"], d["max_pixels"]
