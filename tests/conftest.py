import os
import warnings

import pytest
from helpers import BACKENDS, backend_args

# Before any test module imports Ray: this sets what makes Ray bind loopback only.
from benchmarks.ray_cluster import loopback_cluster, ray_processes

# One BLAS/OpenMP thread per process: the suite must pass on a loaded 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message="Failed to find system libvulkan")


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes of 2 CPUs on loopback (``ray.cluster_utils.Cluster``), started once for
    the session (each start cost 6-10 s); shutting it down must leave no Ray process and no
    shared-memory file. Ray is a test dependency (``make`` installs ``.[test,ray]``): a
    missing Ray fails here rather than skipping the Ray half of the suite."""
    import psutil

    before = set(os.listdir("/dev/shm"))
    with loopback_cluster(nodes=2, cpus_per_node=2) as cluster:
        yield cluster
        # This cluster's processes are this process's descendants (another Ray on the
        # machine is not this test's business).
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
    left = [p for p in ray_processes() if int(p.split()[0]) in ours]
    assert not left, left
    assert set(os.listdir("/dev/shm")) <= before


@pytest.fixture(params=BACKENDS)
def backend(request) -> dict:
    """The engine arguments of each backend, for the behaviour tests that must hold on both:
    ``RolloutEngine(..., **backend)``."""
    return backend_args(request)
