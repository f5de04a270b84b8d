"""One definition per setting: the env service's settings as CLI options and in the run config,
the parquet schema derived from agentenv.types (identical to the hand-written one of older runs),
verl's sampling built from our model, the buffer and task source from the config."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from agentenv.config import (DownloadConfig, EnvServiceConfig, RunConfig, Sampling, ServiceLimits, TaskConfig,
                             add_flags, from_flags, load_config)
from agentenv.rollout.buffer import TrajectoryBuffer, read_trajectories
from agentenv.types import Status, Step, Trajectory

# The schema runs were written with before it was derived from agentenv.types (verbatim).
OLD_STEP_TYPE = pa.struct([
    ("index", pa.int32()), ("text", pa.string()), ("thought", pa.string()), ("action", pa.string()),
    ("valid", pa.bool_()), ("error", pa.string()), ("prompt_shared", pa.int32()),
    ("prompt_delta", pa.list_(pa.int32())), ("token_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())), ("finish_reason", pa.string()), ("screenshot", pa.string()),
    ("image_steps", pa.list_(pa.int32())), ("llm_latency_s", pa.float64()), ("env_latency_s", pa.float64()),
    ("policy_version", pa.int64()), ("env_info", pa.string()),
])
OLD_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("sample", pa.int32()), ("status", pa.string()), ("reason", pa.string()),
    ("reward", pa.float64()), ("attempts", pa.int32()), ("env_id", pa.string()),
    ("started_at", pa.float64()), ("ended_at", pa.float64()), ("num_steps", pa.int32()),
    ("final_screenshot", pa.string()), ("steps", pa.list_(OLD_STEP_TYPE)),
])


def _full_trajectory() -> Trajectory:
    """Every field of Trajectory and Step away from its default."""
    steps = [Step(index=i, text=f"reply {i}", thought="think", action={"kind": "click", "x": 1.5}, valid=i == 0,
                  error="bad" if i else "", prompt_shared=3 * i, prompt_delta=[1, 2], token_ids=[5, 6, 7],
                  logprobs=[-0.5, -1.0, -0.25], finish_reason="stop", screenshot=f"s{i}.png", image_steps=[0, i],
                  llm_latency_s=0.5, env_latency_s=0.25, policy_version=2**40 + i, env_info={"w": [1, 2]})
             for i in range(2)]
    return Trajectory(task_id="t1", sample=3, status=Status.FINISHED, reason="done", reward=0.5, steps=steps,
                      attempts=2, env_id="d1-abc", started_at=1.0, ended_at=2.0, final_screenshot="final.png")


def test_written_parquet_has_the_schema_of_older_runs_and_reads_back_whole(tmp_path):
    buf = TrajectoryBuffer(tmp_path, rollout_n=1)
    t = _full_trajectory()
    buf.add(t)
    (part,) = (tmp_path / "parts").glob("*.parquet")
    assert pq.read_schema(part).remove_metadata().equals(OLD_SCHEMA)
    assert read_trajectories(tmp_path) == [t]
    target = buf.compact()
    assert pq.read_schema(target).remove_metadata().equals(OLD_SCHEMA)
    assert read_trajectories(tmp_path) == [t]


def test_a_file_written_with_the_old_schema_still_loads(tmp_path):
    """Rows as the old hand-written code made them (nulls where it allowed them) load as before."""
    row = {"task_id": "old", "sample": 0, "status": "max_steps", "reason": None, "reward": 0.0, "attempts": 1,
           "env_id": "", "started_at": 1.0, "ended_at": 2.0, "num_steps": 1, "final_screenshot": None,
           "steps": [{"index": 0, "text": "x", "thought": "", "action": None, "valid": False, "error": "",
                      "prompt_shared": 0, "prompt_delta": [], "token_ids": [1], "logprobs": None,
                      "finish_reason": "", "screenshot": "", "image_steps": None, "llm_latency_s": 0.1,
                      "env_latency_s": 0.2, "policy_version": 0, "env_info": "{}"}]}
    pq.write_table(pa.Table.from_pylist([row], schema=OLD_SCHEMA), tmp_path / "trajectories.parquet")
    (t,) = read_trajectories(tmp_path)
    assert (t.status, t.reason, t.final_screenshot) == (Status.MAX_STEPS, "", "")
    s = t.steps[0]
    assert (s.action, s.logprobs, s.image_steps, s.env_info, s.token_ids) == (None, None, [], {}, [1])


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _leaf_paths(f.annotation, (*prefix, name))
        else:
            yield (*prefix, name)


def non_default_settings(tmp_path) -> EnvServiceConfig:
    """An EnvServiceConfig with every field away from its default (each setting then shows whether
    it arrived)."""
    s = EnvServiceConfig(
        width=800, height=600, sandbox=False, sandbox_network=True, upload_roots=[str(tmp_path / "a"), "/srv/b"],
        downloads=DownloadConfig(cache_dir=str(tmp_path / "cache"), offline=True, timeout_s=7.5, max_bytes=12345),
        limits=ServiceLimits(max_body_bytes=1111, max_image_pixels=2222, max_screen_side=3333, max_output_bytes=4444,
                             max_file_bytes=5555, execute_timeout_s=66.5))
    default = EnvServiceConfig().model_dump()
    got = s.model_dump()
    for path in _leaf_paths(EnvServiceConfig):
        a, b = default, got
        for k in path:
            a, b = a[k], b[k]
        assert a != b, f"{'.'.join(path)} is at its default: the test would not see it dropped"
    return s


def test_every_setting_is_an_option_and_an_option_not_given_keeps_the_default(tmp_path):
    want = non_default_settings(tmp_path)
    ap = argparse.ArgumentParser()
    add_flags(ap, EnvServiceConfig)
    argv = ["--width", "800", "--height", "600", "--no-sandbox", "--sandbox-network",
            "--upload-root", str(tmp_path / "a"), "--upload-root", "/srv/b",
            "--cache-dir", str(tmp_path / "cache"), "--offline", "--download-timeout-s", "7.5",
            "--download-max-bytes", "12345", "--max-body-bytes", "1111", "--max-image-pixels", "2222",
            "--max-screen-side", "3333", "--max-output-bytes", "4444", "--max-file-bytes", "5555",
            "--execute-timeout-s", "66.5"]
    assert from_flags(ap.parse_args(argv), EnvServiceConfig) == want
    assert from_flags(ap.parse_args([]), EnvServiceConfig) == EnvServiceConfig()
    base = EnvServiceConfig(width=1000, limits=ServiceLimits(max_file_bytes=9))
    got = from_flags(ap.parse_args(["--height", "700"]), EnvServiceConfig, base)
    assert (got.width, got.height, got.limits.max_file_bytes) == (1000, 700, 9)


def test_the_run_config_sets_every_env_service_setting_and_names_moved_keys(tmp_path):
    cfg = load_config(overrides=["env.serve.limits.max_body_bytes=1234", "env.serve.sandbox=false",
                                 "env.serve.downloads.offline=true"], environ={})
    assert (cfg.env.serve.limits.max_body_bytes, cfg.env.serve.sandbox, cfg.env.serve.downloads.offline) \
        == (1234, False, True)
    for old, new in (("env.sandbox=false", "env.serve.sandbox"), ("downloads.offline=true", "env.serve.downloads")):
        with pytest.raises(ValueError, match=new.replace(".", r"\.")):
            load_config(overrides=[old], environ={})
    env = load_config(environ={"AGENTENV_OFFLINE": "1", "AGENTENV_CACHE_DIR": str(tmp_path)})
    assert env.env.serve.downloads.offline and env.env.serve.downloads.cache_dir == str(tmp_path)


def test_downloads_go_whole_through_the_environment(tmp_path):
    d = DownloadConfig(cache_dir=str(tmp_path), offline=True, timeout_s=3.0, max_bytes=99)
    assert DownloadConfig.from_env(d.to_env()) == d
    home = DownloadConfig().to_env() | {"AGENTENV_HOME": str(tmp_path)}
    assert DownloadConfig.from_env(home).cache_dir  # resolved where it was made


def test_buffer_and_source_from_the_config():
    cfg = RunConfig.model_validate({"scheduler": {"rollout_n": 5, "max_staleness": 2, "stale_policy": "drop"},
                                    "output": {"screenshots": False, "max_ready_groups": 3}})
    b = TrajectoryBuffer.from_config(cfg)
    assert (b.dir, b.rollout_n, b.max_staleness, b.stale_policy, b.max_ready) == (None, 5, 2, "drop", 3)
    from agentenv.rollout.sources import TaskSource

    src = TaskSource.from_config(TaskConfig(limit=2, epochs=3))
    assert len(src.items) == 2 and len(src) == 6


def test_verl_sampling_keeps_every_field_of_ours():
    pytest.importorskip("verl")
    from agentenv.integrations.verl import verl_sampling

    ours = Sampling(temperature=0.3, top_p=0.7, max_tokens=900, seed=11, logprobs=False, regex="x+", stop=["\n"])
    assert set(Sampling.model_fields) == {f for f in ours.model_fields_set}, "set every field above"
    got = verl_sampling(ours, {"temperature": 0.9, "logprobs": True, "top_p": None}, response_length=100)
    assert got == ours.model_copy(update={"temperature": 0.9, "logprobs": True, "max_tokens": 100})


def test_desktop_spec_defaults_are_the_settings_defaults():
    from agentenv.envs.desktop_types import DesktopSpec

    s, d = EnvServiceConfig(), DesktopSpec()
    assert (d.width, d.height, d.sandbox, d.network, d.upload_roots) == \
        (s.width, s.height, s.sandbox, s.sandbox_network, ())
    got = DesktopSpec.from_settings(EnvServiceConfig(width=5, upload_roots=["/x"]))
    assert got == dataclasses.replace(d, width=5, upload_roots=(Path("/x"),))
