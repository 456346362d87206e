"""Density grid -> clean triangle mesh in world coordinates.

Steps: a Gaussian blur of the grid (``blur_sigma`` cells; a distilled field is noisy at the scale
of a cell, and marching cubes turns that noise into hundreds of pieces, holes and texture confetti),
optional 3drec-style smoothing (trilinear upsample, box blur, grey erosion), the level
(absolute, relative to the mean density as 3drec does, or chosen from the field: level.py),
marching cubes (PyMCubes) on a grid padded with empty cells so the surface is always closed,
small-component (floater) removal, outward orientation, quadric decimation to a face budget and
repair of the non-manifold edges decimation can leave (``manifold_stats`` counts them).

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


def pick_threshold(grid: np.ndarray, threshold: Optional[float], relative_threshold: Optional[float]) -> float:
    """The iso-level: ``threshold`` if given, else ``relative_threshold`` x mean density (3drec: 8x),
    else the level of :func:`lift3d.export.level.choose_level` seen from the evaluation ring."""
    if threshold is not None:
        return float(threshold)
    if relative_threshold is not None:
        return float(relative_threshold * grid.mean())
    return ring_level(grid)


def ring_level(grid: np.ndarray, radius: float = 1.0, details: Optional[dict] = None) -> float:
    """The automatic level without a reference view: the field's own opacity-1/2 surface seen
    from 8 views around it (elevation 30 deg, the usual input elevation, and -10 deg)."""
    from lift3d.export.level import choose_level

    if not float(np.max(grid)) > 0:
        raise UserError(f"the density field is empty (max density {float(np.max(grid)):.4g}); "
                        "the model has not learned anything: train longer")
    return choose_level(grid, radius, ring_views(radius), None, details=details)


def ring_views(radius: float):
    """8 cameras around the box: 4 at elevation 30 deg, 4 at -10 deg between them, 64 x 64."""
    from lift3d.cameras import Cameras, orbit_views

    distance = 2.5 * radius
    return Cameras.cat([orbit_views(4, 30.0, distance, 49.13, 64, 64),
                        orbit_views(4, -10.0, distance, 49.13, 64, 64, azimuth_start_deg=45.0)])


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


def manifold_stats(vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Topology counts of an indexed mesh (vertices are not merged by position: coincident
    vertices of touching sheets stay apart, as :func:`make_manifold` leaves them)."""
    import trimesh

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    _, counts = np.unique(mesh.edges_sorted, axis=0, return_counts=True)
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    return {"non_manifold_edges": int((counts > 2).sum()), "boundary_edges": int((counts == 1).sum()),
            "components": int(labels.max() + 1) if len(labels) else 0, "watertight": bool(mesh.is_watertight)}


def extract_surface(grid: np.ndarray, radius: float, *, threshold: Optional[float] = None,
                    relative_threshold: Optional[float] = None, smooth: bool = False, upsample: int = 2,
                    blur_kernel: int = 7, erode: int = 0, min_component_fraction: float = 0.05,
                    max_faces: int = 50000, blur_sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """The whole chain; returns vertices (world), faces and a dict describing what was done.

    The level is ``threshold``, else ``relative_threshold`` x mean, else :func:`ring_level`.
    """
    grid = prepare_grid(grid, smooth, upsample, blur_kernel, erode, blur_sigma)
    if threshold is None and relative_threshold is None:
        details: dict = {}
        level, how = ring_level(grid, radius, details), {"level_method": "auto (field opacity, 8 views)",
                                                         "level_details": details}
    else:
        level = pick_threshold(grid, threshold, relative_threshold)
        how = {"level_method": "absolute threshold" if threshold is not None else
               f"relative threshold ({relative_threshold:g} x mean density)"}
    vertices, faces, info = surface_at_level(grid, radius, level, min_component_fraction, max_faces)
    info.update(how)
    return vertices, faces, info


def prepare_grid(grid: np.ndarray, smooth: bool = False, upsample: int = 2, blur_kernel: int = 7,
                 erode: int = 0, blur_sigma: float = 0.0) -> np.ndarray:
    """A float32 (R, R, R) grid, Gaussian-blurred by ``blur_sigma`` cells, then 3drec-smoothed when ``smooth``."""
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 3 or len(set(grid.shape)) != 1:
        raise ValueError(f"density grid must be (R, R, R), got {grid.shape}")
    if blur_sigma > 0:
        from scipy.ndimage import gaussian_filter

        grid = gaussian_filter(grid, blur_sigma, mode="nearest")
    return smooth_density(grid, upsample, blur_kernel, erode) if smooth else grid


def surface_at_level(grid: np.ndarray, radius: float, level: float, min_component_fraction: float = 0.05,
                     max_faces: int = 50000) -> tuple[np.ndarray, np.ndarray, dict]:
    """Marching cubes at ``level``, floaters removed, outward, decimated, manifold."""
    vertices, faces = marching_cubes(grid, level, radius)
    n_raw = len(faces)
    raw = manifold_stats(vertices, faces)
    vertices, faces = remove_floaters(vertices, faces, min_component_fraction)
    faces = orient_outward(vertices, faces)
    n_kept = len(faces)
    vertices, faces = decimate(vertices, faces, max_faces)
    decimated = manifold_stats(vertices, faces)
    vertices, faces, repair = make_manifold(vertices, faces)
    # Decimation can pinch off slivers: drop them as floaters too.
    vertices, faces = remove_floaters(vertices, faces, min_component_fraction)
    if len(faces) < 4:
        raise UserError(f"the exported surface is degenerate ({len(faces)} faces at threshold {level:.4g}); "
                        "check the trained model or lower system.export.threshold")
    info = {"threshold": float(level), "grid_resolution": int(grid.shape[0]), "faces_marching_cubes": int(n_raw),
            "components_marching_cubes": raw["components"], "faces_after_floaters": int(n_kept),
            "non_manifold_edges_marching_cubes": raw["non_manifold_edges"],
            "non_manifold_edges_after_decimation": decimated["non_manifold_edges"], "manifold_repair": repair,
            "faces": int(len(faces)), "vertices": int(len(vertices))}
    final = manifold_stats(vertices, faces)
    info.update(final, components_removed=raw["components"] - final["components"])
    return vertices, faces, info


def make_manifold(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split the non-manifold vertices (and with them the non-manifold edges) that decimation leaves.

    Quadric decimation (fast-simplification) does not check the link condition: where two
    sheets of the surface come close (thin walls, touching parts) it collapses them onto a shared
    vertex or edge, used by 4+ faces. Each such vertex is split into one copy per fan of faces
    around it (faces joined through edges used by exactly two faces), so touching sheets keep
    coincident but separate vertices and every edge of a closed surface has two faces again.
    Faces on edges that are still used by more than two faces (rare) are dropped.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_faces = len(faces)
    edges = np.sort(np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1).reshape(-1, 2), 1)
    _, edge_id, counts = np.unique(edges, axis=0, return_inverse=True, return_counts=True)
    edge_id = edge_id.reshape(-1)
    report = {"non_manifold_edges_found": int((counts > 2).sum())}
    # Corners (face, vertex) are nodes; corners of two faces that share a two-face edge, at that
    # edge's end points, are joined. Each connected set of corners of one vertex is a fan.
    face_of = np.repeat(np.arange(n_faces), 3)
    manifold = counts[edge_id] == 2
    order = np.argsort(edge_id[manifold], kind="stable")
    half = np.flatnonzero(manifold)[order]                   # half-edges of two-face edges, paired
    first, second = half[0::2], half[1::2]
    corner = lambda f, v: 3 * f + np.argmax(faces[f] == v[:, None], 1)  # noqa: E731
    a, b = edges[first, 0], edges[first, 1]
    f1, f2 = face_of[first], face_of[second]
    rows = np.concatenate([corner(f1, a), corner(f1, b)])
    cols = np.concatenate([corner(f2, a), corner(f2, b)])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(3 * n_faces, 3 * n_faces))
    _, fan = connected_components(graph, directed=False)
    # One new vertex per (fan); a vertex keeps its index for its first fan.
    corner_vertex = faces.reshape(-1)
    fans, fan_first = np.unique(fan, return_index=True)
    fan_vertex = corner_vertex[fan_first]
    fans_per_vertex = np.bincount(fan_vertex, minlength=len(vertices))
    report["non_manifold_vertices_split"] = int((fans_per_vertex > 1).sum())
    new_index = np.empty(len(fans), np.int64)
    seen = np.zeros(len(vertices), bool)
    extra = []
    for k in np.argsort(fan_first):                       # deterministic: in corner order
        v = fan_vertex[k]
        if not seen[v]:
            new_index[k], seen[v] = v, True
        else:
            new_index[k] = len(vertices) + len(extra)
            extra.append(v)
    lookup = np.searchsorted(fans, fan)
    new_faces = new_index[lookup].reshape(-1, 3)
    new_vertices = np.concatenate([vertices, vertices[np.asarray(extra, np.int64)]]) if extra else vertices
    stats = manifold_stats(new_vertices, new_faces)
    if stats["non_manifold_edges"]:
        bad = _faces_on_non_manifold_edges(new_faces)
        new_faces = new_faces[~bad]
        report["faces_dropped"] = int(bad.sum())
    report["vertices_added"] = len(extra)
    return new_vertices, new_faces, report


def _faces_on_non_manifold_edges(faces: np.ndarray) -> np.ndarray:
    edges = np.sort(np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1).reshape(-1, 2), 1)
    _, edge_id, counts = np.unique(edges, axis=0, return_inverse=True, return_counts=True)
    return (counts[edge_id.reshape(-1)] > 2).reshape(-1, 3).any(1)
