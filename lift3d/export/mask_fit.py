"""Make the density grid agree with the input's mask before the iso-surface is taken.

The reference camera is known exactly and its mask says where the object is and is not. Whatever
level is chosen, the iso-surface can still disagree with it: a floater outside the silhouette, or
a ray through the object that never meets density above the level (a hole the user sees straight
through: a distilled field often makes a white patch of the object out of a faint haze). Three
edits of the grid, each counted in ``model_info.json``:

1. **carve**: cells that project outside the mask (dilated by ``dilate_px`` pixels, so the outline
   is kept) are emptied: from the input camera nothing is there;
2. **close**: where a mask pixel's ray never meets the level's surface (a hole), or meets it more
   than ``pit_cells`` behind where the surface should be (a pit, away from the outline), the cells
   from there, ``thickness_cells`` deep (up to the hit), are raised above the level. Where the
   surface should be: where the field renders the ray (opacity 1/2), but not in front of the
   nearest hits around it, so the plug is flush with the rim of the hole rather than a sheet of haze;
3. **fill**: cavities that the surface encloses (inside, unreachable from the box's border) become
   solid: a hollow stem is still a solid stem.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lift3d.export.level import _camera_rays, march, ray_image_size, rendered_depth


def fit_to_mask(grid: np.ndarray, radius: float, level: float, camera, mask, *, dilate_px: int = 1,
                thickness_cells: float = 3.0, pit_cells: float = 4.0, edge_px: int = 2, rim_px: int = 4,
                max_size: int = 256) -> tuple[np.ndarray, dict]:
    """The edited grid (a copy) and what was done. ``grid`` (R, R, R) holds densities at the cell
    centres of [-radius, radius]^3 indexed [ix, iy, iz]; ``camera`` is the one reference view;
    ``mask`` (H, W[, 1]) its foreground in [0, 1]."""
    from scipy.ndimage import binary_dilation, binary_erosion, binary_fill_holes, grey_erosion

    from lift3d.export.view_bake import project

    grid = np.array(grid, dtype=np.float32, copy=True)
    resolution = grid.shape[0]
    cell = 2 * radius / resolution
    solid = max(2.0 * level, level + 1e-3)           # what an edited cell gets: clearly above the level
    report = {}

    # 1. Carve what the camera sees as background.
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

    # 2. Close what the input camera would see through or into: the surface follows the field's render.
    origins, dirs, ray_mask = _camera_rays(camera[:1], torch.as_tensor(m, dtype=torch.float32), max_size)
    n_samples = int(math.ceil(2 * math.sqrt(3) * resolution))
    sigma, t, delta = march(torch.from_numpy(grid), radius, origins, dirs, n_samples)
    above = sigma > level
    hits = above.any(1)
    hit_depth = torch.where(hits, t.gather(1, above.float().argmax(1, keepdim=True))[:, 0],
                            torch.full_like(t[:, 0], math.inf))
    # A hole (no hit) or a pit (the hit lies well behind the surface around it, as where a distilled field made
    # a white patch of the object out of faint density): solid from where the surface should be, ``thickness_cells``
    # deep (up to the hit). Where it should be: where the field renders the ray (transmittance 1/2), but not in
    # front of the nearest hits around it (``rim_px``), so the plug is flush with the rim, not a sheet of haze; where
    # the field never renders the ray that opaque, at the rim; with no hit around either, where its density peaks.
    side_h, side_w = ray_image_size(camera, max_size)          # the image of _camera_rays' rays
    rendered, _ = rendered_depth(sigma, t, delta)
    finite_hits = torch.where(hits, hit_depth, torch.full_like(hit_depth, 1e6)).reshape(side_h, side_w).numpy()
    rim = torch.from_numpy(grey_erosion(finite_hits, size=2 * rim_px + 1).reshape(-1))
    peak = t.gather(1, sigma.argmax(1, keepdim=True))[:, 0]
    has_rim = rim < 1e5
    start = torch.where(torch.isfinite(rendered), torch.where(has_rim, torch.maximum(rendered, rim), rendered),
                        torch.where(has_rim, rim, peak))
    end = torch.minimum(hit_depth, start + thickness_cells * cell)
    # Pits not along the outline (``edge_px``), where the field fades out and its rendered depth is noise: slivers.
    interior = torch.from_numpy(binary_erosion(ray_mask.numpy().reshape(side_h, side_w), iterations=edge_px,
                                               border_value=0).reshape(-1))
    gap = (ray_mask & ~hits) | (interior & (hit_depth - start > pit_cells * cell))
    report["see_through_rays"] = int((ray_mask & ~hits).sum())
    report["pit_rays"] = int((gap & hits).sum())
    report["mask_rays"] = int(ray_mask.sum())
    report["closed_cells"] = 0
    idx = torch.nonzero(gap).reshape(-1)
    if len(idx):
        step = 0.25 * cell
        length = int(math.ceil(float((end[idx] - start[idx]).max()) / step)) + 1
        along = start[idx, None] + torch.arange(length, dtype=torch.float32)[None] * step       # (K, L) depths
        along = torch.minimum(along, end[idx, None])
        points = origins[idx, None] + along.unsqueeze(-1) * dirs[idx, None]
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

