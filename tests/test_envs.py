"""The workloads: spec conformity, determinism, chunk semantics, image content, errors."""

import numpy as np
import pytest

import envs
from envs.tabletop.env import STATE_LAYOUT

TABLETOP = ["tabletop/reach", "tabletop/pick-place", "tabletop/push"]


def test_names():
    assert envs.names() == ["tabletop/pick-place", "tabletop/push", "tabletop/reach", "toy"]
    with pytest.raises(ValueError, match="unknown env 'nope'"):
        envs.make("nope")


@pytest.mark.parametrize("name", envs.names())
@pytest.mark.parametrize(
    "cameras,size", [((), 64), (("head",), 64), (("head", "wrist", "side"), 96)]
)
def test_spec_conformity(name, cameras, size):
    env = envs.make(name, cameras=cameras, image_size=size)
    spec = env.spec
    assert isinstance(env, envs.Env)
    assert set(spec.obs) == {"state", *[f"image/{c}" for c in cameras]}
    assert spec.action_dim == 7 and spec.max_steps > 0 and spec.control_hz > 0
    obs, info = env.reset(seed=1)
    spec.check_obs(obs)
    assert isinstance(env.instruction, str) and env.instruction
    assert info["success"] is False
    for cam in cameras:
        assert obs[f"image/{cam}"].shape == (size, size, 3)
    obs, r, term, trunc, info = env.step(np.zeros(7))
    spec.check_obs(obs)
    assert isinstance(r, float) and "success" in info
    res = env.step_chunk(np.zeros((5, 7), np.float32))
    spec.check_obs(res.obs)
    assert res.rewards.dtype == np.float32 and len(res.rewards) == res.steps <= 5
    assert "success" in res.info
    env.close()


@pytest.mark.parametrize("name", envs.names())
def test_seed_determinism_bitwise(name):
    a = envs.make(name, cameras=("head", "wrist"), image_size=64)
    b = envs.make(name, cameras=("head", "wrist"), image_size=64)
    oa, _ = a.reset(seed=11)
    a.step_chunk(np.full((6, 7), 0.3, np.float32))  # history in a must not leak into a reset
    oa, _ = a.reset(seed=11)
    ob, _ = b.reset(seed=11)
    for k in oa:
        assert oa[k].tobytes() == ob[k].tobytes(), k
    assert a.instruction == b.instruction
    acts = np.random.default_rng(0).uniform(-1, 1, (8, 7)).astype(np.float32)
    ra, rb = a.step_chunk(acts), b.step_chunk(acts)
    for k in ra.obs:
        assert ra.obs[k].tobytes() == rb.obs[k].tobytes(), k
    assert ra.rewards.tobytes() == rb.rewards.tobytes()
    oc, _ = b.reset(seed=12)
    assert oc["state"].tobytes() != ob["state"].tobytes()


@pytest.mark.parametrize("name", TABLETOP)
def test_instructions_vary(name):
    env = envs.make(name, cameras=())
    seen = set()
    for seed in range(30):
        env.reset(seed=seed)
        seen.add(env.instruction)
    assert len(seen) >= 8  # paraphrases x colours x nouns


def test_step_chunk_renders_once_at_the_end(monkeypatch):
    env = envs.make("tabletop/pick-place", cameras=("head",), image_size=64, renderer="cpu")
    env.reset(seed=0)
    calls = []
    original = env._images.render
    monkeypatch.setattr(env._images, "render", lambda *a, **k: calls.append(1) or original(*a, **k))
    res = env.step_chunk(np.zeros((10, 7), np.float32))
    assert res.steps == 10 and len(calls) == 1


def test_step_chunk_stops_when_the_episode_ends():
    env = envs.make("toy", episode_len=5)
    env.reset(seed=2)  # even seed: no success, truncates at 5
    res = env.step_chunk(np.zeros((8, 7), np.float32))
    assert res.steps == 5 and res.truncated and not res.terminated
    env.reset(seed=3)  # odd seed: terminates with success at a seeded step
    res = env.step_chunk(np.zeros((8, 7), np.float32))
    assert res.terminated and res.info["success"] and res.steps <= 5


def test_image_changes_when_the_cube_moves():
    env = envs.make("tabletop/push", cameras=("head", "side"), image_size=96)
    obs, _ = env.reset(seed=5)
    before = {k: v.copy() for k, v in obs.items()}
    pose = env.cube.entity_pose
    env.cube.entity.set_pose(type(pose)(np.asarray(pose.p) + [0.0, 0.08, 0.0], pose.q))
    after = env._observe()
    assert not np.allclose(
        after["state"][STATE_LAYOUT["object_pos"]], before["state"][STATE_LAYOUT["object_pos"]]
    )
    for cam in ("image/head", "image/side"):
        changed = np.any(after[cam] != before[cam], axis=-1)
        assert changed.sum() > 30, cam  # the cube's pixels moved


def test_images_show_the_scene():
    env = envs.make("tabletop/pick-place", cameras=("head",), image_size=128)
    obs, _ = env.reset(seed=0)
    img = obs["image/head"].reshape(-1, 3).astype(int)
    from envs.tabletop.tasks import COLOURS

    ep = env._episode
    for role in ("object", "target", "distractor"):
        colour = np.array(COLOURS[ep.colours[role]])
        # Flat shading scales colours; look for pixels proportional to the role's colour.
        dist = np.abs(img / np.maximum(img.sum(1, keepdims=True), 1) - colour / colour.sum()).sum(1)
        assert (dist < 0.05).sum() > 5, role
    assert len(np.unique(img, axis=0)) > 20  # table, arm shades, background, objects


def test_bad_actions_raise():
    env = envs.make("tabletop/reach", cameras=())
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        env.step(np.array([np.nan] * 7))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="shape"):
        env.step_chunk(np.zeros((0, 7)))
    with pytest.raises(ValueError, match="cameras"):
        envs.make("tabletop/reach", cameras=("nose",))
    with pytest.raises(ValueError, match="whole multiple"):
        envs.make("tabletop/reach", physics_hz=100, control_hz=30)


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match="reset"):
        envs.make("toy").step(np.zeros(7))


def test_toy_step_cost_is_cpu_time():
    import time

    env = envs.make("toy", step_cost_us=3000)
    env.reset(seed=0)
    t0 = time.thread_time()
    env.step_chunk(np.zeros((5, 7), np.float32))
    assert time.thread_time() - t0 >= 0.015  # 5 x 3 ms of this thread's CPU, not sleep


def test_toy_jitter_keeps_results_seeded():
    a = envs.make("toy", cameras=("c",), image_size=8, step_jitter_us=300)
    b = envs.make("toy", cameras=("c",), image_size=8)
    acts = np.random.default_rng(1).uniform(-1, 1, (7, 7)).astype(np.float32)
    a.reset(seed=9)
    b.reset(seed=9)
    ra, rb = a.step_chunk(acts), b.step_chunk(acts)
    assert ra.obs["state"].tobytes() == rb.obs["state"].tobytes()
    assert ra.obs["image/c"].tobytes() == rb.obs["image/c"].tobytes()


@pytest.mark.parametrize("task", TABLETOP)
def test_expert_success_rate(task):
    from envs.tabletop.experts import run_episode

    env, expert = envs.make(task, cameras=()), envs.expert(task)
    wins = sum(run_episode(env, expert, seed)["success"] for seed in range(50))
    assert wins >= 45, f"{task}: expert succeeded on {wins}/50 seeds"


def test_expert_accepts_batches():
    env = envs.make("tabletop/pick-place", cameras=())
    states = np.stack([env.reset(seed=s)[0]["state"] for s in range(3)])
    expert = envs.expert("tabletop/pick-place")
    batch = expert(states)
    assert batch.shape == (3, 7) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], expert(states[1]))


def test_robot_urdf_round_trip(tmp_path):
    """Any URDF arm loads by path (visuals dropped); the built-in arm, exported, still works."""
    from envs.tabletop.robot import export_urdf

    path = export_urdf(str(tmp_path / "arm.urdf"))
    env = envs.make("tabletop/reach", cameras=("head",), image_size=64, robot_urdf=path)
    from envs.tabletop.experts import run_episode

    obs, _ = env.reset(seed=0)
    env.spec.check_obs(obs)
    expert = envs.expert("tabletop/reach")
    wins = sum(run_episode(env, expert, seed)["success"] for seed in range(5))
    assert wins >= 4
    with pytest.raises(ValueError, match="no link named 'palm'"):
        envs.make("tabletop/reach", cameras=(), robot_urdf=path, hand_link="palm")
    with pytest.raises(ValueError, match="home_qpos has 3 values"):
        envs.make("tabletop/reach", cameras=(), robot_urdf=path, home_qpos=[0, 0, 0])


def test_toy_timing_options_never_change_results():
    # step_cost_cv draws each chunk's cost (unseeded); static_images freezes the frames.
    plain = envs.make("toy", cameras=("a",), image_size=8)
    varied = envs.make("toy", cameras=("a",), image_size=8, step_cost_us=50, step_cost_cv=1.0)
    acts = np.full((3, plain.spec.action_dim), 0.2, np.float32)
    for env in (plain, varied):
        env.reset(seed=5)
    a, b = plain.step_chunk(acts), varied.step_chunk(acts)
    assert (
        all(np.array_equal(a.obs[k], b.obs[k]) for k in a.obs)
        and a.rewards.tolist() == b.rewards.tolist()
    )
    static = envs.make("toy", cameras=("a",), image_size=8, static_images=True)
    first, _ = static.reset(seed=1)
    later = static.step_chunk(acts).obs
    assert np.array_equal(first["image/a"], later["image/a"])
    assert not np.array_equal(first["state"], later["state"])
    with pytest.raises(ValueError, match="step_cost_cv"):
        envs.make("toy", step_cost_cv=-1)


def test_proprio_state_keeps_the_scene_out_of_the_state():
    # state="proprio": the robot's own state only; the scene (object, target) is in the
    # images, and the full state goes to "privileged" for the scripted experts.
    kw = dict(cameras=("head",), image_size=32)
    full, pixels = (
        envs.make("tabletop/pick-place", **kw),
        envs.make("tabletop/pick-place", state="proprio", **kw),
    )
    assert set(pixels.spec.obs) == {"state", "privileged", "image/head"}
    a, _ = full.reset(seed=4)
    b, _ = pixels.reset(seed=4)
    assert np.array_equal(b["privileged"], a["state"])
    assert np.array_equal(b["image/head"], a["image/head"])
    own = [STATE_LAYOUT[k] for k in ("gripper", "tcp_pos", "tcp_quat")]
    assert np.array_equal(
        b["state"], np.concatenate([*(a["state"][s] for s in own), a["state"][18:]])
    )
    scene = a["state"][STATE_LAYOUT["object_pos"]]
    assert not any(np.isclose(b["state"], v).any() for v in scene)  # no object coordinate
    with pytest.raises(ValueError, match="give cameras="):
        envs.make("tabletop/pick-place", state="proprio", cameras=())
    with pytest.raises(ValueError, match="state='all'"):
        envs.make("tabletop/pick-place", state="all", **kw)
