"""The one place that states what an env produces and consumes.

Everything downstream (the engine's shared-memory layout, the policies' input layers, the
benches) is derived from an :class:`EnvSpec`, never from hard-coded shapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class FieldSpec:
    """Shape and dtype of one observation field, e.g. ``state`` or ``image/head``."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class EnvSpec:
    """Observation fields, action space and timing of an env.

    Example:
        >>> spec = envs.make("toy", state_dim=4, cameras=()).spec
        >>> spec.obs["state"].shape, spec.action_dim
        ((4,), 7)
    """

    name: str
    obs: dict[str, FieldSpec]
    action_dim: int
    action_low: float = -1.0
    action_high: float = 1.0
    max_steps: int = 100
    control_hz: float = 25.0

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(k.split("/", 1)[1] for k in self.obs if k.startswith("image/"))

    @property
    def state_dim(self) -> int:
        return self.obs["state"].shape[0]

    def check_obs(self, obs: dict[str, np.ndarray]) -> None:
        """Raise ``ValueError`` naming the first field that does not match the spec."""
        if set(obs) != set(self.obs):
            raise ValueError(
                f"{self.name}: observation keys {sorted(obs)} != spec {sorted(self.obs)}"
            )
        for key, fs in self.obs.items():
            value = obs[key]
            if value.shape != fs.shape or value.dtype != fs.dtype:
                raise ValueError(
                    f"{self.name}: observation {key!r} is {value.dtype}{list(value.shape)}, "
                    f"spec says {fs.dtype}{list(fs.shape)}"
                )

    def check_action(self, action: np.ndarray, chunk: bool = False) -> np.ndarray:
        """Validate an action (or ``[k, A]`` chunk) and return it as float32.

        Out-of-range values are clipped (the usual convention); wrong shapes and non-finite
        values raise, because they would otherwise reach the physics.
        """
        a = np.asarray(action, dtype=np.float32)
        want = f"[k, {self.action_dim}]" if chunk else f"[{self.action_dim}]"
        if (chunk and (a.ndim != 2 or a.shape[1] != self.action_dim or a.shape[0] < 1)) or (
            not chunk and a.shape != (self.action_dim,)
        ):
            raise ValueError(f"{self.name}: action has shape {list(a.shape)}, expected {want}")
        if not np.isfinite(a).all():
            raise ValueError(f"{self.name}: action contains NaN or inf: {a}")
        return np.clip(a, self.action_low, self.action_high)


@dataclass
class ChunkResult:
    """What :meth:`Env.step_chunk` returns: the final observation and per-step rewards."""

    obs: dict[str, np.ndarray] | None  # None when the chunk was executed without observing
    rewards: np.ndarray  # float32 [steps]
    terminated: bool
    truncated: bool
    steps: int
    info: dict[str, Any]
    observe_ns: int = 0  # wall time of the final observation (the chunk's one render)
    observe_cpu_ns: int = 0  # its thread CPU time, when the env's ``time_cpu`` is set

    def __iter__(self):  # allows ``obs, rewards, term, trunc, n, info = env.step_chunk(a)``
        return iter(
            (self.obs, self.rewards, self.terminated, self.truncated, self.steps, self.info)
        )


@runtime_checkable
class Env(Protocol):
    """The protocol every workload follows (tabletop tasks and ``toy``)."""

    spec: EnvSpec
    instruction: str

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]: ...

    def step_chunk(self, actions: np.ndarray, observe: bool = True) -> ChunkResult: ...

    def close(self) -> None: ...


class ChunkedEnvMixin:
    """``step`` and ``step_chunk`` from three primitives, so every env executes chunks alike.

    Subclasses provide ``_apply(action) -> (reward, terminated, truncated)`` (physics only, no
    observation), ``_observe()`` and ``_info()``. Images are rendered once, at the end of a
    chunk: intermediate steps never call the renderer. ``step_chunk`` reports how long that
    observation took, so a profiler can tell physics from rendering; set ``time_cpu`` to also
    get its thread CPU time (a system call, so off by default). ``on_step``, when set, is
    called after every control step: a host process counts progress with it, so that a slow
    chunk can be told from a stuck one.
    """

    spec: EnvSpec
    time_cpu: bool = False
    on_step: Callable[[], None] | None = None

    def step(self, action: np.ndarray):
        a = self.spec.check_action(action)
        reward, terminated, truncated = self._apply(a)
        return self._observe(), float(reward), terminated, truncated, self._info()

    def step_chunk(self, actions: np.ndarray, observe: bool = True) -> ChunkResult:
        """Execute ``actions`` ``[k, A]`` until the episode ends; render the final observation
        unless ``observe`` is False (``obs`` is then None: a host that keeps executing while
        the next chunk is inferred needs no picture of steps nobody decides on)."""
        acts = self.spec.check_action(actions, chunk=True)
        rewards = np.zeros(len(acts), np.float32)
        terminated = truncated = False
        n = 0
        for a in acts:
            rewards[n], terminated, truncated = self._apply(a)
            n += 1
            if self.on_step is not None:
                self.on_step()
            if terminated or truncated:
                break
        if not observe:
            return ChunkResult(None, rewards[:n], terminated, truncated, n, self._info())
        c0 = time.thread_time_ns() if self.time_cpu else 0
        t0 = time.perf_counter_ns()
        obs = self._observe()
        observe_ns = time.perf_counter_ns() - t0
        observe_cpu_ns = time.thread_time_ns() - c0 if self.time_cpu else 0
        info = self._info()
        return ChunkResult(
            obs, rewards[:n], terminated, truncated, n, info, observe_ns, observe_cpu_ns
        )
