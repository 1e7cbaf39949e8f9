import contextlib
import gc
import os
import time
import warnings

import pytest
from helpers import BACKENDS, PROCESS_BACKENDS, backend_args

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
    # A process Ray has let go may take a moment to exit (it notices its raylet is gone):
    # each has 10 s to end. An exited process can stay a zombie until its new parent reaps
    # it; that is not a process left running.
    left = [int(p.split()[0]) for p in ray_processes() if int(p.split()[0]) in ours]
    running = []
    for pid in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            running.append(psutil.Process(pid))
    deadline = time.monotonic() + 10.0
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = [p for p in running if _still_running(p)]
    assert not running, [f"{p.pid} {p.name()}" for p in running]
    # Garbage not yet collected is not a leak: a TorchRL ReplayBuffer (test_torchrl.py) holds
    # multiprocessing semaphores (sem.mp-*) in a reference cycle until the next collection.
    gc.collect()
    # Multiprocessing semaphores (sem.mp-*) are not Ray's: with parallel tests another test
    # process may hold one at this moment.
    assert {n for n in os.listdir("/dev/shm") if not n.startswith("sem.mp-")} <= before


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """With parallel tests (``-n 2 --dist loadgroup``, as ``make test`` runs them), every
    test on Ray goes to the same test process, so the session's one loopback cluster is
    started once, not once per process. The longest work goes first (the Ray tests, then
    those marked ``slow``), so that it overlaps everything else rather than running alone
    at the end."""
    for item in items:
        if _on_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))
    items.sort(key=lambda item: 0 if _on_ray(item) else 1 if item.get_closest_marker("slow") else 2)


def _on_ray(item) -> bool:
    """Whether a test uses the Ray cluster: directly, in test_ray.py, or as a backend param."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return (
        "ray_cluster" in item.fixturenames
        or item.module.__name__ == "test_ray"
        or any(isinstance(v, str) and v == "ray" for v in params)
    )


def pytest_configure(config) -> None:
    """Refuse ``--dist loadgroup`` on pytest 9: pytest-xdist (3.8) groups tests by renaming
    them (``name@group``), which pytest 9 ignores (its node ids are computed), so the Ray
    group would silently not take and every test process would start a cluster of its own.
    The test extra pins ``pytest<9`` for this."""
    if config.getoption("dist", "no") == "loadgroup" and pytest.version_tuple[0] >= 9:
        raise pytest.UsageError(
            f"--dist loadgroup does not group tests on pytest {pytest.__version__} "
            "(pytest-xdist renames items, which pytest 9 ignores): install 'pytest<9'"
        )


def _still_running(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(params=BACKENDS)
def backend(request) -> dict:
    """The engine arguments of each backend, for the behaviour tests that must hold on all
    of them: ``RolloutEngine(..., **backend)``."""
    return backend_args(request)


@pytest.fixture(params=PROCESS_BACKENDS)
def process_backend(request) -> dict:
    """The backends whose workers are processes: for what only a process can do (be
    killed, hang under a watchdog, sleep without burning the caller's CPU)."""
    return backend_args(request)
