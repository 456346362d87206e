"""The interface every 3D field implements.

A geometry is a field inside the axis-aligned box ``[-radius, radius]^3`` (world frame, z-up):
- ``forward(points)`` -> ``{"density": (N,), "features": (N, C)}``: volume density sigma >= 0
  and C feature channels (C = 3 RGB in [0, 1], or C = 4 Stable-Diffusion latents, unbounded);
- ``density(points)`` -> (N,), the cheap path used by the occupancy grid and mesh extraction;
- ``density_grid(resolution)`` -> (R, R, R) densities at the centres of a regular grid over the
  box, indexed [ix, iy, iz] along world x, y, z (what marching cubes consumes);
- ``color(points)`` -> (N, 3) RGB in [0, 1] for texture baking (RGB fields only);
- ``normal(points, eps)`` -> (N, 3) unit normals -grad(sigma)/|grad(sigma)| by central differences;
- the plugin hooks of lift3d/plugin.py (``after_backward(ctx)`` is where a point-based field densifies
  and prunes; list such parameters and per-point buffers in ``resizable_parameters`` so checkpoints with
  another count load, see ``lift3d/systems/base.py``);
- ``bytes_per_sample``: bytes a volume render holds for backward per sample of this field (measured; the
  pre-flight memory check uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lift3d.config import domain
from lift3d.plugin import PluginModule


class BaseGeometry(PluginModule):
    @dataclass
    class Config:
        radius: float = domain(1.0, gt=0)

    n_feature_dims: int = 3
    bytes_per_sample: int = 3300     # the hash grid's, the largest measured: fields that do not say are not under-counted

    def __init__(self, cfg=None, path: str = "geometry"):
        super().__init__(cfg, path)

    @property
    def bbox(self) -> torch.Tensor:
        r = self.cfg.radius
        return torch.tensor([[-r, -r, -r], [r, r, r]], dtype=torch.float32)

    def forward(self, points: torch.Tensor) -> dict:
        raise NotImplementedError

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points)["density"]

    def color(self, points: torch.Tensor) -> torch.Tensor:
        if self.n_feature_dims != 3:
            raise ValueError(f"{type(self).__name__} stores {self.n_feature_dims} latent channels, not RGB")
        return self.forward(points)["features"]

    def normal(self, points: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
        """Outward unit normals (N, 3) from central differences of the density, step ``eps``.

        Finite differences rather than autograd: the same code for every field, usable under
        ``torch.no_grad`` (evaluation), and differentiable for normal losses without a double
        backward through the field (six more density queries instead). Where the density is
        flat (|grad| well under 0.01) the normal fades to zero instead of dividing by ~0, which
        keeps its derivative bounded."""
        offsets = eps * torch.cat([torch.eye(3), -torch.eye(3)]).to(points)        # (6, 3)
        d = self.density((points[:, None, :] + offsets).reshape(-1, 3)).view(-1, 6)
        grad = (d[:, :3] - d[:, 3:]) / (2 * eps)
        return -grad / torch.sqrt((grad ** 2).sum(-1, keepdim=True) + 1e-4)

    def grid_points(self, resolution: int) -> torch.Tensor:
        """(R, R, R, 3) world positions of the grid cell centres over the box."""
        r = self.cfg.radius
        axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 * r - r
        return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)

    @torch.no_grad()
    def density_grid(self, resolution: int, chunk: int = 262144) -> torch.Tensor:
        device = next(self.parameters()).device
        points = self.grid_points(resolution).reshape(-1, 3)
        out = [self.density(points[i:i + chunk].to(device)).cpu() for i in range(0, len(points), chunk)]
        return torch.cat(out).reshape(resolution, resolution, resolution)
