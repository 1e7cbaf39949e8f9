"""ManiSkill3 tasks (``envs.make("maniskill/PickCube-v1", ...)``) through the Gymnasium adapter.

ManiSkill3 runs its CPU simulation (``sim_backend="physx_cpu"``, one env per process, which
is how the engine's workers hold envs) with ``obs_mode="state"`` or ``"rgb"``. It needs a
Vulkan render device even for state observations: its actor builders create SAPIEN render
materials, and without a device SAPIEN raises "failed to find a rendering device" (Mesa's
lavapipe is not accepted). On such a machine :func:`make_maniskill` raises a
:class:`RenderDeviceError` that says so, instead of SAPIEN's bare message.

Example:
    >>> env = envs.make("maniskill/PickCube-v1", obs_mode="rgb", image_size=128)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.gym import GymEnv


class RenderDeviceError(RuntimeError):
    """ManiSkill3 found no Vulkan render device (it needs one even for state observations)."""


def _flatten_state(obs: Any) -> np.ndarray:
    """ManiSkill's nested state dict (agent, extra) as one float vector, keys in order."""
    if isinstance(obs, dict):
        return np.concatenate([_flatten_state(v) for v in obs.values()]) if obs else np.zeros(0)
    return np.asarray(obs, np.float32).reshape(-1)


class ManiSkillGym:
    """A ManiSkill3 env with one flat ``state`` and, for ``obs_mode="rgb"``, its cameras as
    ``uint8 [H, W, 3]`` keys: what :class:`~envs.gym.GymEnv` maps."""

    def __init__(self, task: str, obs_mode: str, image_size: int, **kwargs: Any) -> None:
        import gymnasium
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        from gymnasium import spaces

        if obs_mode not in ("state", "rgb"):
            raise ValueError(f"obs_mode={obs_mode!r}: choose 'state' or 'rgb'")
        sensor = {"width": image_size, "height": image_size} if obs_mode == "rgb" else None
        try:
            self.env = gymnasium.make(
                task,
                obs_mode="state_dict" if obs_mode == "state" else "rgb",
                sim_backend="physx_cpu",
                num_envs=1,
                **({"sensor_configs": sensor} if sensor else {}),
                **kwargs,
            )
            raw, _ = self.env.reset(seed=0)
        except RuntimeError as exc:
            if "rendering device" in str(exc) or "vulkan" in str(exc).lower():
                raise RenderDeviceError(
                    "ManiSkill3 needs a Vulkan render device, even for obs_mode='state' (its "
                    "scenes create SAPIEN render materials); this machine has none (SAPIEN: "
                    f"{exc})"
                ) from exc
            raise
        self.spec = self.env.spec
        self.unwrapped = self.env.unwrapped
        self.render_mode = None
        self.action_space = spaces.Box(
            np.asarray(self.env.action_space.low).reshape(-1).astype(np.float32),
            np.asarray(self.env.action_space.high).reshape(-1).astype(np.float32),
        )
        obs = self._obs(raw)
        self.observation_space = spaces.Dict(
            {
                k: spaces.Box(0, 255, v.shape, np.uint8)
                if v.dtype == np.uint8
                else spaces.Box(-np.inf, np.inf, v.shape, np.float32)
                for k, v in obs.items()
            }
        )

    def _obs(self, raw: Any) -> dict[str, np.ndarray]:
        raw = _numpy(raw)
        out = {"state": _flatten_state({k: v for k, v in raw.items() if k != "sensor_data"})}
        for cam, data in raw.get("sensor_data", {}).items():
            out[f"{cam}_image"] = np.asarray(data["rgb"], np.uint8).reshape(data["rgb"].shape[-3:])
        return out

    def reset(self, seed: int | None = None):
        raw, info = self.env.reset(seed=seed)
        return self._obs(raw), _numpy(info)

    def step(self, action):
        raw, reward, terminated, truncated, info = self.env.step(action[None])
        info = _numpy(info)
        return (
            self._obs(raw), float(np.asarray(_numpy(reward)).reshape(-1)[0]),
            bool(np.asarray(_numpy(terminated)).reshape(-1)[0]),
            bool(np.asarray(_numpy(truncated)).reshape(-1)[0]), info,
        )  # fmt: skip

    def close(self) -> None:
        self.env.close()


def _numpy(x: Any) -> Any:
    """ManiSkill returns torch tensors with a leading env dimension of 1: numpy, squeezed."""
    if isinstance(x, dict):
        return {k: _numpy(v) for k, v in x.items()}
    if hasattr(x, "cpu"):
        x = x.cpu().numpy()
    if isinstance(x, np.ndarray) and x.ndim and x.shape[0] == 1:
        return x[0]
    return x


def make_maniskill(
    task: str, *, obs_mode: str = "state", image_size: int = 128, instruction: str = "",
    **kwargs: Any,
) -> GymEnv:  # fmt: skip
    """A ManiSkill3 task as an engine env.

    Args:
        task: ManiSkill's env id (``"PickCube-v1"``).
        obs_mode: ``"state"`` or ``"rgb"`` (the task's cameras at ``image_size``).
        image_size: each camera's height and width.
        instruction: the task's instruction (default: the task id).
        **kwargs: anything else for ``gymnasium.make``.

    Raises:
        ImportError: ManiSkill3 is not installed (``pip install mani-skill``).
        RenderDeviceError: the machine has no Vulkan render device.
    """
    try:
        import mani_skill  # noqa: F401
    except ImportError:
        raise ImportError(
            "ManiSkill3 envs need mani-skill (pip install mani-skill; it brings torch, and "
            "a Vulkan render device to run)"
        ) from None
    shim = ManiSkillGym(task, obs_mode, image_size, **kwargs)
    success = lambda env, info: bool(np.asarray(info.get("success", False)).any())
    return GymEnv(
        shim, name=f"maniskill/{task}", render_camera=None, instruction=instruction or task,
        success=success,
    )  # fmt: skip
