"""The Ray backend on a 2-node loopback cluster (``ray.cluster_utils.Cluster``): the same
output as the local backend, faults recovered, profiles per node, and a clean shutdown."""

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
from factories import failing_env, stuck_env
from helpers import TOY, assert_identical, latency_policy, make_engine, shm_segments

from benchmarks.ray_cluster import LOOPBACK
from pipeline import EnvError, RolloutEngine, WorkerStuckError
from pipeline.backends.ray.placement import placement_problem
from pipeline.backends.ray.pool import RayPool
from pipeline.errors import PlacementError


@pytest.fixture
def cluster(ray_cluster):
    return ray_cluster  # conftest: shutting it down must leave no Ray process or shm file


def _policy():
    return latency_policy(base_ms=1)


def _calls(engine):
    return engine.rollout(7), engine.collect_episodes(2, 3), engine.rollout(3)


class _FaultAt(torch.nn.Module):
    """The policy, with ``fault()`` run at its ``at``-th call (from the inference loop)."""

    def __init__(self, inner, at, fault):
        super().__init__()
        self.inner, self.at, self.fault, self.calls = inner, at, fault, 0
        self.chunk_len = inner.chunk_len

    def forward(self, td):
        self.calls += 1
        if self.calls == self.at:
            self.fault()
        return self.inner(td)


@pytest.mark.parametrize(
    "config",
    [
        dict(mode="pipelined"),
        dict(mode="sync", num_stages=1),
        dict(schedule="dynamic"),
        dict(lookahead=1, exec_len=2),
        dict(num_workers=4, workers_per_node=2),
    ],
    ids=["2-stage", "lock-step", "dynamic", "lookahead", "2-workers-per-node"],
)
def test_ray_backend_gives_bitwise_the_local_output(cluster, config):
    local_cfg = {k: v for k, v in config.items() if k != "workers_per_node"}
    with make_engine(**local_cfg) as e:
        want = _calls(e)
    with make_engine(backend="ray", **config) as e:
        got = _calls(e)
        placement = e.placement()
    for a, b in zip(got, want, strict=True):
        if config.get("schedule") == "dynamic":  # which env runs a queued episode is timing
            a, b = a.exclude("env_id"), b.exclude("env_id")
        assert_identical(a, b)
    # Every Ray process is on loopback, and the two node actors on two different nodes.
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {LOOPBACK}
    assert len(placement) == 2 and len({n["ray_node_id"] for n in placement}) == 2
    assert all(n["address"] == LOOPBACK for n in placement)


def test_killed_node_actor_is_replaced_and_its_episodes_rerun(cluster):
    with make_engine() as e:
        want = e.collect_episodes(3, 4)
    holder = {}

    def kill_node():
        ray.kill(holder["engine"]._pool.nodes[1].actor)

    policy = _FaultAt(_policy(), at=5, fault=kill_node)
    with make_engine(policy, backend="ray") as e:
        holder["engine"] = e
        old = e.placement()[1]["pids"]
        got = e.collect_episodes(3, 4)
        assert e.stats.restarts == 1 and len(e.failures) == 1
        failure = e.failures[0]
        assert "NodeLostError" in failure.error and "node 1" in failure.error
        assert failure.env_ids == [1, 3, 5, 7]
        assert e.placement()[1]["pids"] != old
        after = e.rollout(4)  # the replacement node keeps serving
        assert after["mask"].all()
    assert got["restarts"].sum() >= 1
    for key in ("env_id", "restarts"):
        del got[key], want[key]
    assert_identical(got, want)
    # The killed actor's workers died with it.
    for pid in old:
        assert not _alive(pid)


def test_killed_worker_on_a_node_is_replaced_by_its_node(cluster):
    with make_engine() as e:
        want = e.collect_episodes(3, 4)
    holder = {}

    def kill_worker():
        os.kill(holder["engine"].worker_pids()[1], signal.SIGKILL)

    policy = _FaultAt(_policy(), at=4, fault=kill_worker)
    with make_engine(policy, backend="ray") as e:
        holder["engine"] = e
        got = e.collect_episodes(3, 4)
        assert e.stats.restarts == 1
        assert "SIGKILL" in e.failures[0].error and e.failures[0].worker == 1
    for key in ("env_id", "restarts"):
        del got[key], want[key]
    assert_identical(got, want)


def test_env_error_on_a_node_reaches_the_caller_with_its_traceback(cluster):
    engine = RolloutEngine(
        failing_env, _policy(), num_envs=4, num_workers=2, env_kwargs=TOY,
        on_worker_failure="raise", backend="ray", workers_per_node=1,
    )  # fmt: skip
    pids = engine.worker_pids()
    with pytest.raises(EnvError, match="the gripper fell off") as info:
        engine.rollout(20)
    assert info.value.worker in (0, 1)
    assert "original traceback" in str(info.value)
    assert engine.closed
    for pid in pids:
        assert not _alive(pid)


def test_stuck_worker_on_a_node_is_found_by_its_watchdog(cluster):
    engine = RolloutEngine(
        stuck_env, _policy(), num_envs=4, num_workers=2, env_kwargs=dict(state_dim=8),
        hang_timeout_s=2.0, on_worker_failure="raise", backend="ray", workers_per_node=1,
    )  # fmt: skip
    with pytest.raises(WorkerStuckError, match="is stuck: its progress counter stayed at"):
        engine.rollout(2)
    assert engine.closed


def test_profile_shows_each_nodes_workers(cluster):
    with make_engine(backend="ray", num_workers=4, workers_per_node=2) as e:
        with e.profile() as prof:
            e.rollout(6)
    report = prof.report()
    names = [p.name for p in report.processes]
    assert names[1:] == [f"node {w // 2} worker {w}" for w in range(4)]
    for w in range(4):
        physics = report.phase(f"node {w // 2} worker {w}", "physics")
        assert physics["wall_s"] > 0 and physics["cpu_s"] > 0


def test_workers_on_another_machine_are_not_sampled_by_pid(cluster):
    # A pid from another machine names some other process here: psutil must not read it.
    with make_engine(backend="ray", num_workers=4, workers_per_node=2) as e:
        assert e.local_worker_pids() == e.worker_pids()  # every loopback node is here
        e._pool.driver_address = "10.0.0.1"  # as if the driver ran on another machine
        assert e.local_worker_pids() == [None] * 4
        with e.profile() as prof:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:  # a few of the sampler's 0.5 s periods
                e.rollout(6)
    report = prof.report()
    loop, *workers = report.processes
    assert loop.sampled_cpu_pct > 0  # the driver is sampled (it ran rollouts for 1.5 s)
    for p in workers:
        assert p.sampled_cpu_pct != p.sampled_cpu_pct  # NaN: not sampled
        assert report.phase(p.name, "physics")["cpu_s"] > 0  # its own clocks still count


def test_closing_leaves_no_worker_or_actor(cluster):
    e = make_engine(backend="ray")
    pids = e.worker_pids()
    actors = [n.actor for n in e._pool.nodes]
    e.rollout(2)
    e.close()
    for pid in pids:
        assert not _alive(pid)
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.pids.remote(), timeout=30)
    assert not shm_segments()


def test_bad_backend_arguments_are_named():
    with pytest.raises(ValueError, match="backend='nccl'"):
        RolloutEngine("toy", _policy(), num_envs=4, backend="nccl")
    with pytest.raises(ValueError, match="apply to backend='ray'"):
        RolloutEngine("toy", _policy(), num_envs=4, workers_per_node=2)
    with pytest.raises(ValueError, match="workers_per_node=0"):
        RolloutEngine("toy", _policy(), num_envs=4, backend="ray", workers_per_node=0)


@pytest.mark.parametrize(
    ("num_workers", "per", "problem", "fix"),
    [
        (3, 3, "no alive Ray node has 3 CPUs (the largest has 2)", "set workers_per_node=2"),
        (6, 2, "need 6 CPUs and the alive Ray nodes hold only 2 of them", "at most 4 workers"),
    ],
    ids=["an-actor-larger-than-any-node", "more-actors-than-the-nodes-hold"],
)
def test_node_actors_that_cannot_be_placed_fail_at_once_with_the_numbers(
    cluster, num_workers, per, problem, fix
):
    # Nodes of 2 CPUs; a node actor takes 1 per worker. Ray would leave the actor that does
    # not fit pending, silently, until the 360 s start timeout.
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        make_engine(num_envs=12, num_workers=num_workers, backend="ray", workers_per_node=per)
    assert time.monotonic() - t0 < 60
    message = str(info.value)
    assert f"{num_workers} workers at workers_per_node={per} make" in message
    assert f"of {per} CPUs, 1 CPU per worker" in message
    assert "Alive Ray nodes (total CPUs, from ray.nodes()): 2 with 2 CPUs, 1 with 0" in message
    assert problem in message and fix in message
    assert _cpus_all_free() and not shm_segments()


def test_a_node_actor_that_stops_fitting_is_noticed_while_waiting(cluster, monkeypatch):
    # As if a node left between the pool's check and its actors' creation: 3 node actors of
    # 2 CPUs for 2 nodes of 2, the third never placed. The wait checks again every second.
    checks = []
    check = RayPool._check_placement

    def all_but_the_first(self, alive):
        checks.append(len(alive))
        if len(checks) > 1:
            check(self, alive)

    monkeypatch.setattr(RayPool, "_check_placement", all_but_the_first)
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="hold only 2 of them at once"):
        make_engine(num_envs=12, num_workers=6, backend="ray", workers_per_node=2)
    assert time.monotonic() - t0 < 60 and len(checks) > 1
    assert _cpus_all_free() and not shm_segments()  # the placed actors and the pending one


def test_the_placement_fix_names_a_workers_per_node_that_fits():
    # The case: 2 workers to a node actor, nodes of 1 CPU.
    assert "Fix: set workers_per_node=1," in placement_problem(2, 2, [1.0, 1.0])
    # Nodes of 3 CPUs hold one actor of 3 each but only one of 2: 2 per node is no fix.
    assert placement_problem(6, 3, [3.0, 3.0]) is None
    assert "Fix: set workers_per_node=3," in placement_problem(6, 4, [3.0, 3.0])
    # No CPU anywhere: only more CPUs help.
    assert "Fix: give each Ray node at least 2 CPUs" in placement_problem(2, 2, [0.0])


def _cpus_all_free(timeout: float = 30.0) -> bool:
    """Whether every CPU of the cluster is free within ``timeout`` s (no node actor is left:
    each holds a CPU per worker; Ray reports a killed one's freed a moment later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) == ray.cluster_resources().get("CPU"):
            return True
        time.sleep(0.2)
    return False


def test_local_backend_does_not_import_ray():
    code = (
        "import sys\n"
        "from pipeline import RolloutEngine\n"
        "from pipeline.policies import LatencyPolicy\n"
        "if __name__ == '__main__':\n"
        "    p = LatencyPolicy(state_dim=16, chunk_len=4)\n"
        "    with RolloutEngine('toy', p, num_envs=2, num_workers=1) as e:\n"
        "        e.rollout(2)\n"
        "    assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
