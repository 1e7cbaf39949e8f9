"""robosuite tasks (``envs.make("robosuite/Lift", ...)``) through the Gymnasium adapter.

A thin layer: it builds the robosuite env for VLA rollouts and hands it to
:class:`envs.gym.GymEnv` behind a Gymnasium-style shim.

- **Actions**: the VLA convention, a 7-D end-effector delta (position, axis-angle rotation)
  plus the gripper, in ``[-1, 1]``: robosuite's default ``OSC_POSE`` arm controller with delta
  input and a one-dimensional gripper command (-1 open, +1 closed).
- **Cameras**: ``cameras=("agentview",)`` at ``image_size``; images are upright
  (robosuite's "opencv" convention). robosuite renders every camera on every step; the layer
  turns the camera observables off for a chunk's inner steps and renders once, after the
  chunk's last action (:class:`CamerasOncePerChunk`), with MuJoCo's costly effects off
  (:mod:`envs.mujoco`).
- **State**: ``robot0_proprio-state`` and ``object-state``, concatenated.
- **Episodes**: ``horizon`` steps (truncation); with ``terminate_on_success`` (default) a
  success ends the episode (termination). ``success`` is robosuite's ``_check_success()``.
- **Seeds**: ``reset(seed=s)`` reseeds the env's generator (object placement, robot
  initialisation noise), so the same seed gives the same first observation in every process.
  What robosuite draws once, when it builds the scene (Lift's cube size), comes from
  ``scene_seed``, the same in every worker: unseeded, two workers' cubes differed by 0.4 mm.

Example:
    >>> env = envs.make("robosuite/Lift", cameras=("agentview",), image_size=128)
    >>> obs, info = env.reset(seed=0)
    >>> obs["image/agentview"].shape, env.spec.action_dim
    ((128, 128, 3), 7)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from envs.gym import GymEnv, ObserveHook

INSTRUCTIONS = {
    "Lift": "lift the red cube",
    "Stack": "stack the red cube on the green cube",
    "Door": "open the door",
    "NutAssemblySquare": "fit the square nut onto the square peg",
    "PickPlaceCan": "pick up the can and place it in its bin",
    "Wipe": "wipe the table clean",
}
STATE_KEYS = ("robot0_proprio-state", "object-state")


class CamerasOncePerChunk(ObserveHook):
    """Camera observables off for a chunk's inner steps, on (and rendered once) after it."""

    def __init__(self, cameras: Sequence[str]) -> None:
        self.observables = [f"{c}_image" for c in cameras]

    def _enable(self, suite_env: Any, on: bool) -> None:
        for name in self.observables:
            suite_env.modify_observable(name, "enabled", on)

    def pause(self, env: Any) -> None:
        if self.observables:
            self._enable(env.suite_env, False)

    def resume(self, env: Any, refresh: bool = True) -> dict | None:
        if not self.observables:
            return None
        self._enable(env.suite_env, True)
        return env.suite_env._get_observations(force_update=True) if refresh else None


class RobosuiteGym:
    """A robosuite env with Gymnasium's API (``reset(seed=)``, five-tuple ``step``, spaces)."""

    def __init__(
        self,
        task: str,
        robots: str,
        cameras: Sequence[str],
        image_size: int,
        control_freq: float,
        horizon: int,
        terminate_on_success: bool,
        cheap_render: bool,
        scene_seed: int,
        **suite_kwargs: Any,
    ) -> None:
        from envs import mujoco

        mujoco.default_gl()
        import robosuite
        from gymnasium import spaces

        robosuite.macros.IMAGE_CONVENTION = "opencv"  # upright images
        self.suite_env = robosuite.make(
            task,
            robots=robots,
            has_renderer=False,
            has_offscreen_renderer=bool(cameras),
            use_camera_obs=bool(cameras),
            camera_names=list(cameras) or "agentview",
            camera_heights=image_size,
            camera_widths=image_size,
            control_freq=control_freq,
            horizon=horizon,
            hard_reset=False,  # reload nothing at a reset: the same scene, re-placed
            reward_shaping=True,
            seed=scene_seed,
            **suite_kwargs,
        )
        self.terminate_on_success, self.horizon = terminate_on_success, horizon
        if cheap_render and cameras:
            self._cheapen_rendering()
        obs = self.suite_env.reset()
        self.spec = type("Spec", (), {"id": f"robosuite/{task}", "max_episode_steps": horizon})
        self.dt = 1.0 / control_freq
        self.unwrapped = self
        self.render_mode = None
        low, high = self.suite_env.action_spec
        self.action_space = spaces.Box(low.astype(np.float32), high.astype(np.float32))
        self.observation_space = spaces.Dict(
            {
                k: spaces.Box(0, 255, v.shape, np.uint8)
                if v.dtype == np.uint8
                else spaces.Box(-np.inf, np.inf, v.shape, np.float64)
                for k, v in obs.items()
            }
        )

    def _cheapen_rendering(self) -> None:
        # robosuite made its offscreen context in make(), with multisampling: make it again
        # without (robosuite 1.5's MjRenderContext), and drop shadows and reflections.
        sim = self.suite_env.sim
        context = sim._render_context_offscreen
        from envs import mujoco

        mujoco.cheapen(sim.model._model, context.scn)
        context.gl_ctx.make_current()
        context.con.free()
        context._set_mujoco_context_and_buffers()

    def reset(self, seed: int | None = None):
        if seed is not None:  # the env's one generator: placement and robot noise draw from it
            self.suite_env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        return self.suite_env.reset(), {}

    def step(self, action):
        obs, reward, done, info = self.suite_env.step(action)
        info = dict(info)
        info["success"] = bool(self.suite_env._check_success())
        terminated = self.terminate_on_success and info["success"]
        truncated = bool(done) and not terminated
        return obs, float(reward), terminated, truncated, info

    def close(self) -> None:
        self.suite_env.close()


def make_robosuite(
    task: str,
    *,
    robots: str = "Panda",
    cameras: Sequence[str] = (),
    image_size: int = 128,
    control_freq: float = 20.0,
    horizon: int = 200,
    terminate_on_success: bool = True,
    cheap_render: bool = True,
    instruction: str | None = None,
    scene_seed: int = 0,
    **suite_kwargs: Any,
) -> GymEnv:
    """A robosuite task as an engine env.

    Args:
        task: robosuite's env name (``"Lift"``, ``"Stack"``, ``"Door"``, ...).
        robots: the robot (``"Panda"``).
        cameras: camera names (``"agentview"``, ``"robot0_eye_in_hand"``); none: state only.
        image_size: each camera's height and width.
        control_freq: control steps per second.
        horizon: steps per episode (then truncated).
        terminate_on_success: a success ends the episode.
        cheap_render: render without shadows, reflections or multisampling.
        instruction: the task's instruction (default: a sentence per task).
        scene_seed: seeds what robosuite draws once, when it builds the scene.
        **suite_kwargs: anything else for ``robosuite.make``.

    Raises:
        ImportError: robosuite is not installed (``pip install -e '.[suites]'``).
    """
    try:
        import robosuite  # noqa: F401
    except ImportError:
        raise ImportError("robosuite envs need robosuite: pip install -e '.[suites]'") from None
    cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
    shim = RobosuiteGym(
        task, robots, cameras, image_size, control_freq, horizon, terminate_on_success,
        cheap_render, scene_seed, **suite_kwargs,
    )  # fmt: skip
    return GymEnv(
        shim,
        name=f"robosuite/{task}",
        state_keys=[k for k in STATE_KEYS if k in shim.observation_space.spaces],
        camera_keys=[f"{c}_image" for c in cameras],
        render_camera=None,
        instruction=instruction or INSTRUCTIONS.get(task, task),
        success=lambda env, info: bool(info.get("success", False)),
        observe_hook=CamerasOncePerChunk(cameras),
    )


def warm_up() -> None:
    """Compile robosuite's numba kernels into their on-disk cache (``make`` runs this once per
    install): the first robosuite env of a fresh install otherwise pays about 9 s of JIT
    compilation in every process that starts before the cache exists (measured here)."""
    env = make_robosuite("Lift", horizon=10)
    env.reset(seed=0)
    env.step_chunk(np.zeros((8, env.spec.action_dim)))
    env.close()
