"""Make the density grid agree with the input's mask before the iso-surface is taken.

The reference camera is known exactly and its mask says where the object is and is not. Whatever
level is chosen, the iso-surface can still disagree with it: a floater outside the silhouette, or
a ray through the object that never meets density above the level (a hole the user sees straight
through: a distilled field often makes a white patch of the object out of a faint haze). Three
edits of the grid, each counted in ``model_info.json``:

1. **carve**: cells that project outside the mask (dilated by ``dilate_px`` pixels, so the outline
   is kept) are emptied: from the input camera nothing is there;
2. **close**: for each mask pixel whose ray stays below the level, the cells from the depth where
   the nearest ray that meets the surface meets it, ``thickness_cells`` deep, are raised above the
   level: the surface around the hole continues across it;
3. **fill**: cavities that the surface encloses (inside, unreachable from the box's border) become
   solid: a hollow stem is still a solid stem.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lift3d.export.level import _camera_rays, march


def fit_to_mask(grid: np.ndarray, radius: float, level: float, camera, mask, *, dilate_px: int = 1,
                thickness_cells: float = 3.0, max_size: int = 256) -> tuple[np.ndarray, dict]:
    """The edited grid (a copy) and what was done. ``grid`` (R, R, R) holds densities at the cell
    centres of [-radius, radius]^3 indexed [ix, iy, iz]; ``camera`` is the one reference view;
    ``mask`` (H, W[, 1]) its foreground in [0, 1]."""
    from scipy.ndimage import binary_dilation, binary_fill_holes, distance_transform_edt

    grid = np.array(grid, dtype=np.float32, copy=True)
    resolution = grid.shape[0]
    cell = 2 * radius / resolution
    solid = max(2.0 * level, level + 1e-3)           # what an edited cell gets: clearly above the level
    report = {}

    # 1. Carve what the camera sees as background.
    from lift3d.export.view_bake import project

    m = torch.as_tensor(mask, dtype=torch.float32).reshape(camera.height, camera.width).numpy() > 0.5
    keep = binary_dilation(m, iterations=dilate_px) if dilate_px > 0 else m
    axis = (np.arange(resolution) + 0.5) / resolution * 2 * radius - radius
    centres = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    pixels, depth = project(camera[:1].to("cpu"), centres)
    col, row = np.floor(pixels[:, 0]).astype(np.int64), np.floor(pixels[:, 1]).astype(np.int64)
    in_view = (depth > 0) & (col >= 0) & (col < camera.width) & (row >= 0) & (row < camera.height)
    background = np.zeros(len(centres), bool)
    background[in_view] = ~keep[row[in_view], col[in_view]]
    background = background.reshape(grid.shape)
    report["carved_cells"] = int((background & (grid > level)).sum())
    grid[background] = np.minimum(grid[background], 0.0)

    # 2. Close the mask's rays that see through the surface.
    origins, dirs, ray_mask = _camera_rays(camera[:1], torch.as_tensor(m, dtype=torch.float32), max_size)
    n_samples = int(math.ceil(2 * math.sqrt(3) * resolution))
    sigma, t, _ = march(torch.from_numpy(grid), radius, origins, dirs, n_samples)
    above = sigma > level
    through = ray_mask & ~above.any(1)
    report["see_through_rays"] = int(through.sum())
    report["mask_rays"] = int(ray_mask.sum())
    report["closed_cells"] = 0
    hit = (ray_mask & above.any(1)).numpy()
    if through.any() and hit.any():
        # The surface around a hole continues across it: each hole ray takes the depth where the nearest
        # ray that does meet the surface meets it, and is made solid from there, ``thickness_cells`` deep.
        first_hit = t.gather(1, above.float().argmax(1, keepdim=True))[:, 0]
        side_h, side_w = _ray_image_size(camera, max_size)      # the image of _camera_rays' rays
        _, (ri, ci) = distance_transform_edt(~hit.reshape(side_h, side_w), return_indices=True)
        depth = first_hit.reshape(side_h, side_w)[ri, ci].reshape(-1)
        idx = torch.nonzero(through).reshape(-1)
        offsets = torch.arange(-0.5, thickness_cells + 1e-6, 0.25) * cell
        points = origins[idx, None] + (depth[idx, None] + offsets[None]).unsqueeze(-1) * dirs[idx, None]
        cells = np.floor((points.reshape(-1, 3).numpy() + radius) / cell).astype(np.int64)
        cells = np.unique(cells[((cells >= 0) & (cells < resolution)).all(1)], axis=0)
        ix, iy, iz = cells.T
        report["closed_cells"] = int((grid[ix, iy, iz] <= level).sum())
        grid[ix, iy, iz] = np.maximum(grid[ix, iy, iz], solid)

    # 3. Fill enclosed cavities.
    inside = grid > level
    cavities = binary_fill_holes(inside) & ~inside
    report["filled_cells"] = int(cavities.sum())
    grid[cavities] = solid
    return grid, report


def _ray_image_size(camera, max_size: int) -> tuple[int, int]:
    scale = min(1.0, max_size / max(camera.height, camera.width))
    return max(1, round(camera.height * scale)), max(1, round(camera.width * scale))


def components_seen(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, camera, mask,
                    min_pixels: int = 4) -> np.ndarray:
    """Which connected components (``labels`` per face) the reference camera sees first on at least
    ``min_pixels`` pixels of its mask: parts the input shows, never floaters, however small."""
    import trimesh

    from lift3d.mesh.raycast import MeshRaycaster

    m = torch.as_tensor(mask, dtype=torch.float32).reshape(-1).numpy() > 0.5
    origins, dirs = (x.reshape(-1, 3).double().numpy() for x in camera[:1].to("cpu").rays())
    hit = MeshRaycaster(trimesh.Trimesh(vertices, faces, process=False)).cast(origins[m], dirs[m])["face_id"]
    counts = np.bincount(labels[hit[hit >= 0]], minlength=int(labels.max()) + 1)
    return counts >= min_pixels
