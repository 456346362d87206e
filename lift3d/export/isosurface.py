"""Density grid -> clean triangle mesh in world coordinates.

Steps: optional 3drec-style smoothing (trilinear upsample, box blur, grey erosion), threshold
(absolute, or relative to the mean density as 3drec does), marching cubes (PyMCubes) on a grid
padded with empty cells so the surface is always closed, small-component (floater) removal,
outward orientation, quadric decimation to a face budget.

The grid holds densities at cell centres of the box [-radius, radius]^3, indexed [ix, iy, iz]
(see lift3d/geometry/base.py), so index i maps to world x = (i + 0.5) / R * 2 radius - radius.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from lift3d.errors import UserError


def smooth_density(grid: np.ndarray, upsample: int = 2, blur_kernel: int = 7, erode: int = 0) -> np.ndarray:
    """Zero123 3drec's mesh smoothing: trilinear upsample, box blur (k^3 mean), grey erosion."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(grid), dtype=torch.float32)[None, None]
    if upsample > 1:
        # align_corners=False keeps the cell-centre convention: new centres at (j + 0.5) / (R * up).
        x = F.interpolate(x, scale_factor=upsample, mode="trilinear", align_corners=False)
    if blur_kernel > 1:
        x = F.avg_pool3d(x, blur_kernel, stride=1, padding=blur_kernel // 2, count_include_pad=False)
    out = x[0, 0].numpy()
    if erode > 1:
        from scipy.ndimage import grey_erosion

        out = grey_erosion(out, size=(erode,) * 3)
    return out


def pick_threshold(grid: np.ndarray, threshold: Optional[float], relative_threshold: float) -> float:
    """The iso-level: ``threshold`` if given, else ``relative_threshold`` x mean density (3drec: 8x)."""
    if threshold is not None:
        return float(threshold)
    return float(relative_threshold * grid.mean())


def marching_cubes(grid: np.ndarray, level: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of ``grid`` at ``level``; vertices in world coordinates, faces outward-facing.

    Raises UserError when the level leaves nothing (or everything) inside the box.
    """
    import mcubes

    if not np.isfinite(grid).all():
        raise UserError("the density field has NaN/inf values; the model diverged, retrain it with a lower learning rate")
    inside = grid > level
    if not inside.any() or not np.isfinite(level):
        raise UserError(f"the density field is empty at export threshold {level:.4g} (max density {grid.max():.4g}); "
                        "train longer or lower system.export.threshold / relative_threshold")
    if inside.all():
        raise UserError(f"the density field fills the whole box at export threshold {level:.4g} (min density "
                        f"{grid.min():.4g}); raise system.export.threshold / relative_threshold")
    # A border of empty cells closes surfaces that touch the box.
    low = min(float(grid.min()), level) - 1.0
    padded = np.pad(grid.astype(np.float64), 1, constant_values=low)
    vertices, faces = mcubes.marching_cubes(padded, float(level))
    if len(faces) == 0:
        raise UserError(f"marching cubes found no surface at threshold {level:.4g}; "
                        "lower system.export.threshold or raise system.export.resolution")
    resolution = grid.shape[0]
    vertices = (vertices - 1 + 0.5) / resolution * 2 * radius - radius   # undo the pad, then cell centres
    return vertices.astype(np.float64), faces.astype(np.int64)


def remove_floaters(vertices: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop connected components whose area is below ``min_fraction`` of the largest one."""
    import trimesh

    if min_fraction <= 0:
        return vertices, faces
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(faces))
    area = np.bincount(labels, weights=mesh.area_faces)
    keep = area[labels] >= min_fraction * area.max()
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def orient_outward(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces wound so that normals point out of the solid (positive signed volume)."""
    tri = vertices[faces]
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    return faces if signed_volume >= 0 else faces[:, ::-1].copy()


def decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (fast-simplification) down to about ``max_faces`` faces."""
    if max_faces <= 0 or len(faces) <= max_faces:
        return vertices, faces
    import fast_simplification

    v, f = fast_simplification.simplify(np.ascontiguousarray(vertices, dtype=np.float32),
                                        np.ascontiguousarray(faces, dtype=np.int64), target_count=int(max_faces))
    return np.asarray(v, dtype=np.float64), np.asarray(f, dtype=np.int64)


def extract_surface(grid: np.ndarray, radius: float, *, threshold: Optional[float] = None,
                    relative_threshold: float = 8.0, smooth: bool = False, upsample: int = 2,
                    blur_kernel: int = 7, erode: int = 0, min_component_fraction: float = 0.05,
                    max_faces: int = 50000) -> tuple[np.ndarray, np.ndarray, dict]:
    """The whole chain; returns vertices (world), faces and a dict describing what was done."""
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 3 or len(set(grid.shape)) != 1:
        raise ValueError(f"density grid must be (R, R, R), got {grid.shape}")
    if smooth:
        grid = smooth_density(grid, upsample, blur_kernel, erode)
    level = pick_threshold(grid, threshold, relative_threshold)
    vertices, faces = marching_cubes(grid, level, radius)
    n_raw = len(faces)
    vertices, faces = remove_floaters(vertices, faces, min_component_fraction)
    faces = orient_outward(vertices, faces)
    vertices, faces = decimate(vertices, faces, max_faces)
    if len(faces) < 4:
        raise UserError(f"the exported surface is degenerate ({len(faces)} faces at threshold {level:.4g}); "
                        "check the trained model or lower system.export.threshold")
    info = {"threshold": level, "grid_resolution": int(grid.shape[0]), "faces_marching_cubes": int(n_raw),
            "faces": int(len(faces)), "vertices": int(len(vertices))}
    return vertices, faces, info
