"""Any Gymnasium env behind the engine's env protocol (:class:`envs.spec.Env`).

``envs.make("gym:<id>", **kwargs)`` and :func:`from_gym` wrap an env whose observation space
is a ``Box`` or a ``Dict`` of ``Box`` es; the :class:`~envs.spec.EnvSpec` is derived from the
spaces, so nothing is written by hand.

Mapping (every rule can be overridden):

- **state**: the non-image ``Box`` keys, flattened to float32 and concatenated in the order of
  ``state_keys`` (default: the ``Dict`` space's key order; a plain ``Box`` is the state).
- **cameras**: ``uint8`` ``[H, W, 3]`` keys become ``image/<key>``, less a trailing ``_image``
  (``camera_keys`` to choose);
  an env made with ``render_mode="rgb_array"`` adds ``image/<render_camera>`` (default
  ``image/render``) from ``render()``.
- **instruction**: a fixed string, the name of an env attribute (LIBERO's
  ``language_instruction``), or a callable of ``(env, reset_info)``.
- **success**: the first of ``info["success"]`` / ``info["is_success"]``, or a callable of
  ``(env, info)``.
- **actions**: a 1-D ``Box``; its bounds become the spec's bounds. A discrete space is
  refused with an error saying why.

Chunks: :meth:`GymEnv.step_chunk` steps the env action by action and stops at termination
or truncation, both with Gymnasium's meaning. Images are produced **once per chunk**, after
its last action: ``render()`` is called only then, and an env that puts cameras in every
observation can be told to stop for the chunk's inner steps through an
:class:`ObserveHook` (the robosuite layer uses one).

Seeds: ``reset(seed=s)`` passes ``s`` to the env's own ``reset``, which seeds its RNG.
Whether the same seed gives the same first observation is the env's property; the tests
say it per suite (Gymnasium's MuJoCo envs: yes).

Example:
    >>> env = envs.make("gym:Pusher-v5", render_mode="rgb_array", width=64, height=64,
    ...                 instruction="push the object to the goal")
    >>> sorted(env.spec.obs), env.spec.action_dim
    (['image/render', 'state'], 7)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from envs.spec import ChunkResult, EnvSpec, FieldSpec

Instruction = str | Callable[[Any, dict], str]
Success = Callable[[Any, dict], bool] | None


class ObserveHook:
    """Turns an env's per-step observations off for a chunk's inner steps.

    ``pause(env)`` runs before a chunk's first action; ``resume(env, refresh=True)`` after
    its last one returns the env's observation refreshed with everything on (None when the
    last step's observation already has it); before a reset, ``resume(env, refresh=False)``
    only turns everything back on (the reset observes).

    Example:
        >>> class CamerasOff(ObserveHook):
        ...     def pause(self, env): env.cameras_on = False
        ...     def resume(self, env, refresh=True):
        ...         env.cameras_on = True
        ...         return env.observe_now() if refresh else None
    """

    def pause(self, env: Any) -> None:
        pass

    def resume(self, env: Any, refresh: bool = True) -> dict | None:
        return None


def _is_camera(space) -> bool:
    return space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[-1] == 3


class GymEnv:
    """A Gymnasium env as an engine env; build it with :func:`from_gym` or ``envs.make``.

    Args:
        env: the Gymnasium env (its ``reset(seed=)``, ``step``, ``render``, spaces).
        name: the spec's name (default: the env spec's id).
        state_keys: ``Dict`` keys forming ``state``, concatenated in this order.
        camera_keys: ``Dict`` keys that are cameras (default: every ``uint8`` ``[H, W, 3]``).
        render_camera: the camera name of ``render()``'s frame for ``render_mode="rgb_array"``
            envs (``None``: do not render).
        instruction: a string, an env attribute's name, or ``f(env, reset_info) -> str``.
        success: ``f(env, info) -> bool``; default ``info["success"]`` or ``info["is_success"]``.
        observe_hook: pauses per-step observations for a chunk's inner steps.
        max_steps: the episode's step limit (default: the TimeLimit's, else 1000).
        control_hz: control rate for the spec (default: ``1 / env.dt`` where it exists).

    Raises:
        ValueError: a space the adapter cannot map (named key, what was expected, what came).
    """

    time_cpu: bool = False
    on_step: Callable[[], None] | None = None

    def __init__(
        self,
        env: Any,
        *,
        name: str | None = None,
        state_keys: Sequence[str] | None = None,
        camera_keys: Sequence[str] | None = None,
        render_camera: str | None = "render",
        instruction: Instruction = "",
        success: Success = None,
        observe_hook: ObserveHook | None = None,
        max_steps: int | None = None,
        control_hz: float | None = None,
    ) -> None:
        self.env, self.hook = env, observe_hook or ObserveHook()
        self._instruction, self._success = instruction, success
        spec_id = getattr(getattr(env, "spec", None), "id", None)
        name = name or (f"gym:{spec_id}" if spec_id else type(env).__name__)
        self.state_keys, self.camera_keys = self._map_observation(name, state_keys, camera_keys)
        low, high, action_dim = self._map_actions(name)
        obs = {"state": FieldSpec((self._state_dim,), np.float32)}
        self.camera_names = [key.removesuffix("_image") for key in self.camera_keys]
        for key, cam in zip(self.camera_keys, self.camera_names, strict=True):
            obs[f"image/{cam}"] = FieldSpec(self._obs_space[key].shape, np.uint8)
        self.render_camera = None
        if render_camera is not None and getattr(env, "render_mode", None) == "rgb_array":
            env.reset(seed=0)  # render()'s frame size is known only once it has rendered
            frame = np.asarray(env.render())
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
                raise ValueError(
                    f"{name}: render() returned {frame.dtype}{list(frame.shape)}, expected "
                    "uint8 [H, W, 3] (pass render_camera=None to use no rendered camera)"
                )
            self.render_camera = render_camera
            obs[f"image/{render_camera}"] = FieldSpec(frame.shape, np.uint8)
        if max_steps is None:
            max_steps = getattr(getattr(env, "spec", None), "max_episode_steps", None) or 1000
        if control_hz is None:
            dt = getattr(getattr(env, "unwrapped", env), "dt", None)
            control_hz = 1.0 / dt if dt else 25.0
        self.spec = EnvSpec(name, obs, action_dim, low, high, int(max_steps), float(control_hz))
        self.instruction = ""
        self._raw: Any = None
        self._info: dict = {}

    # -- the spaces ---------------------------------------------------------------------------
    def _map_observation(self, name, state_keys, camera_keys) -> tuple[list, list]:
        from gymnasium import spaces

        space = self.env.observation_space
        if isinstance(space, spaces.Box):
            if _is_camera(space):
                raise ValueError(
                    f"{name}: the observation is one image {space}; the engine needs a state "
                    "vector too: wrap the env to give a Dict with a state key"
                )
            self._obs_space, self._state_dim = None, int(np.prod(space.shape))
            return [], []
        if not isinstance(space, spaces.Dict):
            raise ValueError(f"{name}: observation space {space} is not a Box or a Dict of Boxes")
        subs = dict(space.spaces)
        for key, sub in subs.items():
            if not isinstance(sub, spaces.Box):
                raise ValueError(
                    f"{name}: observation key {key!r} is {sub}, expected a Box (the adapter "
                    "maps Boxes to the state and uint8 [H, W, 3] Boxes to cameras)"
                )
        cameras = (
            list(camera_keys)
            if camera_keys is not None
            else [k for k, s in subs.items() if _is_camera(s)]
        )
        state = (
            list(state_keys) if state_keys is not None else [k for k in subs if k not in cameras]
        )
        for key in [*cameras, *state]:
            if key not in subs:
                raise ValueError(f"{name}: no observation key {key!r}; the space has {list(subs)}")
        for key in cameras:
            if not _is_camera(subs[key]):
                raise ValueError(
                    f"{name}: camera key {key!r} is {subs[key]}, expected uint8 [H, W, 3]"
                )
        if not state:
            raise ValueError(f"{name}: no key left for the state; pass state_keys")
        self._obs_space = subs
        self._state_dim = int(sum(np.prod(subs[k].shape) for k in state))
        return state, cameras

    def _map_actions(self, name) -> tuple[Any, Any, int]:
        from gymnasium import spaces

        space = self.env.action_space
        if isinstance(space, spaces.Discrete | spaces.MultiDiscrete | spaces.MultiBinary):
            raise ValueError(
                f"{name}: action space {space} is discrete; the engine executes chunks of "
                "continuous actions (a 1-D Box)"
            )
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"{name}: action space {space} is not a 1-D Box")
        low = np.broadcast_to(space.low, space.shape).astype(np.float64)
        high = np.broadcast_to(space.high, space.shape).astype(np.float64)
        if (low == low[0]).all() and (high == high[0]).all():
            return float(low[0]), float(high[0]), space.shape[0]
        return tuple(low.tolist()), tuple(high.tolist()), space.shape[0]

    # -- the protocol ---------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self.hook.resume(self.env, refresh=False)  # a reset observes everything
        raw, info = self.env.reset(seed=seed)
        self._raw, self._info = raw, dict(info)
        self.instruction = self._read_instruction(info)
        return self._observe(), self._info_out()

    def step(self, action: np.ndarray):
        r = self.step_chunk(np.asarray(action)[None])
        return r.obs, float(r.rewards.sum()), r.terminated, r.truncated, r.info

    def step_chunk(self, actions: np.ndarray, observe: bool = True) -> ChunkResult:
        """Execute ``actions`` ``[k, A]`` until the episode ends; observe once, at the end
        (``observe=False``: not at all)."""
        acts = self.spec.check_action(actions, chunk=True)
        rewards = np.zeros(len(acts), np.float32)
        terminated = truncated = False
        n = 0
        self.hook.pause(self.env)
        for a in acts:
            raw, reward, terminated, truncated, info = self.env.step(a)
            rewards[n] = reward
            n += 1
            if self.on_step is not None:
                self.on_step()
            if terminated or truncated:
                break
        self._raw, self._info = raw, dict(info)
        if not observe:
            return ChunkResult(None, rewards[:n], terminated, truncated, n, self._info_out())
        c0 = time.thread_time_ns() if self.time_cpu else 0
        t0 = time.perf_counter_ns()
        refreshed = self.hook.resume(self.env)
        if refreshed is not None:
            self._raw = refreshed
        obs = self._observe()
        observe_ns = time.perf_counter_ns() - t0
        observe_cpu_ns = time.thread_time_ns() - c0 if self.time_cpu else 0
        return ChunkResult(
            obs, rewards[:n], terminated, truncated, n, self._info_out(), observe_ns, observe_cpu_ns
        )

    def close(self) -> None:
        self.env.close()

    # -- observations -----------------------------------------------------------------------
    def _observe(self) -> dict[str, np.ndarray]:
        raw = self._raw
        if self._obs_space is None:
            state = np.asarray(raw, np.float32).reshape(-1)
            obs = {"state": state}
        else:
            missing = [k for k in (*self.state_keys, *self.camera_keys) if k not in raw]
            if missing:
                raise ValueError(
                    f"{self.spec.name}: observation has no key {missing[0]!r} "
                    f"(it has {sorted(raw)})"
                )
            parts = [np.asarray(raw[k], np.float32).reshape(-1) for k in self.state_keys]
            obs = {"state": np.concatenate(parts) if len(parts) > 1 else parts[0]}
            for key, cam in zip(self.camera_keys, self.camera_names, strict=True):
                obs[f"image/{cam}"] = np.ascontiguousarray(raw[key])
        if self.render_camera is not None:
            obs[f"image/{self.render_camera}"] = np.ascontiguousarray(self.env.render())
        return obs

    def _read_instruction(self, reset_info: dict) -> str:
        spec = self._instruction
        if callable(spec):
            return str(spec(self.env, reset_info))
        if spec and hasattr(self.env.unwrapped, spec):
            return str(getattr(self.env.unwrapped, spec))
        return spec

    def _info_out(self) -> dict[str, Any]:
        if self._success is not None:
            success = bool(self._success(self.env, self._info))
        else:
            success = bool(self._info.get("success", self._info.get("is_success", False)))
        return {**self._info, "success": success}


def from_gym(env: Any | Callable[[], Any], **mapping: Any) -> GymEnv:
    """Wrap a Gymnasium env (or a factory of one) for the engine; ``mapping`` as
    :class:`GymEnv`.

    Example:
        >>> import gymnasium as gym
        >>> env = from_gym(lambda: gym.make("Pusher-v5"), instruction="push the puck")
        >>> engine = RolloutEngine(lambda: from_gym(lambda: gym.make("Pusher-v5")), policy,
        ...                        num_envs=8)
    """
    return GymEnv(env() if callable(env) and not hasattr(env, "step") else env, **mapping)


_MAPPING = (
    "name", "state_keys", "camera_keys", "render_camera", "instruction", "success",
    "observe_hook", "max_steps", "control_hz",
)  # fmt: skip


def make_gym(env_id: str, *, cheap_render: bool = True, **kwargs: Any) -> GymEnv:
    """``envs.make("gym:<env_id>", **kwargs)``: ``gymnasium.make(env_id, ...)`` wrapped.

    ``kwargs`` that name :class:`GymEnv` options go to the adapter, the rest to
    ``gymnasium.make`` (``render_mode="rgb_array"``, ``width``, ``height``, ...). With
    ``cheap_render`` (default) a MuJoCo env renders without shadows, reflections or
    multisampling (:mod:`envs.mujoco`): an order of magnitude cheaper on a CPU.
    """
    from envs import mujoco

    mujoco.default_gl()
    import gymnasium

    mapping = {k: kwargs.pop(k) for k in _MAPPING if k in kwargs}
    env = gymnasium.make(env_id, **kwargs)
    if cheap_render:
        mujoco.cheapen_gym(env)
    return GymEnv(env, **mapping)
