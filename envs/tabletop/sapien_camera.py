"""SAPIEN (Vulkan) cameras for machines with a render device.

Render shapes are made from the same collision shapes the CPU rasteriser draws, so both
renderers show the same scene. Cameras are posed each frame from the env's camera poses.
"""

from __future__ import annotations

import numpy as np
import sapien


def _render_shape(shape, material):
    r = sapien.render
    px = sapien.physx
    if isinstance(shape, px.PhysxCollisionShapeBox):
        out = r.RenderShapeBox(np.asarray(shape.half_size, np.float32), material)
    elif isinstance(shape, px.PhysxCollisionShapeCapsule):
        out = r.RenderShapeCapsule(shape.radius, shape.half_length, material)
    elif isinstance(shape, px.PhysxCollisionShapeSphere):
        out = r.RenderShapeSphere(shape.radius, material)
    elif isinstance(shape, px.PhysxCollisionShapeCylinder):
        out = r.RenderShapeCylinder(shape.radius, shape.half_length, material)
    else:
        raise TypeError(f"no render shape for {type(shape).__name__}")
    out.local_pose = shape.local_pose
    return out


class SapienCameras:
    """Attach render bodies to ``bodies`` (``[(component, rgb)]``) and render named cameras."""

    def __init__(self, scene: sapien.Scene, bodies, cameras: tuple[str, ...], size: int):
        self.scene = scene
        self.materials = []
        for component, colour in bodies:
            mat = sapien.render.RenderMaterial(base_color=[*(np.asarray(colour) / 255.0), 1.0])
            body = sapien.render.RenderBodyComponent()
            for shape in component.collision_shapes:
                body.attach(_render_shape(shape, mat))
            component.entity.add_component(body)
            self.materials.append(mat)
        table = sapien.Entity()
        table_body = sapien.render.RenderBodyComponent()
        table_mat = sapien.render.RenderMaterial(base_color=[150 / 255, 118 / 255, 86 / 255, 1])
        table_body.attach(sapien.render.RenderShapeBox([0.8, 0.6, 0.01], table_mat))
        table.add_component(table_body)
        table.set_pose(sapien.Pose([0, 0, -0.01]))
        scene.add_entity(table)
        scene.set_ambient_light([0.45, 0.45, 0.45])
        scene.add_directional_light([-0.35, -0.25, -0.9], [0.7, 0.7, 0.7])
        self.cameras = {}
        for name in cameras:
            self.cameras[name] = scene.add_camera(name, size, size, np.deg2rad(60), 0.01, 10.0)

    def set_colour(self, body: int, colour) -> None:
        self.materials[body].base_color = [*(np.asarray(colour) / 255.0), 1.0]

    def render(
        self, poses: dict[str, tuple[np.ndarray, np.ndarray, float]]
    ) -> dict[str, np.ndarray]:
        """``poses``: camera -> (eye, rotation with right/down/forward columns, fov in degrees)."""
        for name, (eye, rot, fov) in poses.items():
            cam = self.cameras[name]
            # SAPIEN cameras look along +x with +z up: columns (forward, left, up).
            m = np.eye(4)
            m[:3, :3] = np.stack([rot[:, 2], -rot[:, 0], -rot[:, 1]], 1)
            m[:3, 3] = eye
            cam.entity.set_pose(sapien.Pose(m))
            cam.set_fovy(np.deg2rad(fov), compute_x=True)
        self.scene.update_render()
        out = {}
        for name, cam in self.cameras.items():
            cam.take_picture()
            rgba = cam.get_picture("Color")
            out[name] = np.clip(rgba[..., :3] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return out
