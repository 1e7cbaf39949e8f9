"""A multi-node Ray cluster on this machine, on loopback only (tests and benches).

Ray's own harness (``ray.cluster_utils.Cluster``) starts one raylet per simulated node. Here
every Ray process must bind to 127.0.0.1: these machines let traffic reach loopback alone,
and by default Ray picks the machine's other interface. Two switches do it:

* ``node_ip_address="127.0.0.1"`` on every node (``ray start --node-ip-address`` on a real
  cluster);
* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before Ray is imported: Ray then resolves its own
  address with the loopback fallback instead of the outward interface (without it the GCS
  still advertised the outward address and clients timed out).
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def loopback_cluster(nodes: int, cpus_per_node: int):
    """A head with no CPUs (so node actors never land on it) and ``nodes`` nodes of
    ``cpus_per_node`` CPUs, each with a resource ``node{i}``; ``ray.init`` connected.

    Example:
        >>> with loopback_cluster(nodes=2, cpus_per_node=1) as cluster:
        ...     engine = RolloutEngine("toy", policy, num_envs=8, num_workers=2,
        ...                            backend="ray", workers_per_node=1)
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": LOOPBACK,
            "include_dashboard": False,
        },
    )
    try:
        for i in range(nodes):
            cluster.add_node(
                num_cpus=cpus_per_node, node_ip_address=LOOPBACK, resources={f"node{i}": 1}
            )
        cluster.wait_for_nodes()
        # One machine: the actors import what this process can (test helpers included).
        path = os.pathsep.join(p for p in sys.path if p)
        ray.init(
            address=cluster.address,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_processes() -> list[str]:
    """Ray's daemons still running on this machine (raylet, GCS, plasma, workers)."""
    import psutil

    names = ("raylet", "gcs_server", "plasma_store", "ray::", "default_worker.py")
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            text = " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])])
            if any(n in text for n in names):
                out.append(f"{p.pid} {text[:120]}")
    return out
