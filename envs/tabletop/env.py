"""SAPIEN tabletop workloads: reach, pick-place and push with a 7-DoF arm.

Physics is SAPIEN 3 PhysX on the CPU in a physics-only scene. Actions are OpenVLA/LIBERO-style
end-effector deltas, mapped to joint targets with SAPIEN's Pinocchio IK and tracked by PD
drives with gravity compensation. Images come from SAPIEN cameras when a render device exists
and from the CPU rasteriser otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import sapien

from envs.spec import ChunkedEnvMixin, EnvSpec, FieldSpec
from envs.tabletop import robot as arm
from envs.tabletop.raster import Camera, Rasteriser, look_at
from envs.tabletop.tasks import COLOURS, CUBE_HALF, SUCCESS_RADIUS, TASKS, Episode, sample_episode

# Layout of the float32 ``state`` observation; the experts read it by these names. The
# robot-independent part comes first, so it stays put whatever arm (and dof) is loaded; the
# joint positions follow: ``state[QPOS_START:]`` (9 values for the built-in arm).
STATE_LAYOUT = {
    "gripper": slice(0, 1),
    "tcp_pos": slice(1, 4),
    "tcp_quat": slice(4, 8),
    "object_pos": slice(8, 11),
    "object_quat": slice(11, 15),
    "target_pos": slice(15, 18),
}
QPOS_START = 18
# What a real robot knows about itself (``state="proprio"``): these, then the joints.
PROPRIO_KEYS = ("gripper", "tcp_pos", "tcp_quat")

POS_SCALE = 0.015  # metres per control step at action 1.0
ROT_SCALE = 0.10  # radians per control step at action 1.0
# The TCP floor keeps the finger tips (2 cm below the TCP) just off the table.
WORKSPACE = (np.array([-0.30, -0.35, 0.022]), np.array([0.30, 0.35, 0.45]))
MAX_LEAD = 0.04  # the commanded pose never leads the measured TCP by more (no wind-up)
ROBOT_BASE = np.array([-0.45, 0.0, 0.0])
TCP_DOWN = np.array([0.0, 0.0, 1.0, 0.0])  # (w, x, y, z): gripper pointing at the table
CAMERAS = ("head", "wrist", "side", "top")
_FIXED_CAMERAS = {
    "head": ((0.38, 0.0, 0.48), (-0.12, 0.0, 0.06), 60.0),
    "side": ((0.05, 0.70, 0.45), (-0.10, 0.0, 0.08), 58.0),
    # Steep (54 degrees down) and narrow onto the placement area (TABLE_XY), which fills the
    # frame's width with the gripper's start above it: at 64x64 a cube is ~5 px wide, where
    # the head camera's wide oblique view squeezes the area into a band of its lower third.
    "top": ((0.40, 0.0, 0.55), (0.0, 0.0, 0.0), 42.0),
}
_WRIST_FOV = 80.0
_ARM_COLOURS = ((200, 200, 205), (90, 95, 105))
_render_device_ok: bool | None = None


def _configure_physx() -> None:
    # The defaults are too soft for grasping (see the project's NOTES).
    sapien.physx.set_body_config(solver_position_iterations=15, solver_velocity_iterations=1)
    sapien.physx.set_shape_config(contact_offset=0.02, rest_offset=0.0)


def _axis_angle_quat(v: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(v))
    if angle < 1e-9:
        return np.array([1.0, 0.0, 0.0, 0.0])
    axis = v / angle
    return np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * axis])


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ]
    )


def render_device_available() -> bool:
    """Whether SAPIEN can create a render device here (cached per process)."""
    global _render_device_ok
    if _render_device_ok is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sapien.render.RenderSystem()
            _render_device_ok = True
        except Exception:
            _render_device_ok = False
    return _render_device_ok


class TabletopEnv(ChunkedEnvMixin):
    """One tabletop task in its own SAPIEN scene.

    ``state="proprio"`` keeps only what a real robot knows about itself in ``state``
    (gripper opening, TCP position and orientation, joint positions): the object, target and
    distractor are then visible in the camera images only, and which cube to move is said
    only by the instruction. The full simulator state, which the scripted experts read, moves
    to ``obs["privileged"]``; policies must not read it (TinyVLA reads ``state``, the images
    and the instruction).

    Example:
        >>> env = envs.make("tabletop/pick-place", cameras=("head",), image_size=128)
        >>> obs, info = env.reset(seed=0)
        >>> obs, rewards, terminated, truncated, steps, info = env.step_chunk(np.zeros((8, 7)))
        >>> pixels = envs.make("tabletop/pick-place", cameras=("head",), state="proprio")
    """

    def __init__(
        self,
        task: str,
        cameras: tuple[str, ...] = ("head",),
        image_size: int = 128,
        physics_hz: float = 250.0,
        control_hz: float = 25.0,
        max_steps: int | None = None,
        renderer: str = "auto",
        reward: str = "sparse",
        robot_urdf: str | None = None,
        hand_link: str = "hand",
        home_qpos: np.ndarray | None = None,
        state: str = "full",
    ) -> None:
        if state not in ("full", "proprio"):
            raise ValueError(f"state={state!r}: choose 'full' or 'proprio'")
        if state == "proprio" and not cameras:
            raise ValueError("state='proprio' hides the scene from the state: give cameras=")
        if task not in TASKS:
            raise ValueError(f"unknown tabletop task {task!r}; choose from {sorted(TASKS)}")
        cameras = tuple(cameras)
        bad = [c for c in cameras if c not in CAMERAS]
        if bad or len(set(cameras)) != len(cameras):
            raise ValueError(f"cameras {cameras!r}: each must be one of {CAMERAS}, no repeats")
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small (min 16)")
        substeps = physics_hz / control_hz
        if control_hz <= 0 or abs(substeps - round(substeps)) > 1e-9 or substeps < 1:
            raise ValueError(
                f"physics_hz={physics_hz} must be a whole multiple of control_hz={control_hz}"
            )
        if renderer not in ("auto", "sapien", "cpu"):
            raise ValueError(f"renderer={renderer!r}: choose 'auto', 'sapien' or 'cpu'")
        if reward not in ("sparse", "dense"):
            raise ValueError(f"reward={reward!r}: choose 'sparse' or 'dense'")
        if renderer == "sapien" and not render_device_available():
            raise RuntimeError("renderer='sapien' but SAPIEN finds no render device here")
        self.task = TASKS[task]
        self.cameras = cameras
        self.image_size = int(image_size)
        self.substeps = int(round(substeps))
        self.reward_type = reward
        if renderer == "auto":
            renderer = "sapien" if cameras and render_device_available() else "cpu"
        self.renderer = renderer
        self.instruction = ""
        self._build(physics_hz, robot_urdf, hand_link, home_qpos)
        self.state_mode = state
        full = QPOS_START + self.robot.dof
        own = [np.arange(QPOS_START)[STATE_LAYOUT[k]] for k in PROPRIO_KEYS]
        self._proprio = np.concatenate([*own, np.arange(QPOS_START, full)])
        obs = {"state": FieldSpec((full,), np.float32)}
        if state == "proprio":
            proprio = FieldSpec((len(self._proprio),), np.float32)
            obs = {"state": proprio, "privileged": obs["state"]}
        for cam in cameras:
            obs[f"image/{cam}"] = FieldSpec((self.image_size, self.image_size, 3), np.uint8)
        self.spec = EnvSpec(
            name=f"tabletop/{task}",
            obs=obs,
            action_dim=7,
            max_steps=max_steps or self.task.max_steps,
            control_hz=control_hz,
        )

    # -- construction ------------------------------------------------------------------------
    def _build(self, physics_hz: float, robot_urdf, hand_link: str, home_qpos) -> None:
        _configure_physx()
        systems = [sapien.physx.PhysxCpuSystem()]
        if self.renderer == "sapien" and self.cameras:
            systems.append(sapien.render.RenderSystem())
        self.scene = sapien.Scene(systems)
        self.scene.set_timestep(1.0 / physics_hz)
        self.scene.add_ground(0.0, render=False)
        grip = sapien.physx.PhysxMaterial(1.5, 1.5, 0.0)
        base = sapien.Pose(ROBOT_BASE)
        if robot_urdf is None:
            self.robot = arm.build_robot(self.scene, base, grip)
        else:
            self.robot = arm.load_urdf_robot(self.scene, robot_urdf, base, hand_link, home_qpos)
        self.cube = self._cube("cube", grip)
        self.distractor = self._cube("distractor", grip)
        self.target_marker = self._marker() if self.task.target_in_air else None
        self._base_inv = self.robot.articulation.root_pose.inv()
        self._q_limits = np.asarray(self.robot.articulation.get_qlimits())
        self._init_state = self.scene.physx_system.pack()
        self._images = None  # the renderer: a Rasteriser or SapienCameras
        if self.cameras:
            links = self.robot.articulation.links
            bodies = [(link, _ARM_COLOURS[i % 2]) for i, link in enumerate(links)]
            bodies += [(self.cube, COLOURS["red"]), (self.distractor, COLOURS["blue"])]
            if self.target_marker is not None:
                bodies.append((self.target_marker, COLOURS["green"]))
            if self.renderer == "sapien":
                from envs.tabletop.sapien_camera import SapienCameras

                self._images = SapienCameras(self.scene, bodies, self.cameras, self.image_size)
            else:
                self._images = Rasteriser(bodies)
            self._cube_body = len(links)
        self._episode: Episode | None = None
        self._t = 0

    def _cube(self, name: str, material) -> sapien.Entity:
        b = self.scene.create_actor_builder()
        b.add_box_collision(half_size=[CUBE_HALF] * 3, material=material, density=400)
        b.set_initial_pose(sapien.Pose([0.3, 0.3, CUBE_HALF]))
        actor = b.build(name=name)
        return actor.find_component_by_type(sapien.physx.PhysxRigidDynamicComponent)

    def _marker(self):
        # A kinematic trigger sphere: drawn like any body, but nothing collides with it.
        b = self.scene.create_actor_builder()
        b.add_sphere_collision(radius=0.018, is_trigger=True)
        b.set_physx_body_type("kinematic")
        actor = b.build(name="target")
        return actor.find_component_by_type(sapien.physx.PhysxRigidDynamicComponent)

    # -- protocol ----------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        rng = np.random.default_rng(seed)
        ep = self._episode = sample_episode(self.task, rng)
        self.instruction = ep.instruction
        self.scene.physx_system.unpack(self._init_state)
        half_yaw = ep.object_yaw / 2
        self.cube.entity.set_pose(
            sapien.Pose([*ep.object_xy, CUBE_HALF], [np.cos(half_yaw), 0, 0, np.sin(half_yaw)])
        )
        self.distractor.entity.set_pose(sapien.Pose([*ep.distractor_xy, CUBE_HALF]))
        if self.target_marker is not None:
            self.target_marker.kinematic_target = sapien.Pose(ep.target)
            self.target_marker.entity.set_pose(sapien.Pose(ep.target))
        q = self.robot.home_qpos.copy()
        arm_idx = np.flatnonzero(self.robot.arm_mask)
        q[arm_idx] += ep.joint_noise[: len(arm_idx)]
        art = self.robot.articulation
        art.set_qpos(q)
        art.set_qvel(np.zeros_like(q))
        for j, joint in enumerate(self.robot.joints):
            joint.set_drive_target(q[j])
        self._q_cmd = q
        self.robot.ik.compute_forward_kinematics(q)
        hand = self.robot.ik.get_link_pose(self.robot.hand_index)
        tcp = self.robot.articulation.root_pose * hand * sapien.Pose([0, 0, self.robot.tcp_offset])
        self._cmd_pos = np.asarray(tcp.p, np.float64)
        self._cmd_quat = np.asarray(tcp.q, np.float64)
        self._t = 0
        self._lifted = False
        self._success = False
        if self._images is not None:
            self._images.set_colour(self._cube_body, COLOURS[ep.colours["object"]])
            self._images.set_colour(self._cube_body + 1, COLOURS[ep.colours["distractor"]])
            if self.target_marker is not None:
                self._images.set_colour(self._cube_body + 2, COLOURS[ep.colours["target"]])
        return self._observe(), {"seed": seed, **self._info()}

    def close(self) -> None:
        self.scene = None
        self.robot = None

    # -- one control step --------------------------------------------------------------------
    def _apply(self, a: np.ndarray) -> tuple[float, bool, bool]:
        if self._episode is None:
            raise RuntimeError(f"{self.spec.name}: call reset() before step()")
        lo, hi = WORKSPACE
        tcp = np.asarray(self._tcp().p)
        cmd = np.clip(self._cmd_pos + a[:3] * POS_SCALE, tcp - MAX_LEAD, tcp + MAX_LEAD)
        self._cmd_pos = np.clip(cmd, lo, hi)
        dq = _axis_angle_quat(a[3:6].astype(np.float64) * ROT_SCALE)
        self._cmd_quat = _quat_mul(dq, self._cmd_quat)
        self._cmd_quat /= np.linalg.norm(self._cmd_quat)
        hand_target = (
            self._base_inv
            * sapien.Pose(self._cmd_pos, self._cmd_quat)
            * sapien.Pose([0, 0, -self.robot.tcp_offset])
        )
        q, _, _ = self.robot.ik.compute_inverse_kinematics(
            self.robot.hand_index,
            hand_target,
            initial_qpos=self._q_cmd,
            active_qmask=self.robot.arm_mask.astype(np.int32),
            eps=1e-5,
            max_iterations=40,
        )
        q = np.clip(np.asarray(q), self._q_limits[:, 0], self._q_limits[:, 1])
        # Gripper: -1 open ... +1 closed, every finger joint alike.
        q[~self.robot.arm_mask] = self.robot.finger_travel * (1.0 - float(a[6])) / 2.0
        self._q_cmd = q
        for j, joint in enumerate(self.robot.joints):
            joint.set_drive_target(q[j])
        art = self.robot.articulation
        for _ in range(self.substeps):
            art.set_qf(art.compute_passive_force(True, True))
            self.scene.step()
        self._t += 1
        return self._evaluate()

    def _evaluate(self) -> tuple[float, bool, bool]:
        ep = self._episode
        tcp = self._tcp().p
        obj = np.asarray(self.cube.entity_pose.p)
        if obj[2] > 2 * CUBE_HALF + 0.01:
            self._lifted = True
        if self.task.name == "reach":
            dist = float(np.linalg.norm(tcp - ep.target))
            success = dist < SUCCESS_RADIUS * 0.85
        else:
            dist = float(np.linalg.norm(obj[:2] - ep.target[:2]))
            resting = obj[2] < CUBE_HALF + 0.006
            success = dist < SUCCESS_RADIUS and resting
            if self.task.name == "push":
                success = success and not self._lifted
            else:  # pick-place: the cube must have been carried and released
                opening = self._opening(self.robot.articulation.qpos)
                success = success and self._lifted and opening > 2 * CUBE_HALF + 0.01
        self._success = bool(success)
        if self.reward_type == "sparse":
            reward = 1.0 if success else 0.0
        else:
            reward = -dist + (10.0 if success else 0.0)
        truncated = self._t >= self.spec.max_steps and not success
        return reward, bool(success), bool(truncated)

    # -- observation -------------------------------------------------------------------------
    def _tcp(self) -> sapien.Pose:
        return self.robot.hand.entity_pose * sapien.Pose([0, 0, self.robot.tcp_offset])

    def _opening(self, qpos: np.ndarray) -> float:
        """Distance between the pads: each finger joint opens by its own travel."""
        return float(np.sum(qpos[~self.robot.arm_mask]))

    def _info(self) -> dict[str, Any]:
        return {"success": self._success, "elapsed_steps": self._t}

    def _observe(self) -> dict[str, np.ndarray]:
        art = self.robot.articulation
        qpos = art.qpos
        tcp = self._tcp()
        cube = self.cube.entity_pose
        parts = [[self._opening(qpos)], tcp.p, tcp.q, cube.p, cube.q, self._episode.target, qpos]
        state = np.concatenate(parts).astype(np.float32)
        obs = {"state": state}
        if self.state_mode == "proprio":
            obs = {"state": state[self._proprio], "privileged": state}
        if self.cameras:
            poses = {cam: self._camera_pose(cam) for cam in self.cameras}
            if self.renderer == "sapien":
                images = self._images.render(poses)
            else:
                world, markers = self._images.world_vertices(), self._markers()
                images = {
                    cam: self._images.render(Camera(self.image_size, fov), eye, rot, world, markers)
                    for cam, (eye, rot, fov) in poses.items()
                }
            for cam in self.cameras:
                obs[f"image/{cam}"] = images[cam]
        return obs

    def _markers(self) -> list:
        ep = self._episode
        colour = COLOURS[ep.colours["target"]]
        t = ep.target
        if self.task.target_in_air:  # drawn as the depth-sorted target sphere instead
            return []
        r = SUCCESS_RADIUS
        square = np.array([[-r, -r, 0], [r, -r, 0], [r, r, 0], [-r, r, 0]]) + [t[0], t[1], 1e-4]
        return [(square, colour)]

    def _camera_pose(self, cam: str) -> tuple[np.ndarray, np.ndarray, float]:
        if cam == "wrist":
            m = self.robot.hand.entity_pose.to_transformation_matrix()
            eye_local = np.array([0.075, 0.0, 0.0])
            _, rot_local = look_at(eye_local, eye_local + [-0.45, 0.0, 1.0], up=(-1.0, 0.0, 0.0))
            return m[:3, :3] @ eye_local + m[:3, 3], m[:3, :3] @ rot_local, _WRIST_FOV
        eye, target, fov = _FIXED_CAMERAS[cam]
        eye, rot = look_at(eye, target)
        return eye, rot, fov
