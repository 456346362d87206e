"""The renderer of 3D Gaussians (geometry/gaussians.py): lift3d's renderer interface over the tile
rasterizer of gaussian_raster.py (PyTorch on any device; gsplat's CUDA kernels when installed and on a GPU).

Outputs are the volume renderer's (comp_rgb over the background module's colour, opacity, ray depth,
comp_normal) plus the rasterizer's ``means2d``, ``radii`` and ``depths``. While training, ``means2d``
keeps its gradient after backward (``retain_grad``): the geometry's ``after_backward`` reads the
screen-space gradients there to densify.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lift3d.cameras import Cameras
from lift3d.config import domain
from lift3d.errors import ConfigError
from lift3d.plugin import MemoryPlan, PluginModule
from lift3d.registry import register
from lift3d.renderers import gaussian_raster
from lift3d.renderers.volume import _Parts

BACKENDS = ("auto", "torch", "gsplat")
# Bytes autograd keeps per evaluated pixel-Gaussian pair (gaussian_raster.RECOMPUTE_PAIRS: ~40), and the share of
# all pixel x Gaussian pairs the tiles evaluate: 6-18 % for DreamGaussian-initialised scenes of 1k-5k Gaussians at
# 64-256 px (benchmarks/bench_gaussian_raster.py); 0.2 bounds it. Past RECOMPUTE_PAIRS a render holds one chunk.
BYTES_PER_PAIR = 40
EVALUATED_SHARE = 0.2


@register("gaussian-splatting", "renderer")
class GaussianSplatting(PluginModule):
    @dataclass
    class Config:
        background_depth: float = domain(10.0, gt=0)  # depth of the uncovered part of a pixel (the volume renderer's)
        near_plane: float = domain(0.01, gt=0)
        eps2d: float = domain(0.3, ge=0)      # the 2D low-pass filter added to each projected covariance
        antialiased: bool = False
        backend: str = "auto"                 # auto: gsplat for CUDA tensors when installed, else PyTorch
        tile_size: int = domain(16, ge=1, le=1024)

    def __init__(self, cfg=None, geometry=None, background=None, path: str = "system.renderer"):
        super().__init__(cfg, path)
        if geometry is None or background is None:
            raise ValueError("GaussianSplatting needs geometry= and background=")
        for attr in ("means", "scales", "quats", "opacities", "colors"):
            if not hasattr(geometry, attr):
                raise ConfigError(f"{path}: renderer 'gaussian-splatting' draws 3D Gaussians; set "
                                  f"system.geometry_type=gaussians (or system.renderer_type=volume-renderer)")
        if self.cfg.backend not in BACKENDS:
            raise ConfigError(f"{path}.backend must be one of {', '.join(BACKENDS)}, got '{self.cfg.backend}'")
        if self.cfg.backend == "gsplat" and not gaussian_raster.gsplat_available():
            raise ConfigError(f"{path}.backend=gsplat needs the gsplat package (pip install gsplat, CUDA); "
                              f"backend=auto uses it when present")
        self._parts = _Parts(geometry, background)

    @property
    def geometry(self):
        return self._parts.geometry

    def forward(self, cameras: Cameras, bg_color=None, normals: bool = False, **_) -> dict:
        g, c = self.geometry, self.cfg
        device = g.means.device
        cameras = cameras.to(device)
        if bg_color is None:
            _, dirs = cameras.rays()
            bg = self._parts.background(dirs)
        else:
            bg = torch.as_tensor(bg_color, dtype=g.means.dtype, device=device)
        out = gaussian_raster.rasterize(g.means, g.scales, g.quats, g.opacities, g.colors, cameras, bg,
                                        normals=normals, background_depth=c.background_depth,
                                        near_plane=c.near_plane, eps2d=c.eps2d, antialiased=c.antialiased,
                                        tile_size=c.tile_size, backend=c.backend)
        if torch.is_grad_enabled() and out["means2d"].requires_grad:
            out["means2d"].retain_grad()
        return out

    def memory_estimate(self, plan: MemoryPlan) -> dict:
        """Pairs the step's renders hold for backward at the geometry's largest count (``max_points``, else
        its current one); a render past RECOMPUTE_PAIRS holds one recomputed chunk instead."""
        n = getattr(self.geometry.cfg, "max_points", None) or self.geometry.means.shape[0]
        worst = 0.0
        for renders in plan.stages:
            pairs = [views * h * w * n * EVALUATED_SHARE for _, views, h, w in renders]
            held = sum(p for p in pairs if p <= gaussian_raster.RECOMPUTE_PAIRS)
            chunk = max((2 ** 19 for p in pairs if p > gaussian_raster.RECOMPUTE_PAIRS), default=0)
            worst = max(worst, held + chunk)
        return {"render": (worst * BYTES_PER_PAIR / 2 ** 30, f"system.geometry.max_points (now {n})")}
