"""Texture baking from images: each texel takes the colour the views show at its surface point.

A texel's surface point is projected into every view; where the view sees it (the mesh's own
first hit along the view's ray is that point) its pixel colour counts, weighted by

    view weight x pixel coverage (alpha) x max(0, cos(normal, direction to the camera)) ** sharpness

so views that see the surface head-on win over grazing ones, and pixels of the image's background
count nothing. The input photo is one of the views, with a large weight: where the user's camera
sees the surface, the texture is the photo. Texels that no view sees take the colour of the nearest
texel that some view saw (in 3D, not in the atlas: atlas neighbours can be far apart on the surface).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from lift3d.cameras import Cameras


@dataclass
class BakeView:
    """One image to bake from: a single camera, its (H, W, 3) colour and (H, W) coverage in [0, 1]."""

    camera: Cameras
    rgb: np.ndarray
    alpha: np.ndarray
    weight: float = 1.0
    min_cos: float = 0.1          # ignore surface seen at more than ~84 degrees from its normal


def project(camera: Cameras, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (N, 2) as (col, row), 0 at the image's top-left corner (pixel
    (i, j) spans [j, j+1] x [i, i+1], as Cameras.rays casts through its centre), and the depth
    along the camera's viewing axis (N,)."""
    c2w = camera.c2w[0].double().cpu().numpy()
    q = (points - c2w[:3, 3]) @ c2w[:3, :3]          # camera frame (OpenGL: looking down -z)
    depth = -q[:, 2]
    f = float(camera.focal[0])
    safe = np.where(depth > 1e-9, depth, 1e-9)
    sx, sy = camera.pixel_shift
    col = camera.width / 2 + f * q[:, 0] / safe - sx
    row = camera.height / 2 - f * q[:, 1] / safe - sy
    return np.stack([col, row], -1), depth


def sample_image(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, C) of an (H, W, C) image at continuous (col, row) coordinates, clamped at the border."""
    h, w = image.shape[:2]
    x = np.clip(pixels[:, 0] - 0.5, 0, w - 1)
    y = np.clip(pixels[:, 1] - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def visible(raycaster, origin: np.ndarray, points: np.ndarray, tolerance: float) -> np.ndarray:
    """Whether the first hit of the ray from ``origin`` towards each point is the point itself
    (``raycaster``: a MeshRaycaster of the mesh; a miss counts as seen)."""
    direction = points - origin
    distance = np.linalg.norm(direction, axis=1)
    hit = raycaster.cast(np.broadcast_to(origin, points.shape), direction / np.maximum(distance, 1e-12)[:, None])
    first = np.where(hit["face_id"] >= 0, hit["t"], np.inf)
    return first >= distance - tolerance


def bake_from_views(mesh, points: np.ndarray, normals: np.ndarray, views: Sequence[BakeView], *,
                    sharpness: float = 2.0, tolerance: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Colours (N, 3) in [0, 1] for surface ``points`` with outward ``normals`` on ``mesh`` (a trimesh),
    and which of them some view saw (N,) bool. ``tolerance``: how far in front of a point the mesh's
    first hit may be and still count as the point (default: 0.5 % of the mesh's bounding-box diagonal)."""
    from lift3d.mesh.raycast import MeshRaycaster

    raycaster = MeshRaycaster(mesh)
    if tolerance is None:
        tolerance = 5e-3 * float(np.linalg.norm(np.ptp(np.asarray(mesh.vertices), axis=0)))
    total = np.zeros((len(points), 3))
    weight_sum = np.zeros(len(points))
    for view in views:
        origin = view.camera.position[0].double().cpu().numpy()
        to_camera = origin - points
        to_camera /= np.maximum(np.linalg.norm(to_camera, axis=1, keepdims=True), 1e-12)
        cos = np.einsum("ij,ij->i", normals, to_camera)
        pixels, depth = project(view.camera, points)
        h, w = view.rgb.shape[:2]
        candidate = (cos > view.min_cos) & (depth > 0) & (pixels[:, 0] >= 0) & (pixels[:, 0] <= w) \
            & (pixels[:, 1] >= 0) & (pixels[:, 1] <= h)
        idx = np.flatnonzero(candidate)
        if not len(idx):
            continue
        idx = idx[visible(raycaster, origin, points[idx], tolerance)]
        alpha = sample_image(view.alpha[..., None].astype(np.float64), pixels[idx])[:, 0]
        w_view = view.weight * np.clip(alpha, 0, 1) * cos[idx] ** sharpness
        total[idx] += w_view[:, None] * sample_image(view.rgb.astype(np.float64), pixels[idx])
        weight_sum[idx] += w_view
    seen = weight_sum > 1e-6
    colours = np.full((len(points), 3), 0.5)
    colours[seen] = total[seen] / weight_sum[seen, None]
    if seen.any() and not seen.all():
        from scipy.spatial import cKDTree

        _, nearest = cKDTree(points[seen]).query(points[~seen], k=1, workers=-1)
        colours[~seen] = colours[seen][nearest]
    return np.clip(colours, 0, 1), seen


def bake_cameras(reference: Cameras, distance: float, fovy_deg: float, size: int) -> Cameras:
    """The views rendered for baking: a ring of 8 at the input's elevation (starting at its
    azimuth), 4 from above (55 degrees) and 4 from below (-20 degrees), offset by half a step."""
    from lift3d.cameras import orbit_views

    elevation, azimuth = float(reference.elevation_deg[0]), float(reference.azimuth_deg[0])
    rings = [orbit_views(8, elevation, distance, fovy_deg, size, size, azimuth_start_deg=azimuth),
             orbit_views(4, 55.0, distance, fovy_deg, size, size, azimuth_start_deg=azimuth + 45.0),
             orbit_views(4, -20.0, distance, fovy_deg, size, size, azimuth_start_deg=azimuth + 45.0)]
    return Cameras.cat(rings)


def views_from_renders(cameras: Cameras, rgb: torch.Tensor, opacity: torch.Tensor, weight: float = 1.0) -> list:
    """BakeViews from renders on white: rgb (B, H, W, 3), opacity (B, H, W, 1). The white is taken
    out again (rgb = c a + (1 - a)), so a half-covered pixel gives its surface's colour, not a paler one.
    The cameras take the images' size (a latent field's decoded RGB is larger than its render)."""
    cameras = cameras.with_size(rgb.shape[1], rgb.shape[2])
    rgb, a = rgb.detach().float().cpu().numpy(), opacity.detach().float().cpu().numpy().clip(0, 1)
    straight = np.where(a > 0.2, (rgb - (1 - a)) / np.maximum(a, 0.2), rgb).clip(0, 1)
    return [BakeView(cameras[i].to("cpu"), straight[i], a[i, ..., 0], weight) for i in range(len(cameras))]
