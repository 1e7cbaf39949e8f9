"""Scripted experts: pure functions from the ``state`` observation to a 7-D action.

Each expert is stateless: its phase (approach, descend, grasp, carry, ...) is read off the
geometry in the state, so the same state always gives the same action. That makes them usable
as deterministic policies, for behaviour-cloning data and in tests.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from envs.tabletop.env import POS_SCALE, ROT_SCALE, STATE_LAYOUT
from envs.tabletop.tasks import CUBE_HALF

OPEN, CLOSE = -1.0, 1.0
CARRY_Z = 0.11
PUSH_Z = 0.03
GRASP_DZ = 0.006  # grasp a little above the cube centre: the finger tips clear the table


def _split(s: np.ndarray) -> dict[str, np.ndarray]:
    return {k: s[v].astype(np.float64) for k, v in STATE_LAYOUT.items()}


def _yaw(q: np.ndarray) -> float:
    w, x, y, z = q
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def _gripper_yaw(q: np.ndarray) -> float:
    """Yaw of the finger axis (the hand's y-axis) about the world z-axis."""
    w, x, y, z = q
    fx = 2 * (x * y - w * z)
    fy = 1 - 2 * (x * x + z * z)
    return float(np.arctan2(-fx, fy))


def _wrap_quarter(a: float) -> float:
    return (a + np.pi / 4) % (np.pi / 2) - np.pi / 4


def _move(tcp: np.ndarray, goal: np.ndarray, grip: float, yaw_err: float = 0.0) -> np.ndarray:
    a = np.zeros(7)
    a[:3] = np.clip((goal - tcp) / POS_SCALE, -1.0, 1.0)
    a[5] = np.clip(yaw_err / ROT_SCALE, -1.0, 1.0)
    a[6] = grip
    return a


def reach(s: np.ndarray) -> np.ndarray:
    st = _split(s)
    return _move(st["tcp_pos"], st["target_pos"], OPEN)


def pick_place(s: np.ndarray) -> np.ndarray:
    st = _split(s)
    tcp, obj, tgt = st["tcp_pos"], st["object_pos"], st["target_pos"]
    opening = float(st["gripper"][0])
    yaw_err = _wrap_quarter(_yaw(st["object_quat"]) - _gripper_yaw(st["tcp_quat"]))
    near_obj = np.linalg.norm(tcp - obj) < 0.03
    grasped = near_obj and opening < 2 * CUBE_HALF + 0.006 and obj[2] > CUBE_HALF - 0.01
    placed = np.linalg.norm(obj[:2] - tgt[:2]) < 0.02 and obj[2] < CUBE_HALF + 0.006
    if placed and not grasped:  # done: let go and back off
        return _move(tcp, np.array([tcp[0], tcp[1], CARRY_Z]), OPEN)
    if grasped:
        xy_err = np.linalg.norm(tgt[:2] - obj[:2])
        if xy_err > 0.012:
            if tcp[2] < CARRY_Z - 0.03 and xy_err > 0.05:  # lift before travelling
                return _move(tcp, np.array([tcp[0], tcp[1], CARRY_Z]), CLOSE)
            goal = np.array([tgt[0] + tcp[0] - obj[0], tgt[1] + tcp[1] - obj[1], CARRY_Z])
            return _move(tcp, goal, CLOSE)
        if tcp[2] > CUBE_HALF + GRASP_DZ + 0.004:
            return _move(tcp, np.array([tcp[0], tcp[1], CUBE_HALF + GRASP_DZ]), CLOSE)
        return _move(tcp, tcp, OPEN)
    xy = np.linalg.norm(tcp[:2] - obj[:2])
    if xy > 0.012 or abs(yaw_err) > 0.08:
        hover = max(obj[2] + 0.07, min(tcp[2], CARRY_Z)) if xy > 0.02 else obj[2] + 0.07
        return _move(tcp, np.array([obj[0], obj[1], hover]), OPEN, yaw_err)
    if opening < 2 * CUBE_HALF - 0.012:  # closed on nothing: open and retry
        return _move(tcp, np.array([tcp[0], tcp[1], obj[2] + 0.07]), OPEN)
    grasp = np.array([obj[0], obj[1], obj[2] + GRASP_DZ])
    if tcp[2] > grasp[2] + 0.006 and opening > 2 * CUBE_HALF + 0.01:
        return _move(tcp, grasp, OPEN, yaw_err)
    return _move(tcp, grasp, CLOSE)


def push(s: np.ndarray) -> np.ndarray:
    st = _split(s)
    tcp, obj, tgt = st["tcp_pos"], st["object_pos"], st["target_pos"]
    delta = tgt[:2] - obj[:2]
    dist = np.linalg.norm(delta)
    d = delta / max(dist, 1e-9)
    rel = tcp[:2] - obj[:2]
    along = float(np.dot(rel, d))
    lateral = float(d[0] * rel[1] - d[1] * rel[0])
    standoff = CUBE_HALF + 0.03
    behind = obj[:2] - d * standoff
    low = tcp[2] < PUSH_Z + 0.015
    # While low behind the cube, a looser lateral bound keeps pushing (hysteresis); the
    # approach only comes down when it is right behind the cube.
    pushing = low and along < -CUBE_HALF and abs(lateral) < 0.025
    if not pushing:
        if np.linalg.norm(tcp[:2] - behind) > 0.01:
            near = np.linalg.norm(rel) < standoff + 0.03
            high = PUSH_Z + 0.07 if near or not low else PUSH_Z
            if tcp[2] < high - 0.02:
                return _move(tcp, np.array([tcp[0], tcp[1], high]), CLOSE)
            return _move(tcp, np.array([behind[0], behind[1], high]), CLOSE)
        return _move(tcp, np.array([behind[0], behind[1], PUSH_Z]), CLOSE)
    # Push along the cube-to-target line, steering back onto it as the cube turns.
    perp = np.array([-d[1], d[0]])
    step = min(dist, POS_SCALE)
    goal = tcp[:2] + d * step - perp * lateral
    return _move(tcp, np.array([goal[0], goal[1], PUSH_Z]), CLOSE)


EXPERTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "reach": reach,
    "pick-place": pick_place,
    "push": push,
}


def batched(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Lift a single-state expert to accept ``[state_dim]`` or ``[B, state_dim]``."""

    def expert(state: np.ndarray) -> np.ndarray:
        s = np.asarray(state)
        if s.ndim == 1:
            return fn(s).astype(np.float32)
        return np.stack([fn(row) for row in s]).astype(np.float32)

    expert.__name__ = fn.__name__
    expert.__doc__ = fn.__doc__
    return expert


def predict_state(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The experts' idealised one-step model: where ``state`` goes under action ``a``.

    The TCP moves by the commanded delta (and yaw), the gripper reaches its commanded opening
    unless a cube is between the pads, and a grasped cube moves with the TCP. It lets an expert
    plan a whole action chunk open loop.
    """
    from envs.tabletop.env import _axis_angle_quat, _quat_mul
    from envs.tabletop.robot import FINGER_TRAVEL  # the built-in arm's; a plan, not physics

    s = np.array(s, dtype=np.float64)
    st = _split(s)
    tcp, obj = st["tcp_pos"], st["object_pos"]
    grasped = np.linalg.norm(tcp - obj) < 0.03 and st["gripper"][0] < 2 * CUBE_HALF + 0.006
    delta = np.clip(a[:3], -1, 1) * POS_SCALE
    s[STATE_LAYOUT["tcp_pos"]] = tcp + delta
    q = _quat_mul(_axis_angle_quat(np.clip(a[3:6], -1, 1) * ROT_SCALE), st["tcp_quat"])
    s[STATE_LAYOUT["tcp_quat"]] = q / np.linalg.norm(q)
    opening = 2 * FINGER_TRAVEL * (1.0 - float(np.clip(a[6], -1, 1))) / 2.0
    if np.linalg.norm(tcp - obj) < 0.03:
        opening = max(opening, 2 * CUBE_HALF - 0.002)
    s[STATE_LAYOUT["gripper"]] = opening
    if grasped and a[6] > 0:
        s[STATE_LAYOUT["object_pos"]] = obj + delta
    return s


def run_episode(env, act: Callable[[np.ndarray], np.ndarray], seed: int) -> dict:
    """Run one closed-loop episode of ``act(state) -> action``; return the final info."""
    obs, info = env.reset(seed=seed)
    for _ in range(env.spec.max_steps):
        obs, _, terminated, truncated, info = env.step(act(obs["state"]))
        if terminated or truncated:
            break
    return info
