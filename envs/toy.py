"""A synthetic env with the tabletop protocol, for tests and benches.

Its observations are a pure function of the reset seed and the actions taken, so a test can
replay any trajectory and check that every byte landed where it belongs. Its step cost is real
CPU work (a busy loop measured on the thread's CPU clock), not sleep, so it loads the cores the
way physics does; ``step_jitter_us`` adds unseeded extra work so that timing varies while the
results stay seeded.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from envs.spec import ChunkedEnvMixin, EnvSpec, FieldSpec

_JITTER = random.Random()  # deliberately unseeded: timing noise only, never results


def burn_cpu(us: float) -> None:
    """Spend ``us`` microseconds of this thread's CPU time on integer arithmetic."""
    if us <= 0:
        return
    end = time.thread_time_ns() + int(us * 1000)
    x = 1
    while time.thread_time_ns() < end:
        for _ in range(32):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


class ToyEnv(ChunkedEnvMixin):
    """Deterministic synthetic dynamics with configurable cost, shapes and episode length.

    ``state[0]`` is the step index within the episode, ``state[1]`` the reset seed modulo
    2**16, ``state[2]`` a running sum of the actions; the rest evolves with the actions.
    Episodes terminate with success at a seeded step for odd seeds, else truncate at
    ``episode_len``.

    Example:
        >>> env = ToyEnv(state_dim=8, cameras=("head",), image_size=16, step_cost_us=200)
        >>> obs, info = env.reset(seed=3)
        >>> obs["image/head"].shape
        (16, 16, 3)
    """

    def __init__(
        self,
        state_dim: int = 16,
        action_dim: int = 7,
        cameras: tuple[str, ...] = (),
        image_size: int = 32,
        episode_len: int = 20,
        step_cost_us: float = 0.0,
        step_jitter_us: float = 0.0,
    ) -> None:
        if state_dim < 4:
            raise ValueError(f"toy: state_dim={state_dim} must be >= 4")
        if action_dim < 1 or episode_len < 1 or image_size < 1:
            raise ValueError("toy: action_dim, episode_len and image_size must be >= 1")
        if step_cost_us < 0 or step_jitter_us < 0:
            raise ValueError("toy: step_cost_us and step_jitter_us must be >= 0")
        obs = {"state": FieldSpec((state_dim,), np.float32)}
        for cam in cameras:
            obs[f"image/{cam}"] = FieldSpec((image_size, image_size, 3), np.uint8)
        self.spec = EnvSpec("toy", obs, action_dim=action_dim, max_steps=episode_len)
        self.cameras = tuple(cameras)
        self.step_cost_us = float(step_cost_us)
        self.step_jitter_us = float(step_jitter_us)
        self.instruction = ""
        self._ramp = (np.arange(image_size * image_size * 3, dtype=np.int64) % 251).reshape(
            image_size, image_size, 3
        )
        self._mix = np.random.default_rng(12345).normal(size=(action_dim, state_dim - 3)) * 0.5
        self._x: np.ndarray | None = None

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        rng = np.random.default_rng(seed)
        self._seed = int(seed)
        self._t = 0
        self._asum = 0.0
        self._x = rng.uniform(-1, 1, self.spec.state_dim - 3)
        half = max(1, self.spec.max_steps // 2)
        self._success_step = int(rng.integers(half, self.spec.max_steps + 1)) if seed % 2 else -1
        self._success = False
        self.instruction = f"toy task {seed % 97}"
        return self._observe(), {"seed": self._seed, **self._info()}

    def _apply(self, a: np.ndarray) -> tuple[float, bool, bool]:
        if self._x is None:
            raise RuntimeError("toy: call reset() before step()")
        burn_cpu(self.step_cost_us + (_JITTER.random() * self.step_jitter_us))
        self._x = np.tanh(0.9 * self._x + a.astype(np.float64) @ self._mix)
        self._t += 1
        self._asum += float(a.sum())
        reward = float(self._x[0])
        self._success = self._t == self._success_step
        truncated = not self._success and self._t >= self.spec.max_steps
        return reward, self._success, truncated

    def _info(self) -> dict[str, Any]:
        return {"success": self._success, "elapsed_steps": self._t}

    def _observe(self) -> dict[str, np.ndarray]:
        head = [self._t, self._seed % 65536, self._asum]
        obs = {"state": np.concatenate([head, self._x]).astype(np.float32)}
        key = (self._seed * 31 + self._t * 7 + int(self._asum * 1000)) % 251
        for i, cam in enumerate(self.cameras):
            obs[f"image/{cam}"] = ((self._ramp + key + 17 * i) % 251).astype(np.uint8)
        return obs

    def close(self) -> None:
        self._x = None
