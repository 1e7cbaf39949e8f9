"""Assertions shared by the test modules."""

import os

import torch
from tensordict import TensorDict


def shm_segments() -> set[str]:
    """The engine's names in /dev/shm (there should never be any: it uses memfd)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("vlare_")}


def assert_identical(a: TensorDict, b: TensorDict) -> None:
    """Same keys, shapes, dtypes and bytes (instructions: same strings)."""
    assert a.batch_size == b.batch_size
    keys = set(a.keys(include_nested=True, leaves_only=True))
    assert keys == set(b.keys(include_nested=True, leaves_only=True))
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), key
        else:
            assert va.tolist() == vb.tolist(), key


BACKENDS = ["local", "inline", "ray"]
PROCESS_BACKENDS = ["local", "ray"]  # inline has no process to kill or watch


def backend_args(request) -> dict:
    """``RolloutEngine`` arguments for the backend a parametrized fixture's ``request``
    names: none for local; inline; Ray: one worker per node of the ``ray_cluster`` fixture."""
    if request.param == "local":
        return {}
    if request.param == "inline":
        return dict(backend="inline")
    request.getfixturevalue("ray_cluster")
    return dict(backend="ray", workers_per_node=1)
