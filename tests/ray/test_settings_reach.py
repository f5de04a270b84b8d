"""Every env-service setting reaches a service started on Ray as it reaches one started locally.

The settings (``EnvServiceConfig``, every field away from its default) go once through
``EnvService`` (the child process ``agentenv run`` starts) and once through ``RayFleet.start``
(the ``EnvServiceActor`` on a Ray cluster of our own, on loopback, one desktop); each service says
the settings it runs with on its authenticated ``GET /settings`` (the downloads as its setup steps
read them), and both must equal what was given. Its one desktop has the screen size given.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")

from agentenv.config import EnvConfig, RayConfig  # noqa: E402
from agentenv.integrations.ray import RayFleet, init_ray  # noqa: E402
from agentenv.net import free_port  # noqa: E402
from agentenv.services import EnvService  # noqa: E402
from tests.unit.test_settings import non_default_settings  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _reported(url: str, token: str) -> dict:
    assert httpx.get(f"{url}/settings", timeout=30).status_code == 401  # the settings are not public
    r = httpx.get(f"{url}/settings", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _screens(url: str, token: str) -> list[tuple[int, int]]:
    r = httpx.get(f"{url}/envs", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return [(e["width"], e["height"]) for e in r.json()]


def test_every_setting_reaches_a_ray_env_service_and_a_local_one_alike(tmp_path, monkeypatch):
    settings = non_default_settings(tmp_path).model_copy(update={"width": 320, "height": 240})
    want = settings.model_dump(mode="json")

    with EnvService(num=1, port=free_port(), settings=settings, log=tmp_path / "local.log") as local:
        assert _reported(local.url, local.token) == want
        assert _screens(local.url, local.token) == [(320, 240)]

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the actor imports agentenv from this checkout
    init_ray(RayConfig(address="local", local_cpus=1, namespace=f"agentenv-settings-{os.getpid()}"), desktops=1)
    try:
        fleet = RayFleet(RayConfig(start_timeout_s=240), EnvConfig(serve=settings))
        try:
            (svc,) = fleet.start()
            assert _reported(svc.url, svc.token) == want
            assert _screens(svc.url, svc.token) == [(320, 240)]
        finally:
            fleet.shutdown()
    finally:
        ray.shutdown()
