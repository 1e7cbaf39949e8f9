"""A synthetic env with the tabletop protocol, for tests and benches.

Its observations are a pure function of the reset seed and the actions taken, so a test can
replay any trajectory and check that every byte landed where it belongs. Its step cost is real
CPU work (a busy loop measured on the thread's CPU clock), not sleep, so it loads the cores the
way physics does; ``step_jitter_us`` and ``step_cost_cv`` add unseeded variation so that timing
varies while the results stay seeded.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from envs.spec import ChunkedEnvMixin, EnvSpec, FieldSpec

REACH_STEP, REACH_RADIUS, REACH_GOAL = 0.1, 0.15, 0.6  # task="reach": move, hit, goal box
_WORDS = ("pick", "up", "the", "red", "cube", "and", "place", "it", "on", "blue", "plate", "gently")
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

    ``task="timer"`` (default): ``state[0]`` is the step index within the episode,
    ``state[1]`` the reset seed modulo 2**16, ``state[2]`` a running sum of the actions; the
    rest evolves with the actions. Episodes terminate with success at a seeded step for odd
    seeds, else truncate at ``episode_len``: success ignores the actions.

    ``task="reach"``: success depends on the actions, so a policy can learn it in seconds.
    A point starts at the origin and moves by ``REACH_STEP * action[:2]`` per step; the
    episode succeeds when it comes within ``REACH_RADIUS`` of a seeded goal. ``state`` is
    ``[t / episode_len, point (2), goal (2), 0...]``.

    ``instruction_words=n`` makes each episode's instruction 1 to ``n`` words drawn by the
    reset seed (texts of many lengths, for checks that instructions reach the policy intact).

    ``static_images=True`` returns the same frames every step (made once): an env whose
    rendering is free, to measure what moving frames costs and nothing else.

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
        step_cost_cv: float = 0.0,
        task: str = "timer",
        static_images: bool = False,
        instruction_words: int = 0,
    ) -> None:
        if task not in ("timer", "reach"):
            raise ValueError(f"toy: task={task!r}: choose 'timer' or 'reach'")
        if state_dim < 5:
            raise ValueError(f"toy: state_dim={state_dim} must be >= 5")
        if task == "reach" and action_dim < 2:
            raise ValueError("toy: task='reach' needs action_dim >= 2")
        if instruction_words < 0:
            raise ValueError(f"toy: instruction_words={instruction_words} must be >= 0")
        if action_dim < 1 or episode_len < 1 or image_size < 1:
            raise ValueError("toy: action_dim, episode_len and image_size must be >= 1")
        if step_cost_us < 0 or step_jitter_us < 0 or step_cost_cv < 0:
            raise ValueError("toy: step_cost_us, step_jitter_us and step_cost_cv must be >= 0")
        obs = {"state": FieldSpec((state_dim,), np.float32)}
        for cam in cameras:
            obs[f"image/{cam}"] = FieldSpec((image_size, image_size, 3), np.uint8)
        self.spec = EnvSpec("toy", obs, action_dim=action_dim, max_steps=episode_len)
        self.cameras, self.task = tuple(cameras), task
        self.step_cost_us = float(step_cost_us)
        self.step_jitter_us = float(step_jitter_us)
        self.step_cost_cv = float(step_cost_cv)
        self._cost_factor = 1.0
        self.instruction = ""
        self.instruction_words = int(instruction_words)
        self._ramp = (np.arange(image_size * image_size * 3, dtype=np.int64) % 251).reshape(
            image_size, image_size, 3
        )
        self._mix = np.random.default_rng(12345).normal(size=(action_dim, state_dim - 3)) * 0.5
        # static_images: the same frames every step, made once (an env whose render is free:
        # what moving frames costs, and nothing else).
        self._static = (
            {f"image/{cam}": ((self._ramp + 17 * i) % 251).astype(np.uint8)
             for i, cam in enumerate(cameras)}
            if static_images else None
        )  # fmt: skip
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
        self._point = np.zeros(2)
        self._goal = rng.uniform(-REACH_GOAL, REACH_GOAL, 2)
        self.instruction = self._instruction(seed, rng)
        return self._observe(), {"seed": self._seed, **self._info()}

    def _instruction(self, seed: int, rng: np.random.Generator) -> str:
        if self.instruction_words:
            n = int(rng.integers(1, self.instruction_words + 1))
            return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), n))
        return "reach the goal" if self.task == "reach" else f"toy task {seed % 97}"

    def _apply(self, a: np.ndarray) -> tuple[float, bool, bool]:
        if self._x is None:
            raise RuntimeError("toy: call reset() before step()")
        burn_cpu(self.step_cost_us * self._cost_factor + _JITTER.random() * self.step_jitter_us)
        self._x = np.tanh(0.9 * self._x + a.astype(np.float64) @ self._mix)
        self._t += 1
        self._asum += float(a.sum())
        reward = float(self._x[0])
        if self.task == "reach":
            self._point = self._point + REACH_STEP * a[:2].astype(np.float64)
            distance = float(np.linalg.norm(self._point - self._goal))
            reward = -distance
            self._success = distance < REACH_RADIUS
        else:
            self._success = self._t == self._success_step
        truncated = not self._success and self._t >= self.spec.max_steps
        return reward, self._success, truncated

    def step_chunk(self, actions: np.ndarray, observe: bool = True):
        """A chunk whose steps share one cost draw (``step_cost_cv``): contact-rich stretches
        of physics are slow for many steps in a row. Independent draws per step would
        average out over a chunk (the CV of a chunk's cost would fall by sqrt(steps))."""
        if self.step_cost_cv > 0:
            k = 1.0 / self.step_cost_cv**2  # gamma with mean 1 and the requested CV
            self._cost_factor = _JITTER.gammavariate(k, 1.0 / k)
        return super().step_chunk(actions, observe)

    def _info(self) -> dict[str, Any]:
        return {"success": self._success, "elapsed_steps": self._t}

    def _observe(self) -> dict[str, np.ndarray]:
        if self.task == "reach":
            state = np.zeros(self.spec.state_dim, np.float32)
            state[:5] = [self._t / self.spec.max_steps, *self._point, *self._goal]
        else:
            state = np.concatenate([[self._t, self._seed % 65536, self._asum], self._x])
        obs = {"state": state.astype(np.float32)}
        if self._static is not None:
            return {**obs, **self._static}
        key = (self._seed * 31 + self._t * 7 + int(self._asum * 1000)) % 251
        for i, cam in enumerate(self.cameras):
            obs[f"image/{cam}"] = ((self._ramp + key + 17 * i) % 251).astype(np.uint8)
        return obs

    def close(self) -> None:
        self._x = None


def reach_expert(state: np.ndarray) -> np.ndarray:
    """The ``task="reach"`` expert: full speed towards the goal, ``[S]`` or ``[B, S]`` ->
    ``[7]`` or ``[B, 7]`` (action_dim 7)."""
    s = np.asarray(state, np.float64)
    a = np.zeros((*s.shape[:-1], 7), np.float32)
    a[..., :2] = np.clip((s[..., 3:5] - s[..., 1:3]) / REACH_STEP, -1.0, 1.0)
    return a


def reach_model(state: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Where ``task="reach"``'s state goes under ``action`` (one state, exact but for t)."""
    s = np.array(state, np.float64)
    s[1:3] += REACH_STEP * np.clip(action[:2], -1.0, 1.0)
    return s
