"""What differs between the tabletop tasks: placement, success, horizon and wording."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name -> RGB. Objects, targets and distractors draw distinct colours from this palette.
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "cyan": (40, 190, 200),
    "white": (235, 235, 235),
}
OBJECT_NOUNS = ("cube", "block", "box")

CUBE_HALF = 0.02
SUCCESS_RADIUS = 0.035
TABLE_XY = ((-0.12, 0.14), (-0.18, 0.18))  # where objects and targets are placed


@dataclass(frozen=True)
class Task:
    name: str
    max_steps: int
    templates: tuple[str, ...]
    target_in_air: bool = False
    uses_object: bool = True


TASKS = {
    "reach": Task(
        "reach",
        max_steps=60,
        templates=(
            "reach the {target} target",
            "move the gripper to the {target} marker",
            "touch the {target} point with the gripper",
            "go to the {target} target",
        ),
        target_in_air=True,
        uses_object=False,
    ),
    "pick-place": Task(
        "pick-place",
        max_steps=160,
        templates=(
            "pick up the {object} {noun} and place it on the {target} target",
            "put the {object} {noun} on the {target} marker",
            "move the {object} {noun} onto the {target} square",
            "grasp the {object} {noun} and set it down on the {target} target",
        ),
    ),
    "push": Task(
        "push",
        max_steps=150,
        templates=(
            "push the {object} {noun} to the {target} target",
            "slide the {object} {noun} onto the {target} marker without lifting it",
            "nudge the {object} {noun} over to the {target} square",
            "shove the {object} {noun} until it rests on the {target} target",
        ),
    ),
}


@dataclass
class Episode:
    """One episode's randomised layout and wording, drawn from the reset seed."""

    object_xy: np.ndarray
    object_yaw: float
    target: np.ndarray
    distractor_xy: np.ndarray
    colours: dict[str, str]  # role -> colour name
    instruction: str
    joint_noise: np.ndarray


def _far_from(rng: np.random.Generator, others: list[np.ndarray], min_dist: float) -> np.ndarray:
    (x0, x1), (y0, y1) = TABLE_XY
    for _ in range(1000):
        p = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
        if all(np.linalg.norm(p - o) >= min_dist for o in others):
            return p
    raise RuntimeError("could not place an object: the table is too crowded")


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0, 1)
    return float(np.linalg.norm(p - (a + t * ab)))


def sample_episode(task: Task, rng: np.random.Generator) -> Episode:
    obj = _far_from(rng, [], 0)
    if task.target_in_air:
        (x0, x1), (y0, y1) = TABLE_XY
        target = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(0.06, 0.28)])
    else:
        target = np.append(_far_from(rng, [obj], 0.12), 0.0)
    # The distractor stays clear of the object, the target and the path between them.
    for _ in range(1000):
        distractor = _far_from(rng, [obj, target[:2]], 0.10)
        if _segment_distance(distractor, obj, target[:2]) > 0.08:
            break
    names = rng.permutation(list(COLOURS))
    colours = {"object": str(names[0]), "target": str(names[1]), "distractor": str(names[2])}
    template = task.templates[rng.integers(len(task.templates))]
    instruction = template.format(
        object=colours["object"],
        target=colours["target"],
        noun=OBJECT_NOUNS[rng.integers(len(OBJECT_NOUNS))],
    )
    return Episode(
        object_xy=obj,
        object_yaw=float(rng.uniform(-np.pi / 6, np.pi / 6)),
        target=target,
        distractor_xy=distractor,
        colours=colours,
        instruction=instruction,
        joint_noise=rng.normal(0.0, 0.02, size=7),
    )
