"""A CPU rasteriser of a SAPIEN scene's collision shapes (flat shading, painter's algorithm).

Used when no render device exists (SAPIEN refuses software Vulkan). Its cost is per face,
not per pixel: the shapes are read once into one vertex array, each frame transforms all
vertices in one vectorised step, culls back faces, shades them flat and fills them far to
near with ``cv2.fillConvexPoly``. About 1-2 ms a camera for the built-in arm.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import sapien

_SUBPIX = 4  # cv2 fixed-point shift: vertices are placed to 1/16 pixel
_LIGHT = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])
_NEAR = 0.01


def _box(half: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    hx, hy, hz = half
    v = np.array(
        [[sx * hx, sy * hy, sz * hz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    )
    faces = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    return v, faces


def _capsule(radius: float, half_len: float, sides: int = 8) -> tuple[np.ndarray, list[list[int]]]:
    """A capsule along x: a prism plus a pyramid cap at each end."""
    ang = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    ring = np.stack([np.zeros(sides), radius * np.cos(ang), radius * np.sin(ang)], 1)
    left, right = ring + [-half_len, 0, 0], ring + [half_len, 0, 0]
    tips = np.array([[-half_len - radius, 0, 0], [half_len + radius, 0, 0]])
    v = np.concatenate([left, right, tips])
    faces = []
    for i in range(sides):
        j = (i + 1) % sides
        faces.append([i, j, sides + j, sides + i])
        faces.append([2 * sides, j, i])
        faces.append([2 * sides + 1, sides + i, sides + j])
    return v, faces


def _sphere(radius: float) -> tuple[np.ndarray, list[list[int]]]:
    """A low-poly sphere (octahedron subdivided once)."""
    v = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
    tri = [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]]
    verts = [np.array(p, float) for p in v]
    faces = []
    cache: dict[tuple[int, int], int] = {}

    def mid(a: int, b: int) -> int:
        key = (min(a, b), max(a, b))
        if key not in cache:
            m = verts[a] + verts[b]
            verts.append(m / np.linalg.norm(m))
            cache[key] = len(verts) - 1
        return cache[key]

    for a, b, c in tri:
        ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
        faces += [[a, ab, ca], [ab, b, bc], [ca, bc, c], [ab, bc, ca]]
    return np.array(verts) * radius, faces


def shape_mesh(shape: sapien.physx.PhysxCollisionShape) -> tuple[np.ndarray, list[list[int]]]:
    """Vertices (in the shape's own frame) and polygons of one collision shape."""
    if isinstance(shape, sapien.physx.PhysxCollisionShapeBox):
        return _box(np.asarray(shape.half_size))
    if isinstance(shape, sapien.physx.PhysxCollisionShapeCapsule):
        return _capsule(shape.radius, shape.half_length)
    if isinstance(shape, sapien.physx.PhysxCollisionShapeSphere):
        return _sphere(shape.radius)
    if isinstance(shape, sapien.physx.PhysxCollisionShapeCylinder):
        v, f = _capsule(shape.radius, shape.half_length)
        return v[:-2], [face for face in f if len(face) == 4] + [
            list(range(len(v) // 2 - 1)),
            list(range(len(v) // 2 - 1, len(v) - 2)),
        ]
    if isinstance(shape, sapien.physx.PhysxCollisionShapeConvexMesh):
        return np.asarray(shape.vertices) * np.asarray(shape.scale), shape.triangles.tolist()
    raise TypeError(f"rasteriser cannot draw collision shape {type(shape).__name__}")


@dataclass(frozen=True)
class Camera:
    """A pinhole camera. ``pose`` gives (position, 3x3 rotation whose columns are the camera's
    right, down and forward axes in world coordinates)."""

    size: int
    fov_deg: float

    @property
    def focal(self) -> float:
        return 0.5 * self.size / np.tan(np.deg2rad(self.fov_deg) / 2)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    eye, target, up = (np.asarray(x, float) for x in (eye, target, up))
    fwd = target - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, up)
    if np.linalg.norm(right) < 1e-6:  # looking straight along ``up``
        right = np.cross(fwd, [1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    return eye, np.stack([right, down, fwd], 1)


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Clip a camera-space polygon against the near plane (Sutherland-Hodgman, one plane)."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[2] >= _NEAR, b[2] >= _NEAR
        if ina:
            out.append(a)
        if ina != inb:
            t = (_NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


class Rasteriser:
    """Draws a fixed set of bodies; call :meth:`render` with their current poses.

    ``bodies`` is a list of ``(components, colour)`` where each component is a SAPIEN rigid
    component whose collision shapes are drawn in that RGB colour. Colours can be changed
    between frames with :meth:`set_colour`.
    """

    def __init__(self, bodies: list[tuple[object, tuple[int, int, int]]], table_half=(0.8, 0.6)):
        verts, owner, faces, face_body = [], [], [], []
        self.components = []
        self.colours = np.zeros((len(bodies), 3), np.float64)
        for b, (component, colour) in enumerate(bodies):
            self.components.append(component)
            self.colours[b] = colour
            for shape in component.collision_shapes:
                v, polys = shape_mesh(shape)
                local = shape.local_pose.to_transformation_matrix()
                v = v @ local[:3, :3].T + local[:3, 3]
                centre = v.mean(0)
                base = sum(len(x) for x in verts)
                for poly in polys:
                    # Orient every polygon outward (the shapes are convex), then pad to 4
                    # corners so one array holds triangles and quads alike.
                    p = v[poly]
                    n = np.cross(p[1] - p[0], p[2] - p[0])
                    if np.dot(n, p.mean(0) - centre) < 0:
                        poly = poly[::-1]
                    corners = list(poly) if len(poly) <= 4 else None
                    if corners is None:  # fan-triangulate larger polygons (cylinder caps)
                        for k in range(1, len(poly) - 1):
                            faces.append(
                                [
                                    base + poly[0],
                                    base + poly[k],
                                    base + poly[k + 1],
                                    base + poly[k + 1],
                                ]
                            )
                            face_body.append(b)
                        continue
                    corners += [corners[-1]] * (4 - len(corners))
                    faces.append([base + c for c in corners])
                    face_body.append(b)
                verts.append(v)
                owner += [b] * len(v)
        self.local = np.concatenate(verts) if verts else np.zeros((0, 3))
        self.owner = np.asarray(owner, np.int64)
        self.faces = np.asarray(faces, np.int64).reshape(-1, 4)
        self.face_body = np.asarray(face_body, np.int64)
        hx, hy = table_half
        self.table = np.array([[-hx, -hy, 0.0], [hx, -hy, 0.0], [hx, hy, 0.0], [-hx, hy, 0.0]])

    def set_colour(self, body: int, colour) -> None:
        self.colours[body] = colour

    def world_vertices(self) -> np.ndarray:
        mats = np.stack([c.entity_pose.to_transformation_matrix() for c in self.components])
        R, t = mats[self.owner, :3, :3], mats[self.owner, :3, 3]
        return np.einsum("nij,nj->ni", R, self.local) + t

    def render(
        self,
        camera: Camera,
        eye: np.ndarray,
        rot: np.ndarray,
        world: np.ndarray,
        markers: list[tuple[np.ndarray, tuple[int, int, int]]] = (),
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Render one ``size x size x 3`` uint8 frame.

        ``world`` comes from :meth:`world_vertices` (shared by every camera of a frame);
        ``markers`` are flat polygons lying on the table (drawn right after it).
        """
        s = camera.size
        img = out if out is not None else np.empty((s, s, 3), np.uint8)
        img[:] = (58, 62, 70)  # the room behind the table
        f, c = camera.focal, s / 2.0
        scale = float(1 << _SUBPIX)

        def draw(poly_cam: np.ndarray, colour) -> None:
            poly_cam = _clip_near(poly_cam) if (poly_cam[:, 2] < _NEAR).any() else poly_cam
            if len(poly_cam) < 3:
                return
            uv = poly_cam[:, :2] / poly_cam[:, 2:3] * f + c
            pts = np.round(np.clip(uv, -4 * s, 5 * s) * scale).astype(np.int32)
            cv2.fillConvexPoly(img, pts, colour, lineType=cv2.LINE_8, shift=_SUBPIX)

        draw((self.table - eye) @ rot, (150, 118, 86))
        for poly, colour in markers:
            draw((poly - eye) @ rot, colour)

        cam = (world - eye) @ rot
        fv = cam[self.faces]  # [F, 4, 3]
        wv = world[self.faces]
        normal = np.cross(wv[:, 1] - wv[:, 0], wv[:, 2] - wv[:, 0])
        norm = np.linalg.norm(normal, axis=1)
        # Visible: facing the camera, non-degenerate, and entirely in front of the near plane.
        visible = (np.einsum("fi,fi->f", normal, wv[:, 0] - eye) < 0) & (norm > 1e-12)
        visible &= (fv[:, :, 2] > _NEAR).all(1)
        idx = np.nonzero(visible)[0]
        if len(idx):
            shade = 0.45 + 0.55 * np.clip(normal[idx] @ _LIGHT / norm[idx], 0, 1)
            colours = np.clip(self.colours[self.face_body[idx]] * shade[:, None], 0, 255)
            depth = fv[idx, :, 2].mean(1)
            order = np.argsort(-depth, kind="stable")
            uv = fv[idx][:, :, :2] / fv[idx][:, :, 2:3] * f + c
            pts = np.round(np.clip(uv, -4 * s, 5 * s) * scale).astype(np.int32)
            for k in order:
                cv2.fillConvexPoly(img, pts[k], colours[k].tolist(), cv2.LINE_8, _SUBPIX)
        return img
