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
    """The built articulation plus the handles the env needs every control step."""

    articulation: sapien.physx.PhysxArticulation
    hand: sapien.physx.PhysxArticulationLinkComponent
    joints: list
    ik: object  # sapien PinocchioModel
    hand_index: int

    @property
    def dof(self) -> int:
        return len(self.joints)


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
    joints = art.active_joints
    for j, joint in enumerate(joints):
        drive = ARM_DRIVE if j < 7 else FINGER_DRIVE
        joint.set_drive_properties(drive["stiffness"], drive["damping"], drive["force_limit"])
    art.set_qpos(HOME_QPOS)
    for j, joint in enumerate(joints):
        joint.set_drive_target(HOME_QPOS[j])
    hand_link = next(link for link in art.links if link.name == "hand")
    return Robot(
        articulation=art,
        hand=hand_link,
        joints=joints,
        ik=art.create_pinocchio_model(),
        hand_index=hand_link.index,
    )
