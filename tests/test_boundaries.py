"""The import boundaries and the backend interface, enforced rather than stated.

* A worker process runs :mod:`pipeline.runtime` and nothing that imports torch.
* Nothing in ``envs/`` imports ``pipeline/`` (data flows one way: envs produce observations).
* Every backend implements :class:`pipeline.backends.WorkerBackend`, with its signatures.
"""

import ast
import inspect
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER_STEPS = """
import sys
import numpy as np
from envs.spec import EnvSpec
from pipeline.runtime import protocol as P
from pipeline.runtime.layout import Layout, SharedBuffers
from pipeline.runtime.worker import Worker, WorkerConfig
import pipeline.backends.local, pipeline.backends.inline  # what a Ray node imports too

cfg = WorkerConfig(worker_id=0, env_fn="toy", env_kwargs={}, env_ids=[0, 1],
                   env_stages=[(0,), (0,)], auto_reset=True, parent_pid=0)
w = Worker(cfg)
spec = w.create_envs()
shm = SharedBuffers.create(Layout(spec, 2, 8, 1))
w.bind(shm)
shm.arrays["next_seed"][:] = [3, 4]
shm.arrays["reset_now"][:] = 1
assert w.handle(P.Frame(P.RESET, 0, 1, 1)) == P.Frame(P.DONE, 0, 1, 1)
shm.arrays["n_exec"][:] = 8
assert w.handle(P.Frame(P.STEP, 0, 0, 2)).kind == P.DONE
assert (shm.arrays["results"][0, :]["steps"] == 8).all()
w.close(unmap=False); shm.close()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensordict", "ray"))
print(heavy)
"""


def _fresh(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_a_worker_steps_envs_without_importing_torch():
    assert _fresh(WORKER_STEPS) == "[]"


def test_envs_never_import_pipeline():
    offenders = []
    for path in sorted((ROOT / "envs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "pipeline"]  # fmt: skip
    assert not offenders, offenders
    loaded = _fresh(
        "import sys, envs; envs.make('toy').reset(seed=0); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline'))"
    )
    assert loaded == "[]"


def _backend_classes():
    from pipeline.backends.inline import InlinePool
    from pipeline.backends.local import WorkerPool
    from pipeline.backends.ray.pool import RayPool

    return [WorkerPool, InlinePool, RayPool]


@pytest.mark.parametrize("cls", _backend_classes(), ids=lambda c: c.__name__)
def test_every_backend_implements_the_interface(cls):
    from pipeline.backends import WorkerBackend

    members = [
        name for name, value in vars(WorkerBackend).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    ]  # fmt: skip
    assert {"start", "send_all", "collect", "replace", "close"} <= set(members)
    for name in members:
        want, got = getattr(WorkerBackend, name), getattr(cls, name, None)
        assert got is not None, f"{cls.__name__} has no {name}"
        if isinstance(want, property):
            assert isinstance(got, property), f"{cls.__name__}.{name} is not a property"
            continue
        params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
        assert params(got) == params(want), f"{cls.__name__}.{name}{inspect.signature(got)}"
    for attr in ("spec", "shm"):  # data attributes, set in __init__
        assert attr in inspect.getsource(cls.__init__), f"{cls.__name__} never sets {attr}"


def test_an_unknown_backend_is_named():
    from pipeline.backends import open_backend

    with pytest.raises(ValueError, match="'local', 'inline', 'ray'"):
        open_backend("mpi", "toy", {}, env_ids=[[0]], env_stages=[(0,)], auto_reset=True,
                     env_name="toy")  # fmt: skip
