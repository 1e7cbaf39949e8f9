"""The workloads: SAPIEN tabletop tasks and a synthetic ``toy`` env, behind one protocol.

Example:
    >>> import envs
    >>> envs.names()
    ['tabletop/pick-place', 'tabletop/push', 'tabletop/reach', 'toy']
    >>> env = envs.make("tabletop/reach", cameras=())
    >>> obs, info = env.reset(seed=0)
    >>> act = envs.expert("tabletop/reach")(obs["state"])

Envs of other suites, through the Gymnasium adapter (:mod:`envs.gym`):
``envs.make("gym:<id>", ...)`` for any Gymnasium env, ``envs.make("robosuite/<Task>", ...)``
(:mod:`envs.robosuite`), ``envs.make("maniskill/<id>", ...)`` (:mod:`envs.maniskill`), and
:func:`from_gym` for an env or factory of your own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from envs.spec import ChunkResult, Env, EnvSpec, FieldSpec

__all__ = [
    "ChunkResult",
    "Env",
    "EnvSpec",
    "FieldSpec",
    "expert",
    "expert_model",
    "from_gym",
    "make",
    "names",
]

# MuJoCo (Gymnasium's MuJoCo envs, robosuite) picks its GL platform when it is imported, which
# can be inside any env factory: every process that imports envs renders through Mesa's EGL
# unless the user chose (envs/mujoco.py).
os.environ.setdefault("MUJOCO_GL", "egl")

_TABLETOP = ("tabletop/pick-place", "tabletop/push", "tabletop/reach")
_EXPERTS = [*_TABLETOP, "toy"]


def names() -> list[str]:
    """Every registered env name (suites' envs are named by prefix: ``gym:``, ``robosuite/``,
    ``maniskill/``)."""
    return sorted([*_TABLETOP, "toy"])


def make(name: str, **kwargs: Any) -> Env:
    """Create an env by name; ``kwargs`` go to its constructor (cameras, image_size, ...).

    ``"gym:<id>"`` wraps ``gymnasium.make(id)`` (:func:`envs.gym.make_gym`),
    ``"robosuite/<Task>"`` and ``"maniskill/<id>"`` their suites' layers.

    Raises:
        ValueError: an unknown name, or an env the adapter cannot map (named).
    """
    if name.startswith("gym:"):
        from envs.gym import make_gym

        return make_gym(name[4:], **kwargs)
    if name.startswith("robosuite/"):
        from envs.robosuite import make_robosuite

        return make_robosuite(name.split("/", 1)[1], **kwargs)
    if name.startswith("maniskill/"):
        from envs.maniskill import make_maniskill

        return make_maniskill(name.split("/", 1)[1], **kwargs)
    if name == "toy":
        from envs.toy import ToyEnv

        return ToyEnv(**kwargs)
    if name in _TABLETOP:
        from envs.tabletop.env import TabletopEnv

        return TabletopEnv(name.split("/", 1)[1], **kwargs)
    raise ValueError(
        f"unknown env {name!r}; registered: {names()}, or gym:<id>, robosuite/<Task>, "
        "maniskill/<id>"
    )


def expert(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The scripted expert of a task: ``state [S] or [B, S] -> action [7] or [B, 7]``.

    ``toy``'s expert solves ``task="reach"`` (the other toy task ignores actions)."""
    if name == "toy":
        from envs.toy import reach_expert

        return reach_expert
    if name not in _TABLETOP:
        raise ValueError(f"no scripted expert for {name!r}; experts exist for {_EXPERTS}")
    from envs.tabletop.experts import EXPERTS, batched

    return batched(EXPERTS[name.split("/", 1)[1]])


def expert_model(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The expert's idealised one-step model, ``(state [S], action [7]) -> state [S]``, with
    which it plans a chunk open loop."""
    if name == "toy":
        from envs.toy import reach_model

        return reach_model
    if name not in _TABLETOP:
        raise ValueError(f"no expert model for {name!r}; experts exist for {_EXPERTS}")
    from envs.tabletop.experts import predict_state

    return predict_state


def from_gym(env: Any, **mapping: Any) -> Env:
    """Any Gymnasium env (or a factory of one) as an engine env; see :mod:`envs.gym`."""
    from envs.gym import from_gym as wrap

    return wrap(env, **mapping)
