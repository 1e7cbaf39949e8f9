"""A 7-DoF arm with a parallel gripper, built in code from primitive collision shapes.

No asset download and no render device are needed: every link is a capsule or a box, which
is also what the CPU rasteriser draws. The kinematic layout follows a Panda-like
anthropomorphic arm (shoulder yaw/pitch, upper-arm roll, elbow pitch, forearm roll, wrist
pitch, flange roll) with two prismatic fingers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sapien

# Joint frames act along their x-axis; these rotations point x along z (roll joints) or y
# (pitch joints). Quaternions are (w, x, y, z).
_S = float(np.sqrt(0.5))
X_TO_Z = [_S, 0.0, -_S, 0.0]
X_TO_Y = [_S, 0.0, 0.0, _S]
X_TO_NEG_Y = [_S, 0.0, 0.0, -_S]

# (joint axis, link length along z, capsule radius) for the seven arm links.
ARM_LINKS = (
    ("z", 0.233, 0.055),  # shoulder yaw; base column
    ("y", 0.000, 0.055),  # shoulder pitch
    ("z", 0.360, 0.045),  # upper arm roll
    ("y", 0.000, 0.045),  # elbow pitch
    ("z", 0.400, 0.040),  # forearm roll
    ("y", 0.000, 0.040),  # wrist pitch
    ("z", 0.060, 0.035),  # flange roll
)
BASE_HEIGHT = 0.10
PALM_HALF = (0.025, 0.045, 0.012)  # box half-sizes of the palm (x, y, z in hand frame)
FINGER_HALF = (0.010, 0.006, 0.025)  # (width, thickness, half-length)
FINGER_TRAVEL = 0.04  # per finger; the full opening is 2x this
TCP_OFFSET = 2 * PALM_HALF[2] + FINGER_HALF[2] + 0.005  # hand frame -> point between pads

ARM_DRIVE = dict(stiffness=4000.0, damping=300.0, force_limit=400.0)
FINGER_DRIVE = dict(stiffness=1500.0, damping=80.0, force_limit=60.0)
# A configuration with the gripper pointing down above the table (found once with IK).
HOME_QPOS = np.array([0.0, 0.493, 0.0, 1.874, 0.0, 0.774, 0.0, FINGER_TRAVEL, FINGER_TRAVEL])


@dataclass
class Robot:
    """An arm with a parallel gripper, plus what the controller needs every control step.

    ``arm_mask`` marks the arm joints (IK moves them); the other active joints are fingers,
    whose opening is the sum of their positions.
    """

    articulation: sapien.physx.PhysxArticulation
    hand: sapien.physx.PhysxArticulationLinkComponent
    ik: object  # sapien PinocchioModel
    home_qpos: np.ndarray
    arm_mask: np.ndarray
    finger_travel: float
    tcp_offset: float

    @property
    def joints(self) -> list:
        return self.articulation.active_joints

    @property
    def dof(self) -> int:
        return len(self.joints)

    @property
    def hand_index(self) -> int:
        return self.hand.index


def _finish(art, hand_name: str, home_qpos, tcp_offset: float) -> Robot:
    """Drives, home pose and IK model: shared by the built-in arm and URDF arms."""
    joints = art.active_joints
    arm_mask = np.array(
        [j.type in ("revolute", "revolute_unwrapped", "continuous") for j in joints]
    )
    if arm_mask.sum() < 6 or (~arm_mask).sum() < 1:
        raise ValueError(
            f"the robot needs >= 6 revolute arm joints and >= 1 prismatic finger joint, got "
            f"{[j.type for j in joints]}"
        )
    home = np.asarray(home_qpos, np.float64)
    if home.shape != (len(joints),):
        raise ValueError(f"home_qpos has {home.size} values, the robot has {len(joints)} joints")
    for joint, is_arm in zip(joints, arm_mask, strict=True):
        drive = ARM_DRIVE if is_arm else FINGER_DRIVE
        joint.set_drive_properties(drive["stiffness"], drive["damping"], drive["force_limit"])
    art.set_qpos(home)
    for joint, q in zip(joints, home, strict=True):
        joint.set_drive_target(q)
    try:
        hand = next(link for link in art.links if link.name == hand_name)
    except StopIteration:
        names = [link.name for link in art.links]
        raise ValueError(f"no link named {hand_name!r} in the robot; links: {names}") from None
    finger_limits = np.asarray(art.get_qlimits())[~arm_mask]
    return Robot(
        articulation=art,
        hand=hand,
        ik=art.create_pinocchio_model(),
        home_qpos=home,
        arm_mask=arm_mask,
        finger_travel=float(finger_limits[:, 1].min()),
        tcp_offset=tcp_offset,
    )


def load_urdf_robot(
    scene: sapien.Scene,
    path: str,
    base_pose: sapien.Pose,
    hand_link: str = "hand",
    home_qpos=None,
    tcp_offset: float = TCP_OFFSET,
) -> Robot:
    """Load any URDF arm (revolute arm joints + prismatic fingers) without its visuals.

    The rasteriser draws collision shapes, so visuals are dropped: they would need a render
    device. ``home_qpos`` defaults to the built-in arm's when the joint count matches.
    """
    loader = scene.create_urdf_loader()
    loader.fix_root_link = True
    builder = loader.load_file_as_articulation_builder(path)
    for lb in builder.link_builders:
        lb.visual_records = []
        lb.collision_groups = [1, 1, 1, 0]
    builder.set_initial_pose(base_pose)
    art = builder.build(fix_root_link=True)
    if home_qpos is None:
        if art.dof != len(HOME_QPOS):
            raise ValueError(f"robot_urdf has {art.dof} joints: pass home_qpos= for it")
        home_qpos = HOME_QPOS
    return _finish(art, hand_link, home_qpos, tcp_offset)


def _link_collision(builder, length: float, radius: float, material) -> None:
    if length > 0:
        builder.add_capsule_collision(
            sapien.Pose([0, 0, length / 2], X_TO_Z), radius, length / 2, material, density=300
        )
    else:
        builder.add_sphere_collision(sapien.Pose(), radius, material, density=300)


def build_robot(scene: sapien.Scene, base_pose: sapien.Pose, finger_material) -> Robot:
    """Build the arm into ``scene`` with its base fixed at ``base_pose``."""
    ab = scene.create_articulation_builder()
    link_mat = sapien.physx.PhysxMaterial(0.5, 0.5, 0.0)

    base = ab.create_link_builder()
    base.set_name("base")
    base.add_capsule_collision(
        sapien.Pose([0, 0, BASE_HEIGHT / 2], X_TO_Z), 0.07, BASE_HEIGHT / 2, link_mat
    )

    parent, parent_len = base, BASE_HEIGHT
    for i, (axis, length, radius) in enumerate(ARM_LINKS):
        link = ab.create_link_builder(parent)
        link.set_name(f"link{i + 1}")
        q = X_TO_Z if axis == "z" else X_TO_Y
        link.set_joint_name(f"joint{i + 1}")
        link.set_joint_properties(
            "revolute",
            limits=[[-2.9, 2.9]] if axis == "z" else [[-3.0, 3.0]],
            pose_in_parent=sapien.Pose([0, 0, parent_len], q),
            pose_in_child=sapien.Pose([0, 0, 0], q),
            damping=0.0,
        )
        _link_collision(link, length, radius, link_mat)
        parent, parent_len = link, length

    hand = ab.create_link_builder(parent)
    hand.set_name("hand")
    hand.set_joint_name("hand_fixed")
    hand.set_joint_properties("fixed", [], sapien.Pose([0, 0, parent_len]), sapien.Pose())
    hand.add_box_collision(sapien.Pose([0, 0, PALM_HALF[2]]), PALM_HALF, link_mat, density=300)

    for side, q in (("left", X_TO_Y), ("right", X_TO_NEG_Y)):
        finger = ab.create_link_builder(hand)
        finger.set_name(f"finger_{side}")
        finger.set_joint_name(f"finger_{side}_joint")
        finger.set_joint_properties(
            "prismatic",
            limits=[[0.0, FINGER_TRAVEL]],
            pose_in_parent=sapien.Pose([0, 0, 2 * PALM_HALF[2]], q),
            pose_in_child=sapien.Pose([0, 0, 0], q),
            damping=0.0,
        )
        # The pad's inner face sits on the joint origin, so the opening is q_left + q_right.
        sign = 1.0 if side == "left" else -1.0
        finger.add_box_collision(
            sapien.Pose([0, sign * FINGER_HALF[1], FINGER_HALF[2]]),
            FINGER_HALF,
            finger_material,
            density=300,
        )

    # The arm never collides with itself: PhysX skips pairs that share a bit of word 2.
    for lb in ab.link_builders:
        lb.collision_groups = [1, 1, 1, 0]

    ab.set_initial_pose(base_pose)
    art = ab.build(fix_root_link=True)
    art.name = "arm"
    return _finish(art, "hand", HOME_QPOS, TCP_OFFSET)


def export_urdf(path: str) -> str:
    """Write the built-in arm as a URDF with collision geometry (and return the path).

    Lets ``robot_urdf=`` be exercised without any asset download, and documents the arm.
    """
    import xml.etree.ElementTree as ET

    def origin(parent, xyz=(0, 0, 0), rpy=(0, 0, 0)):
        ET.SubElement(parent, "origin", xyz=" ".join(map(str, xyz)), rpy=" ".join(map(str, rpy)))

    def collision(link, geom: str, xyz, rpy=(0, 0, 0), **attrs):
        c = ET.SubElement(link, "collision")
        origin(c, xyz, rpy)
        ET.SubElement(ET.SubElement(c, "geometry"), geom, **{k: str(v) for k, v in attrs.items()})

    robot = ET.Element("robot", name="builtin_arm")
    base = ET.SubElement(robot, "link", name="base")
    # URDF cylinders/capsules run along z, which is where the built-in links point.
    collision(base, "cylinder", (0, 0, BASE_HEIGHT / 2), radius=0.07, length=BASE_HEIGHT)
    parent, parent_len = "base", BASE_HEIGHT
    axes = {"z": "0 0 1", "y": "0 1 0"}
    for i, (axis, length, radius) in enumerate(ARM_LINKS):
        name = f"link{i + 1}"
        link = ET.SubElement(robot, "link", name=name)
        inertial = ET.SubElement(link, "inertial")
        origin(inertial, (0, 0, length / 2))
        ET.SubElement(
            inertial, "mass", value=str(max(0.2, 300 * np.pi * radius**2 * (length + radius)))
        )
        ET.SubElement(
            inertial, "inertia", ixx="0.01", iyy="0.01", izz="0.005", ixy="0", ixz="0", iyz="0"
        )
        if length > 0:
            collision(link, "capsule", (0, 0, length / 2), radius=radius, length=length)
        else:
            collision(link, "sphere", (0, 0, 0), radius=radius)
        joint = ET.SubElement(robot, "joint", name=f"joint{i + 1}", type="revolute")
        ET.SubElement(joint, "parent", link=parent)
        ET.SubElement(joint, "child", link=name)
        origin(joint, (0, 0, parent_len))
        ET.SubElement(joint, "axis", xyz=axes[axis])
        lim = 2.9 if axis == "z" else 3.0
        ET.SubElement(joint, "limit", lower=str(-lim), upper=str(lim), effort="400", velocity="3")
        parent, parent_len = name, length
    hand = ET.SubElement(robot, "link", name="hand")
    collision(hand, "box", (0, 0, PALM_HALF[2]), size=" ".join(str(2 * h) for h in PALM_HALF))
    fixed = ET.SubElement(robot, "joint", name="hand_fixed", type="fixed")
    ET.SubElement(fixed, "parent", link=parent)
    ET.SubElement(fixed, "child", link="hand")
    origin(fixed, (0, 0, parent_len))
    for side, sign in (("left", 1), ("right", -1)):
        name = f"finger_{side}"
        link = ET.SubElement(robot, "link", name=name)
        size = " ".join(str(2 * h) for h in FINGER_HALF)
        collision(link, "box", (0, sign * FINGER_HALF[1], FINGER_HALF[2]), size=size)
        joint = ET.SubElement(robot, "joint", name=f"{name}_joint", type="prismatic")
        ET.SubElement(joint, "parent", link="hand")
        ET.SubElement(joint, "child", link=name)
        origin(joint, (0, 0, 2 * PALM_HALF[2]))
        ET.SubElement(joint, "axis", xyz=f"0 {sign} 0")
        ET.SubElement(
            joint, "limit", lower="0", upper=str(FINGER_TRAVEL), effort="60", velocity="1"
        )
    ET.ElementTree(robot).write(path)
    return path
