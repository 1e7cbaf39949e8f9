"""MuJoCo rendering on a CPU machine, and made cheap.

MuJoCo renders without a GPU through Mesa's software rasteriser: ``MUJOCO_GL=egl`` uses
Mesa's EGL (the machine image has its EGL and DRI libraries); ``osmesa`` needs Debian's
``libosmesa6``. :func:`default_gl` picks ``egl`` unless the user chose.

On that rasteriser shadows, reflections and multisampling are most of a frame's cost: a
128x128 frame of Gymnasium's ``Pusher-v5`` took 24 ms a step with them and 1.8 ms without
(this project's 2-core CPU machine, one env, step plus render). :func:`cheapen` turns them
off; the suite layers do it by default.
"""

from __future__ import annotations

import os
from typing import Any


def default_gl() -> None:
    """Render through Mesa's EGL unless ``MUJOCO_GL`` is set (call before importing mujoco)."""
    os.environ.setdefault("MUJOCO_GL", "egl")


def cheapen(model: Any, scene: Any = None) -> None:
    """No multisampling in ``model`` (set it before the offscreen context is made), and no
    shadows or reflections in ``scene`` (an ``mjvScene``) when given."""
    import mujoco

    model.vis.quality.offsamples = 0
    if scene is not None:
        scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def cheapen_gym(env: Any) -> bool:
    """:func:`cheapen` a Gymnasium MuJoCo env that renders ``rgb_array``; False for any other
    env (left as it is)."""
    base = getattr(env, "unwrapped", env)
    renderer = getattr(base, "mujoco_renderer", None)
    if renderer is None or getattr(base, "render_mode", None) != "rgb_array":
        return False
    cheapen(base.model)
    viewer = renderer._get_viewer("rgb_array")  # made now, so its context has no multisampling
    cheapen(base.model, viewer.scn)
    return True
