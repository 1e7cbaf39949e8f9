"""Evaluation videos: the same held-out episodes from the warm start and from the latest
weights, side by side, with the instruction and each side's outcome written on the frames.

One frame per decision (the engine renders once per chunk), from the first camera. GIFs,
through imageio's Pillow plugin: no encoder is written here, and no ffmpeg binary is needed.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline import schema
from trainer.grpo import deterministic

Episode = tuple[np.ndarray, str, bool]  # frames [T, H, W, 3], instruction, success

_BANNER, _FOOTER = 30, 16
_GREEN, _RED, _WHITE = (60, 200, 90), (230, 70, 60), (235, 235, 235)


class EvalVideo:
    """Writes ``out/eval_<iteration>.gif`` at each evaluation: ``episodes`` greedy held-out
    episodes, the warm start's (the first evaluation's) on the left, the latest on the right.

    Example:
        >>> video = EvalVideo("runs/pick/videos", episodes=2, camera="head")
        >>> video.record(engine, 0, eval_seeds)     # the warm start: both sides the same
        >>> path = video.record(engine, 10, eval_seeds)

    Args:
        out: the directory the GIFs go to.
        episodes: how many episodes per video (the first ``episodes`` evaluation seeds).
        camera: the camera shown.
        scale: each frame is enlarged this many times (nearest), so the text is legible.
    """

    def __init__(self, out: str, episodes: int, camera: str, scale: int = 3) -> None:
        if episodes < 1:
            raise ValueError(f"video episodes={episodes} must be >= 1")
        self.out, self.episodes, self.camera, self.scale = out, episodes, camera, scale
        self.warm: list[Episode] | None = None

    def record(self, engine, iteration: int, seeds: Sequence[int]) -> str:
        """Roll out the greedy policy on the first ``episodes`` seeds and write the video;
        returns its path."""
        with deterministic(engine.policy):
            eps = engine.collect_episodes(
                self.episodes, 1, reset_seeds=list(seeds[: self.episodes])
            )
        latest = _episodes(eps, self.camera)
        if self.warm is None:
            self.warm = latest
        frames = [
            frame
            for (w, text, w_ok), (x, _, x_ok) in zip(self.warm, latest, strict=True)
            for frame in self._side_by_side(w, x, text, w_ok, x_ok, iteration)
        ]
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, f"eval_{iteration:05d}.gif")
        import imageio.v3 as iio

        iio.imwrite(path, np.stack(frames), duration=250, loop=0)
        return path

    def _side_by_side(self, warm, latest, text, warm_ok, latest_ok, iteration):
        big = lambda f: f.repeat(self.scale, 0).repeat(self.scale, 1)  # noqa: E731
        h, w = warm.shape[1] * self.scale, warm.shape[2] * self.scale
        lines = textwrap.wrap(text, width=max(20, 2 * w // 7))[:2]
        for t in range(max(len(warm), len(latest))):
            canvas = Image.new("RGB", (2 * w + 4, h + _BANNER + _FOOTER), (20, 20, 24))
            canvas.paste(Image.fromarray(big(warm[min(t, len(warm) - 1)])), (0, _BANNER))
            canvas.paste(Image.fromarray(big(latest[min(t, len(latest) - 1)])), (w + 4, _BANNER))
            draw = ImageDraw.Draw(canvas)
            for i, line in enumerate(lines):
                draw.text((4, 2 + 13 * i), line, fill=_WHITE)
            sides = (
                (0, "warm start", warm_ok, len(warm)),
                (w + 4, f"iteration {iteration}", latest_ok, len(latest)),
            )
            for x0, label, ok, n in sides:
                done = t >= n - 1
                verdict = ("success" if ok else "failure") if done else f"step {t + 1}"
                colour = (_GREEN if ok else _RED) if done else _WHITE
                draw.text((x0 + 4, h + _BANNER + 2), f"{label}: {verdict}", fill=colour)
            yield np.asarray(canvas)

    def state(self) -> dict | None:
        """The warm start's episodes, for a resume checkpoint."""
        if self.warm is None:
            return None
        return {"warm": [(torch.from_numpy(f), t, ok) for f, t, ok in self.warm]}

    def load_state(self, state: dict) -> None:
        self.warm = [(f.numpy(), t, bool(ok)) for f, t, ok in state["warm"]]


def _episodes(eps, camera: str) -> list[Episode]:
    images = eps.get(schema.image_key(camera))  # [E, T, 3, H, W]
    lengths = eps["length"].tolist()
    texts = [row[0] for row in eps.get(schema.INSTRUCTION).tolist()]
    return [
        (images[i, : lengths[i]].permute(0, 2, 3, 1).contiguous().numpy(), texts[i], bool(ok))
        for i, ok in enumerate(eps["success"].tolist())
    ]
