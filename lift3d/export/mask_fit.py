"""Make the density grid agree with the input's mask before the iso-surface is taken.

The reference camera is known exactly and its mask says where the object is and is not. Whatever
level is chosen, the iso-surface can still disagree with it: a floater outside the silhouette, or
a ray through the object that never meets density above the level (a hole the user sees straight
through: a distilled field often makes a white patch of the object out of a faint haze). Four
edits of the grid, each counted in ``model_info.json``:

1. **carve**: cells that project outside the mask (dilated by ``dilate_px`` pixels) are emptied: from
   the input camera nothing is there; so are small pieces far from the body (floaters), which the
   iso-surface would drop anyway, so that step 2 closes the holes they leave;
2. **close**: where a mask pixel's ray never meets the level's surface (a hole), or meets it more
   than ``pit_cells`` behind where the surface should be (a pit, away from the outline), the cells
   from there, ``thickness_cells`` deep (up to the hit), are raised above the level. Where the
   surface should be: where the field renders the ray (opacity 1/2), but not in front of the
   nearest hits around it, so the plug is flush with the rim of the hole rather than a sheet of haze;
3. **fill**: cavities that the surface encloses (inside, unreachable from the box's border) become
   solid: a hollow stem is still a solid stem;
4. **bridge**: a piece apart from the body that the input camera sees in front of it (a plug or a
   patch the field made in front of a pit) is joined to the body along the camera's rays: the cells
   between the piece and the body behind it, at most ``bridge_cells`` deep, become solid. The input
   camera sees one surface there, so the gap is the object's inside; without the bridge the piece
   is dropped as a floater (a hole in the silhouette) or kept as a disc floating off the surface. A seen
   piece with no body behind it (at the outline) is joined to the body the shortest way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lift3d.export.level import _box_span, _camera_rays, march, ray_image_size, rendered_depth


def fit_to_mask(grid: np.ndarray, radius: float, level: float, camera, mask, *, dilate_px: int = 0,
                carve_cells: float = 0.0, thickness_cells: float = 3.0, pit_cells: float = 4.0, edge_px: int = 2,
                rim_px: int = 4, bridge_cells: float = 2.0, floater_fraction: float = 0.02,
                max_size: int = 256) -> tuple[np.ndarray, dict]:
    """The edited grid (a copy) and what was done. ``grid`` (R, R, R) holds densities at the cell
    centres of [-radius, radius]^3 indexed [ix, iy, iz]; ``camera`` is the one reference view;
    ``mask`` (H, W[, 1]) its foreground in [0, 1]."""
    from scipy.ndimage import binary_dilation, binary_erosion, binary_fill_holes, distance_transform_edt, grey_erosion

    from lift3d.export.view_bake import project, sample_image

    grid = np.array(grid, dtype=np.float32, copy=True)
    resolution = grid.shape[0]
    cell = 2 * radius / resolution
    solid = max(2.0 * level, level + 1e-3)           # what an edited cell gets: clearly above the level
    report = {}

    # 1. Carve what the camera sees as background: the cells whose centres project more than ``carve_cells`` of
    # their own footprint outside the mask (dilated by ``dilate_px``). A cell straddles the outline; the
    # iso-surface passes between a kept and a carved centre, so carving every centre outside (0) pulls the
    # outline in by a quarter cell on average, and a pixel's dilation pushes it out by a pixel.
    m = torch.as_tensor(mask, dtype=torch.float32).reshape(camera.height, camera.width).numpy() > 0.5
    keep = binary_dilation(m, iterations=dilate_px) if dilate_px > 0 else m
    outside = distance_transform_edt(~keep)[..., None].astype(np.float32)   # pixel centres to the nearest kept one
    axis = (np.arange(resolution) + 0.5) / resolution * 2 * radius - radius
    centres = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    pixels, depth = project(camera[:1].to("cpu"), centres)
    col, row = np.floor(pixels[:, 0]).astype(np.int64), np.floor(pixels[:, 1]).astype(np.int64)
    in_view = (depth > 0) & (col >= 0) & (col < camera.width) & (row >= 0) & (row < camera.height)
    footprint = float(camera.focal[0]) * cell / np.maximum(depth[in_view], 1e-6)     # a cell's size in pixels
    beyond = sample_image(outside, pixels[in_view])[:, 0] - 0.5                    # from the outline, in pixels
    background = np.zeros(len(centres), bool)
    background[in_view] = beyond > carve_cells * footprint
    background = background.reshape(grid.shape)
    report["carved_cells"] = int((background & (grid > level)).sum())
    grid[background] = np.minimum(grid[background], 0.0)
    # ... and the floaters: small pieces (under ``floater_fraction`` of the body's cells) farther than the bridge
    # reaches. A field can draw a part of the object as a patch far in front of it, right in the input's
    # silhouette; the iso-surface's floater removal would then leave a hole there, which step 2 now plugs at
    # the body's own depth.
    report["floater_cells"] = _drop_floaters(grid, level, floater_fraction, bridge_cells)

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

    # 4. Bridge pieces in front of the body to it along the input camera's rays.
    report["bridged_cells"] = _bridge(grid, radius, level, solid, origins[ray_mask], dirs[ray_mask],
                                      bridge_cells * cell)
    return grid, report


def _pieces(grid: np.ndarray, level: float) -> tuple[np.ndarray, int, np.ndarray, int]:
    """The face-connected pieces of ``grid > level``: labels (0: empty), their count, cells per label, and the
    label of the largest piece (the body)."""
    from scipy.ndimage import label

    labels, count = label(grid > level)
    sizes = np.bincount(labels.reshape(-1))
    return labels, count, sizes, int(np.argmax(sizes[1:])) + 1 if count else 0


def _drop_floaters(grid: np.ndarray, level: float, fraction: float, max_gap_cells: float) -> int:
    """Empty the pieces of ``grid > level`` with fewer than ``fraction`` x the largest piece's cells that lie
    more than ``max_gap_cells`` from it (in place); the number of cells emptied."""
    from scipy.ndimage import distance_transform_edt, minimum

    labels, count, sizes, body = _pieces(grid, level)
    if count < 2:
        return 0
    distance = distance_transform_edt(labels != body)
    others = np.array([i for i in range(1, count + 1) if i != body])
    gaps = np.asarray(minimum(distance, labels, others))
    drop = others[(sizes[others] < fraction * sizes[body]) & (gaps > max_gap_cells)]
    cells = np.isin(labels, drop)
    grid[cells] = np.minimum(grid[cells], 0.0)
    return int(cells.sum())


def _bridge(grid: np.ndarray, radius: float, level: float, solid: float, origins: torch.Tensor, dirs: torch.Tensor,
            max_gap: float) -> int:
    """Join the pieces of ``grid > level`` that these rays meet first to the largest piece (the body). Along a
    ray: the cells from its first hit to its first cell of the body behind, where that gap is at most
    ``max_gap`` long. A seen piece with no body behind it (at the outline) is joined the shortest way: each of
    its cells within ``max_gap`` of the body to its nearest body cell. Edits ``grid`` in place; returns the
    number of cells raised (a bridge may cross a carved cell: it joins two pieces the input camera sees)."""
    from scipy.ndimage import binary_dilation, distance_transform_edt

    resolution = grid.shape[0]
    cell = 2 * radius / resolution
    labels, count, _, body = _pieces(grid, level)
    if count < 2 or not len(origins):
        return 0
    near, far = _box_span(origins, dirs, radius)
    step = 0.5 * cell
    n = int(math.ceil(float((far - near).clamp_min(0).max()) / step)) + 1
    raised = np.zeros(grid.shape, bool)
    unjoined = set()
    for sl in torch.arange(len(origins)).split(2048):
        t = near[sl, None] + torch.arange(n, dtype=torch.float32)[None] * step           # (K, n) depths
        points = origins[sl, None] + t[..., None] * dirs[sl, None]
        idx = np.floor((points.numpy() + radius) / cell).astype(np.int64)
        inside = ((idx >= 0) & (idx < resolution)).all(-1)
        idx = np.clip(idx, 0, resolution - 1)
        lab = np.where(inside, labels[idx[..., 0], idx[..., 1], idx[..., 2]], 0)         # (K, n) piece per sample
        hit = lab.any(1)
        first = (lab > 0).argmax(1)
        first_label = lab[np.arange(len(lab)), first]
        on_body = lab == body
        first_body = on_body.argmax(1)
        apart = hit & (first_label != body)
        join = apart & on_body.any(1) & ((first_body - first) * step <= max_gap)
        for k in np.flatnonzero(join):
            cells = idx[k, first[k]:first_body[k] + 1]
            raised[cells[:, 0], cells[:, 1], cells[:, 2]] = True
        unjoined.update(first_label[apart & ~join].tolist())
    if unjoined:
        distance, nearest = distance_transform_edt(labels != body, return_indices=True)
        cells = np.argwhere(np.isin(labels, list(unjoined)) & (distance * cell <= max_gap))
        if len(cells):
            target = nearest[:, cells[:, 0], cells[:, 1], cells[:, 2]].T                 # (K, 3) nearest body cell
            length = int(math.ceil(float(distance[tuple(cells.T)].max()) * 2)) + 1
            u = np.linspace(0.0, 1.0, length)[None, :, None]
            path = np.rint(cells[:, None] + u * (target - cells)[:, None]).astype(np.int64).reshape(-1, 3)
            raised[path[:, 0], path[:, 1], path[:, 2]] = True
    # A path of samples can step from a cell to a diagonal neighbour only: thicken it by a cell, so that it joins
    # through faces, as the iso-surface does.
    raised = binary_dilation(raised) & (grid <= level)
    grid[raised] = solid
    return int(raised.sum())
