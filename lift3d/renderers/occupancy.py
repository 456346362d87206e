"""A coarse occupancy grid over the field's box, for empty-space skipping (pure torch).

Like nerfacc's occupancy grid: every cell keeps an EMA of the "opacity per step"
sigma * step_size seen at random points inside it,
``occ = max(occ * decay, sigma * step_size)``, and is *occupied* when that reaches
``min(mean(occ), -log(1 - alpha_threshold))`` i.e. when a step through it would have alpha of at
least ``alpha_threshold`` (the mean term keeps a uniformly faint field fully occupied). The
binary grid is then dilated by ``dilation`` cells, so that density can still grow next to what is
already there (skipped samples get no gradient).

Both grids are buffers, so a checkpoint restores them; ``ready`` says whether the grid was built.
Cells are indexed [ix, iy, iz] along world x, y, z.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class OccupancyGrid(nn.Module):
    def __init__(self, radius: float, resolution: int = 64, alpha_threshold: float = 0.01,
                 ema_decay: float = 0.95, dilation: int = 1, explore_fraction: float = 0.125):
        super().__init__()
        self.radius, self.resolution = float(radius), int(resolution)
        self.alpha_threshold, self.ema_decay, self.dilation = alpha_threshold, ema_decay, dilation
        self.explore_fraction = explore_fraction
        r = self.resolution
        self.register_buffer("occ", torch.zeros(r, r, r))
        self.register_buffer("binary", torch.ones(r, r, r, dtype=torch.bool))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def cell_centres(self) -> torch.Tensor:
        r, device = self.resolution, self.occ.device
        axis = (torch.arange(r, device=device, dtype=torch.float32) + 0.5) / r
        return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # in [0, 1]

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], step_size: float,
               jitter: bool = True, chunk: int = 65536) -> None:
        """Re-evaluate cells at one (jittered) point each and refresh the binary grid.

        The first update visits every cell; later ones visit the occupied cells and a random
        ``explore_fraction`` of the others (as nerfacc does), so a refresh costs what the
        occupied space costs."""
        p01 = self.cell_centres()
        if self.ready:
            visit = self.binary.view(-1) | (torch.rand(len(p01), device=p01.device) < self.explore_fraction)
            cells = visit.nonzero().squeeze(1)
        else:
            cells = torch.arange(len(p01), device=p01.device)
        p01 = p01[cells]
        if jitter:
            p01 = p01 + (torch.rand_like(p01) - 0.5) / self.resolution
        points = p01 * 2 * self.radius - self.radius
        sigma = torch.cat([density_fn(points[i:i + chunk]) for i in range(0, len(points), chunk)])
        new = sigma.float() * step_size
        occ = self.occ.view(-1)
        occ[cells] = torch.maximum(occ[cells] * self.ema_decay, new) if self.ready else new
        # Slightly under the mean: in a uniform field (a fresh voxel grid) every cell equals the mean
        # up to float rounding, and all of them must count as occupied.
        threshold = min(self.occ.mean().item() * (1 - 1e-3), -math.log(1.0 - self.alpha_threshold))
        binary = self.occ >= threshold
        if self.dilation > 0:
            k = 2 * self.dilation + 1
            binary = F.max_pool3d(binary[None, None].float(), k, stride=1, padding=self.dilation)[0, 0] > 0
        self.binary.copy_(binary)
        self.ready.fill_(True)

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean (N,) for world points (N, 3): does their cell hold anything? (Outside the box: no.)"""
        r = self.resolution
        ijk = ((points + self.radius) / (2 * self.radius) * r).floor().long()
        inside = ((ijk >= 0) & (ijk < r)).all(-1)
        ijk = ijk.clamp(0, r - 1)
        flat = (ijk[:, 0] * r + ijk[:, 1]) * r + ijk[:, 2]
        return self.binary.view(-1)[flat] & inside

    def occupied_along(self, origins: torch.Tensor, dirs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Boolean (M, S) for the points origins + t * dirs of rays (M, 3) at distances t (M, S), all
        inside the box (the renderer marches between box entry and exit; rounding is clamped to the
        border cells). The same cells as ``occupied``, without building the (M, S, 3) points: one
        axis at a time, in int32."""
        r = self.resolution
        scale = r / (2 * self.radius)
        start, step = (origins + self.radius) * scale, dirs * scale
        flat = None
        for axis in range(3):
            cell = torch.addcmul(start[:, axis, None], t, step[:, axis, None]).clamp_(0, r - 1).to(torch.int32)
            flat = cell if flat is None else flat.mul_(r).add_(cell)
        return self.binary.view(-1)[flat]

    @property
    def occupied_fraction(self) -> float:
        return self.binary.float().mean().item()
