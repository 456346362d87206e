"""Inside/outside tests that tolerate non-watertight meshes (scans with holes, open bottoms).

- ``ray-vote`` (default): from every query point cast rays in K fixed directions (embree, first
  hit only). A ray votes "inside" when the first face it meets is seen from behind (the ray
  leaves the solid there); the point is inside when most rays say so. A hole only costs the
  votes of the rays that escape through it, where the parity of the hit count would flip.
  Needs consistently wound faces: :func:`prepare_solid` repairs the winding and orientation.
- ``winding``: generalised winding number (sum of signed solid angles / 4 pi) > 0.5. Exact and
  independent of embree, but costs O(points x faces): a slow reference for tests.
"""

from __future__ import annotations

import numpy as np


def fibonacci_directions(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere, slightly rotated so none is axis-aligned."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = i * np.pi * (3 - np.sqrt(5)) + 0.1234
    r = np.sqrt(1 - z ** 2)
    d = np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)
    # A fixed generic rotation keeps rays off grid-aligned faces and edges.
    a, b = 0.3717, 0.5123
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return d @ (ry @ rx).T


def prepare_solid(mesh):
    """A geometry-only copy with consistent winding and outward normals (positive signed volume)."""
    import trimesh

    solid = trimesh.Trimesh(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces), process=True)
    if not solid.is_winding_consistent:
        trimesh.repair.fix_winding(solid)
    # The signed volume is meaningful even with small holes; negative means inward normals.
    tri = solid.triangles
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    if signed_volume < 0:
        solid.invert()
    return solid


def ray_vote_inside(mesh, points: np.ndarray, n_directions: int = 7, chunk: int = 200000) -> np.ndarray:
    """(N,) bool: majority of ``n_directions`` rays leave through a back face. ``mesh`` from :func:`prepare_solid`."""
    from lift3d.mesh.raycast import MeshRaycaster

    points = np.asarray(points, np.float64).reshape(-1, 3)
    inside = np.zeros(len(points), bool)
    caster = MeshRaycaster(mesh)
    normals = np.asarray(mesh.face_normals)
    directions = fibonacci_directions(n_directions)
    for start in range(0, len(points), chunk):
        idx = np.arange(start, min(start + chunk, len(points)))
        votes = np.zeros(len(idx), np.int64)
        for d in directions:
            hit = caster.cast(points[idx], np.broadcast_to(d, (len(idx), 3)))
            face = hit["face_id"]
            ok = face >= 0
            back = np.zeros(len(idx), bool)
            back[ok] = normals[face[ok]] @ d > 0
            votes += back
        inside[idx] = votes * 2 > n_directions
    return inside


def winding_numbers(mesh, points: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(N,) generalised winding numbers (Van Oosterom-Strackee solid angles), brute force."""
    tri = np.asarray(mesh.triangles, np.float64)
    points = np.asarray(points, np.float64).reshape(-1, 3)
    out = np.empty(len(points))
    for s in range(0, len(points), chunk):
        p = points[s:s + chunk, None, None, :]
        a, b, c = tri[None, :, 0] - p[:, :, 0], tri[None, :, 1] - p[:, :, 0], tri[None, :, 2] - p[:, :, 0]
        la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
        det = np.einsum("pfi,pfi->pf", a, np.cross(b, c))
        den = (la * lb * lc + np.einsum("pfi,pfi->pf", a, b) * lc + np.einsum("pfi,pfi->pf", a, c) * lb
               + np.einsum("pfi,pfi->pf", b, c) * la)
        out[s:s + chunk] = 2 * np.arctan2(det, den).sum(-1) / (4 * np.pi)
    return out


def inside_mask(mesh, points: np.ndarray, method: str = "ray-vote", n_directions: int = 7,
                prepared: bool = False) -> np.ndarray:
    """(N,) bool occupancy of ``points``; the mesh is repaired by :func:`prepare_solid` unless ``prepared``."""
    if method not in ("ray-vote", "winding"):
        raise ValueError(f"unknown inside test {method!r}; use 'ray-vote' or 'winding'")
    solid = mesh if prepared else prepare_solid(mesh)
    points = np.asarray(points, np.float64).reshape(-1, 3)
    lo, hi = solid.bounds
    in_box = np.all((points >= lo) & (points <= hi), axis=1)     # outside the bounding box: outside
    inside = np.zeros(len(points), bool)
    if in_box.any():
        if method == "ray-vote":
            inside[in_box] = ray_vote_inside(solid, points[in_box], n_directions)
        else:
            inside[in_box] = winding_numbers(solid, points[in_box]) > 0.5
    return inside
