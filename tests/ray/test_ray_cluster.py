"""Desktops on a real local Ray cluster: a head node without desktops and 3 nodes that advertise
{"desktop": 2}, all on loopback, each with its own raylet and workers (ray.cluster_utils.Cluster).

The streaming test's checks with the desktops on 3 nodes; placement by the resource; two schedulers
each with its share of the services and of the tasks; a node killed
mid-run (its raylet, workers, env service and X servers gone): its trajectories rerun elsewhere,
every trajectory ends exactly once, the actor is restarted by Ray on a node that joins, and the
pool takes its desktops back; after shutdown no process we started is left (by PID).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from agentenv.config import EnvConfig, EnvServiceConfig, RayConfig  # noqa: E402
from agentenv.envs.pool import EnvPool  # noqa: E402
from agentenv.integrations.ray import RayFleet, discover, stay_on_loopback  # noqa: E402
from agentenv.procs import descendants  # noqa: E402
from agentenv.rollout.buffer import read_trajectories  # noqa: E402
from agentenv.types import Status  # noqa: E402
from agentenv.envs.tasks import builtin_tasks  # noqa: E402
from tests.ray.pids import all_loopback, ident as _ident, listening_addresses, wait_gone as _wait_gone  # noqa: E402
from tests.osworld.test_streaming_task_sampling import (CLICK_ONLY, ROLLOUT_N, check_complete, check_streamed,  # noqa: E402
                                                     make_scheduler)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
NODE = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 * MB}
DESKTOPS_PER_NODE = 2
# The lightest apps (a terminal, a calculator), on small screens: this machine's 2 cores also run
# the model server and 4 raylets here, and the scheduler is under test, not the apps.
TASK_IDS = ["terminal-mkdir", "calc-add", "terminal-sort", "calc-multiply", "terminal-copy", "calc-subtract"]
SCREEN = EnvConfig(serve=EnvServiceConfig(width=1280, height=720))


def _ended_well(t) -> bool:
    """A policy outcome; or, on this machine's 2 shared cores, an app that did not open its window
    within the setup's 45 s (load from the other sessions, recorded as the task's failure). Never a
    desktop or model-service failure."""
    return t.status in (Status.MAX_STEPS, Status.FINISHED, Status.CALL_USER) or (
        t.status == Status.TASK_ERROR and "no window appeared" in t.reason)


def tasks() -> list:
    by_id = {t.id: t for t in builtin_tasks()}
    return [by_id[i] for i in TASK_IDS]


class LocalCluster:
    """Our own Ray cluster on loopback; every process it starts is remembered by PID."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        os.environ["PYTHONPATH"] = str(ROOT)  # the actors import agentenv from this checkout
        stay_on_loopback()
        # What runs under pytest already (the session's vLLM server, env service and their children,
        # now and later) is not the cluster's.
        self.before = set(descendants(os.getpid()))
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **NODE, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
        self.desktop_nodes = [self.add_desktop_node() for _ in range(3)]
        ray.init(address=self.cluster.address, namespace=f"agentenv-test-{uuid.uuid4().hex[:6]}",
                 log_to_driver=False, _node_ip_address="127.0.0.1")
        self.ours: set[tuple[int, str]] = set()
        self.snapshot()

    def add_desktop_node(self):
        return self.cluster.add_node(**NODE, resources={"desktop": DESKTOPS_PER_NODE})

    def snapshot(self) -> set[int]:
        others = {d for p in self.before for d in (p, *descendants(p))}
        pids = {p for p in descendants(os.getpid()) if p not in others}
        self.ours |= {i for p in pids if (i := _ident(p))}
        return pids

    def node(self, node_id: str):
        return next(n for n in self.cluster.worker_nodes if n.node_id == node_id)

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def local_cluster(vllm_server):
    c = LocalCluster()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
async def fleet_pool(local_cluster):
    fleet = RayFleet(RayConfig(watch_s=0.5), SCREEN)
    specs = await asyncio.to_thread(fleet.start)
    pool = await EnvPool(specs, replace_timeout_s=30).start()
    local_cluster.snapshot()
    yield fleet, pool
    await pool.aclose()
    fleet.shutdown()


def _node_of(fleet: RayFleet, env_name: str) -> str:
    return next(m.node_id for m in fleet.members if m.url and env_name.startswith(m.url + "/"))


async def test_desktops_on_three_nodes_stream_like_on_one(local_cluster, fleet_pool, vllm_server, tmp_path,
                                                          tiny_pixels):
    fleet, pool = fleet_pool
    head = local_cluster.cluster.head_node.node_id
    desktop_nodes = {n.node_id for n in local_cluster.desktop_nodes}
    # placement: one service per node that advertises the resource, none on the head (it has none)
    assert sorted(m.node_id for m in fleet.members) == sorted(desktop_nodes) and head not in desktop_nodes
    assert pool.size == 3 * DESKTOPS_PER_NODE and all(m.desktops == DESKTOPS_PER_NODE for m in fleet.members)
    # discovery from any process of the cluster, by actor name: the same services
    assert sorted(s.url for s in await asyncio.to_thread(discover)) == sorted(pool.services())
    # everything we started listens on loopback only
    pids = local_cluster.snapshot()
    addrs = listening_addresses(pids)
    assert all_loopback(addrs), addrs

    async with fleet.watching(pool):
        sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks(), tiny_pixels)
        summary = await sched.run()
    admits = check_streamed(sched, summary, pool, TASK_IDS)
    assert {_node_of(fleet, a.env) for a in admits} == desktop_nodes  # all three nodes did work
    trajs = check_complete(tmp_path, TASK_IDS)
    assert all(_ended_well(t) for t in trajs), [(t.key, t.status, t.reason) for t in trajs]
    ran = [t for t in trajs if t.status != Status.TASK_ERROR]
    assert len(ran) >= len(trajs) - 2
    for t in ran:
        assert t.steps and all(s.token_ids for s in t.steps) and t.final_screenshot
    assert fleet.lost["env"] == 0 and pool.stats()["replaced"] == 0

    # the env services' tokens are in no file of Ray's session (its logs) nor our services' logs
    tokens = [m.info["token"] for m in fleet.members]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for f in [*session.rglob("*"), *Path("/tmp").glob("agentenv-envs-*/*")]:
        if f.is_file() and f.stat().st_size < 50 * MB:
            data = f.read_bytes()
            assert not any(t.encode() in data for t in tokens), f"a token leaked into {f}"


async def test_one_scheduler_per_node_each_with_its_share(local_cluster, fleet_pool, vllm_server, tmp_path,
                                                       tiny_pixels):
    """Two schedulers, as on two nodes, over the actors the fleet started: rank 0 in this process
    (RayFleet.attach), rank 1 an `agentenv run --ray ADDRESS --set ray.attach=true` process; each
    takes its share of the env services and of the tasks (rank / world_size) and writes its own buffer."""
    fleet, _ = fleet_pool  # started the services; its own pool stays idle here
    # both shard the same list: the task source's order (here the built-in tasks'), then every 2nd
    items = [t for t in builtin_tasks() if t.id in TASK_IDS[:4]]
    ids = [t.id for t in items]
    every = [m.url for m in fleet.members]
    # a one-off look from any process: disjoint shares that together are every service
    shares = [[s.url for s in await asyncio.to_thread(discover, rank=r, world_size=2)] for r in range(2)]
    assert shares == [every[0::2], every[1::2]]
    outs = [tmp_path / f"rank{rank}" for rank in range(2)]

    own = RayFleet(RayConfig(watch_s=0.5, start_timeout_s=60))
    specs = await asyncio.to_thread(own.attach, 0, 2, vllm=False)
    assert [s.url for s in specs] == shares[0]
    pool = await EnvPool(specs, replace_timeout_s=30).start()
    sched = make_scheduler(vllm_server.url, pool, outs[0], items, tiny_pixels, max_steps=2, rank=0, world_size=2)
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentenv", "run", "--ray", local_cluster.cluster.address,
        "--set", f"ray.namespace={ray.get_runtime_context().namespace}", "--set", "ray.attach=true",
        "--set", "tasks.rank=1", "--set", "tasks.world_size=2", "--set", f"tasks.ids=[{', '.join(ids)}]",
        "--set", f"llm.url={vllm_server.url}", "--set", f"llm.model={vllm_server.model}",
        "--set", "loop.max_steps=2", "--set", f"output.dir={outs[1]}", "--set", "progress=false",
        "--set", "env.serve.width=1280", "--set", "env.serve.height=720",
        cwd=ROOT, env={k: v for k, v in os.environ.items() if k not in ("VLLM_SERVER_URL", "ENV_SERVER_URL")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        async with own.watching(pool):
            summary, (out, err) = await asyncio.gather(sched.run(), cli.communicate())
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
        await pool.aclose()
    assert cli.returncode == 0, err.decode()[-3000:]
    cli_summary = json.loads(out.decode().strip().splitlines()[-1])
    for rank, sm in enumerate([summary, cli_summary]):
        assert sm["trajectories"] == len(ids[rank::2]) * ROLLOUT_N and "error" not in sm, sm
    assert cli_summary["ray"]["env_services"] == len(shares[1]) and cli_summary["ray"]["vllm_actors"] == 0
    # the tasks: disjoint shares that together are the task set, each in its own buffer, nothing twice
    written = [check_complete(outs[r], ids[r::2]) for r in range(2)]
    keys = [{t.key for t in w} for w in written]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {(i, s) for i in ids for s in range(ROLLOUT_N)}
    assert all(_ended_well(t) for w in written for t in w), [(t.key, t.status, t.reason) for w in written for t in w]
    # each ran on its share of the desktops only
    for rank, w in enumerate(written):
        assert all(any(t.env_id.startswith(u + "/") for u in shares[rank]) for t in w), [t.env_id for t in w]
    # attached schedulers leave the actors running (the fleet that started them stops them)
    own.shutdown()
    assert sorted(s.url for s in await asyncio.to_thread(discover)) == sorted(every)
    assert fleet.lost["env"] == 0 and own.lost["env"] == 0 and cli_summary["ray"]["lost"] == 0


async def test_node_killed_mid_run_loses_nothing_and_its_desktops_come_back(local_cluster, fleet_pool, vllm_server,
                                                                            tmp_path, tiny_pixels):
    fleet, pool = fleet_pool
    ids = TASK_IDS[:5]
    sched = make_scheduler(vllm_server.url, pool, tmp_path, tasks()[:5], tiny_pixels, max_steps=6, regex=CLICK_ONLY)
    killed: dict = {}

    async def kill_a_busy_node() -> None:
        while sched.stats.steps < 4:
            await asyncio.sleep(0.05)
        done = {(e.key, e.sample) for e in sched.stats.events if e.kind in ("release", "done")}
        victim = next(e for e in reversed([e for e in sched.stats.events if e.kind == "admit"])
                      if (e.key, e.sample) not in done)
        node_id = _node_of(fleet, victim.env)
        member = next(m for m in fleet.members if m.node_id == node_id)
        busy = {(e.key, e.sample) for e in sched.stats.events if e.kind == "admit" and
                (e.key, e.sample) not in done and _node_of(fleet, e.env) == node_id}
        killed.update(node=node_id, url=member.url, trajs=busy, pids={i for p in member.info["pids"] + [member.info["actor_pid"]]
                                                      if (i := _ident(p))})
        await asyncio.to_thread(local_cluster.cluster.remove_node, local_cluster.node(node_id), False)
        while fleet.lost["env"] < 1:
            await asyncio.sleep(0.1)
        killed["size_after_loss"] = pool.size
        local_cluster.desktop_nodes.append(local_cluster.add_desktop_node())  # a node joins: Ray restarts there

    async with fleet.watching(pool):
        await asyncio.gather(sched.run(), kill_a_busy_node())
        deadline = time.monotonic() + 90
        while pool.size < 3 * DESKTOPS_PER_NODE and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    local_cluster.snapshot()

    # the lost node's desktops left the pool; its actor came back on the new node with its desktops
    assert killed["size_after_loss"] == 2 * DESKTOPS_PER_NODE
    assert fleet.lost["env"] == 1 and fleet.returned["env"] == 1 and pool.size == 3 * DESKTOPS_PER_NODE
    assert killed["node"] not in {m.node_id for m in fleet.members}
    assert local_cluster.desktop_nodes[-1].node_id in {m.node_id for m in fleet.members}
    assert not _wait_gone(killed["pids"]), "the killed node's actor, env service or X servers are still running"
    # every trajectory ended exactly once; those on the lost node reran elsewhere and finished
    trajs = {t.key: t for t in check_complete(tmp_path, ids)}
    assert all(_ended_well(t) for t in trajs.values()), [(t.key, t.status, t.reason) for t in trajs.values()]
    assert killed["trajs"]
    for key in killed["trajs"]:
        t = trajs[key]
        assert t.attempts >= 2 and "rerun after" in t.reason, (key, t.attempts, t.reason)
        assert not t.env_id.startswith(killed["url"] + "/")  # its last attempt ran on another node
    assert len(read_trajectories(tmp_path)) == len(ids) * ROLLOUT_N

    # shutdown: every process the cluster, the actors and the env services started is gone
    await pool.aclose()
    fleet.shutdown()
    local_cluster.shutdown()
    left = await asyncio.to_thread(_wait_gone, local_cluster.ours, 60.0)
    assert not left, f"processes left after shutdown: {left}"
