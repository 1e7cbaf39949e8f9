"""Envs this project did not write, through the Gymnasium adapter (envs/gym.py) and the engine:
Gymnasium's MuJoCo envs, robosuite, and ManiSkill3 where a render device exists."""

import numpy as np
import pytest
from factories import flaky_env, gym_raising_env
from helpers import assert_identical

import envs
from envs.gym import GymEnv
from pipeline import EnvError, RolloutEngine
from pipeline.policies import LatencyPolicy

PUSHER = dict(render_mode="rgb_array", width=32, height=32, instruction="push the puck")
LIFT = dict(horizon=40)  # state only; 60 state values
LIFT_CAM = dict(horizon=40, cameras=("agentview",), image_size=32)


def _policy(state_dim, **kw):
    return LatencyPolicy(state_dim=state_dim, chunk_len=4, **kw)


# -- the adapter on Gymnasium's own envs ----------------------------------------------------------
def test_a_gymnasium_mujoco_env_is_mapped_from_its_spaces_and_renders_through_render():
    env = envs.make("gym:Pusher-v5", **PUSHER)
    spec = env.spec
    assert spec.name == "gym:Pusher-v5" and spec.action_dim == 7
    assert spec.obs["state"].shape == (23,) and spec.obs["image/render"].shape == (32, 32, 3)
    assert (spec.action_low, spec.action_high) == (-2.0, 2.0)  # the Box's bounds
    assert spec.max_steps == 100 and spec.control_hz == pytest.approx(20.0)
    first, _ = env.reset(seed=7)
    again, _ = env.reset(seed=7)  # Gymnasium's MuJoCo envs: the same seed, the same start
    other, _ = env.reset(seed=8)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["state"], other["state"])
    assert env.instruction == "push the puck"
    r = env.step_chunk(np.full((4, 7), 0.5))
    assert r.steps == 4 and r.obs["image/render"].std() > 0 and "success" in r.info
    env.close()


def test_the_adapter_renders_once_per_chunk_and_not_for_unobserved_chunks():
    import gymnasium

    renders = [0]

    class Counted(gymnasium.Wrapper):
        def render(self):
            renders[0] += 1
            return self.env.render()

    env = envs.from_gym(
        lambda: Counted(gymnasium.make("Pusher-v5", render_mode="rgb_array", width=16, height=16))
    )
    env.reset(seed=0)
    before = renders[0]
    env.step_chunk(np.zeros((8, 7)))
    assert renders[0] == before + 1  # eight actions, one frame
    env.step_chunk(np.zeros((3, 7)), observe=False)  # lookahead tails: no frame at all
    assert renders[0] == before + 1
    env.close()


def test_spaces_the_adapter_cannot_map_are_named():
    import gymnasium
    from gymnasium import spaces

    with pytest.raises(ValueError, match="is discrete; the engine executes chunks"):
        envs.make("gym:CartPole-v1")

    class Nested(gymnasium.Env):
        observation_space = spaces.Dict(
            {"joints": spaces.Box(-1, 1, (3,)), "mode": spaces.Discrete(3)}
        )
        action_space = spaces.Box(-1, 1, (2,))

    with pytest.raises(
        ValueError, match=r"observation key 'mode' is Discrete\(3\), expected a Box"
    ):
        GymEnv(Nested())

    class Joints(Nested):
        observation_space = spaces.Dict({"joints": spaces.Box(-1, 1, (3,))})

    with pytest.raises(ValueError, match="no observation key 'wrist'"):
        GymEnv(Joints(), camera_keys=["wrist"])


def test_a_gymnasium_env_runs_in_the_engine_with_its_frames():
    spec = envs.make("gym:Pusher-v5", **PUSHER).spec
    with RolloutEngine(
        "gym:Pusher-v5", _policy(23), num_envs=2, num_workers=1, num_stages=1, env_kwargs=PUSHER
    ) as e:
        td = e.rollout(3)
    assert td["mask"].all()
    assert td["observation", "image", "render"].shape == (2, 3, 3, 32, 32)
    assert td["observation", "image", "render"].float().std() > 0
    assert td["observation", "state"].shape[-1] == spec.state_dim
    assert td.get("language_instruction").tolist()[0][0] == "push the puck"


def test_a_crash_inside_a_wrapped_env_is_an_env_error_with_its_traceback():
    with RolloutEngine(
        gym_raising_env, _policy(23), num_envs=2, num_workers=1, num_stages=1,
        on_worker_failure="raise",
    ) as e:  # fmt: skip
        with pytest.raises(EnvError, match="simulation unstable") as info:
            e.rollout(4)
    assert "original traceback" in str(info.value) and "in step" in str(info.value)
    assert info.value.worker == 0


# -- robosuite -------------------------------------------------------------------------------------
def test_robosuite_lift_maps_to_the_vla_convention_and_seeds_its_placement():
    env = envs.make("robosuite/Lift", **LIFT_CAM)
    spec = env.spec
    assert spec.name == "robosuite/Lift" and spec.action_dim == 7  # eef delta + gripper
    assert spec.obs["state"].shape == (60,) and spec.obs["image/agentview"].shape == (32, 32, 3)
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    c, _ = env.reset(seed=4)
    assert np.array_equal(a["state"], b["state"]) and np.array_equal(
        a["image/agentview"], b["image/agentview"]
    )  # robosuite through the adapter: the same seed, the same first observation
    assert not np.array_equal(a["state"], c["state"])
    assert env.instruction == "lift the red cube"
    frames = [0]
    sim = env.env.suite_env.sim
    render = sim.render

    def counted(*args, **kw):
        frames[0] += 1
        return render(*args, **kw)

    sim.render = counted
    r = env.step_chunk(np.zeros((8, 7)))
    assert r.steps == 8 and frames[0] == 1  # robosuite renders every step; here once a chunk
    assert r.obs["image/agentview"].std() > 0
    env.close()


@pytest.fixture(scope="module")
def lift_reference():
    """Lock-step robosuite Lift: the reference every schedule must reproduce bit for bit."""
    with RolloutEngine(
        "robosuite/Lift", _policy(60), num_envs=4, num_workers=2, num_stages=1, mode="sync",
        env_kwargs=LIFT, seed=5, inference_threads=1,
    ) as e:  # fmt: skip
        return e.rollout(6)


@pytest.mark.parametrize(
    "schedule", [dict(num_stages=2), dict(schedule="dynamic")], ids=["stages", "dynamic"]
)
def test_robosuite_lift_gives_lock_steps_trajectories_on_every_schedule(lift_reference, schedule):
    with RolloutEngine(
        "robosuite/Lift", _policy(60), num_envs=4, num_workers=2, env_kwargs=LIFT, seed=5,
        inference_threads=1, **schedule,
    ) as e:  # fmt: skip
        td = e.rollout(6)
    assert td["mask"].all()
    assert_identical(td, lift_reference)


def test_robosuite_with_a_camera_and_a_second_task_run_in_the_engine():
    with RolloutEngine(
        "robosuite/Lift", _policy(60), num_envs=2, num_workers=2, num_stages=1,
        env_kwargs=LIFT_CAM,
    ) as e:  # fmt: skip
        td = e.rollout(2)
    images = td["observation", "image", "agentview"]
    assert images.shape == (2, 2, 3, 32, 32) and images.float().std() > 0
    # A second task, through the engine too: Stack (two cubes).
    stack_spec = envs.make("robosuite/Stack", horizon=20).spec
    assert stack_spec.action_dim == 7
    with RolloutEngine(
        "robosuite/Stack", _policy(stack_spec.state_dim), num_envs=2, num_workers=2,
        num_stages=1, env_kwargs=dict(horizon=20),
    ) as e:  # fmt: skip
        td = e.rollout(2)
    assert td["mask"].all() and not td["next", "success"].any()
    assert td.get("language_instruction").tolist()[0][0] == "stack the red cube on the green cube"


def test_a_killed_robosuite_worker_is_replaced_and_the_others_are_unchanged(
    tmp_path, lift_reference
):
    # The reference is lock-step's run of the same engine (the schedules are bitwise equal,
    # tested above), so one faulted run is enough.
    env_kwargs = dict(LIFT, base="robosuite/Lift", marker_dir=str(tmp_path), how="kill")
    with RolloutEngine(
        flaky_env, _policy(60), num_envs=4, num_workers=2, env_kwargs=env_kwargs, seed=5,
        inference_threads=1,
    ) as e:  # fmt: skip
        td, restarts, failures = e.rollout(6), e.stats.restarts, e.failures
    assert restarts == 1 and "SIGKILL" in failures[0].error and failures[0].worker == 1
    assert_identical(td[[0, 2]], lift_reference[[0, 2]])  # worker 0's envs never noticed
    assert td["aborted"][[1, 3]].any() and not (td["mask"] & td["aborted"]).any()


# -- ManiSkill3 -----------------------------------------------------------------------------------
def _maniskill_missing() -> str | None:
    """Why ManiSkill3 cannot run here (the render device first), or None when it can."""
    import sapien

    try:
        sapien.render.RenderMaterial()  # what ManiSkill's scene builders do first
    except RuntimeError as exc:
        return f"ManiSkill3 needs a Vulkan render device, even for state; SAPIEN: {exc}"
    try:
        import mani_skill  # noqa: F401
    except ImportError:
        return "mani-skill is not installed (pip install mani-skill, on a machine with a GPU)"
    return None


def test_maniskill3_says_why_it_cannot_run_without_a_render_device():
    if _maniskill_missing() is None:
        pytest.skip("this machine has a render device and ManiSkill3: the test below runs")
    with pytest.raises((ImportError, RuntimeError), match="mani-skill|render device"):
        envs.make("maniskill/PickCube-v1")


@pytest.mark.skipif(_maniskill_missing() is not None, reason=str(_maniskill_missing()))
def test_maniskill3_pick_cube_runs_in_the_engine():
    with RolloutEngine(
        "maniskill/PickCube-v1", _policy(envs.make("maniskill/PickCube-v1").spec.state_dim),
        num_envs=2, num_workers=2,
    ) as e:  # fmt: skip
        td = e.rollout(3)
    assert td["mask"].all()
