"""3D Gaussians (DreamGaussian's geometry): anisotropic Gaussians that densify, split and prune.

Each Gaussian i has a mean, a rotation (quaternion wxyz), per-axis scales, an opacity and a colour (SH
degree 0: rgb = max(0, C0 * dc + 0.5)). Drawn by ``renderers/gaussian_splatting.py``; as a field (export,
occupancy, normals) its density at x is sum_i o_i exp(-d^T Sigma_i^-1 d / 2), d = x - mu_i, the quantity
DreamGaussian runs marching cubes on (at level 1).

Training follows 3D Gaussian Splatting's adaptive density control on DreamGaussian's schedule
(../shared/reference/dreamgaussian-recipe.md), in ``after_backward``:
- statistics: for every render of the step, the norm of each drawn Gaussian's screen-space mean gradient in
  NDC units (pixel gradient x W/2, H/2, x views, as gsplat's DefaultStrategy) is accumulated with a count;
- every ``densify_every`` steps in [densify_from, densify_until]: Gaussians whose mean statistic reaches
  ``densify_grad_threshold`` are cloned (largest scale <= percent_dense x extent) or split in two (larger:
  new means drawn from the Gaussian, scales / 1.6); then those with opacity < ``prune_opacity`` or a
  largest scale > ``prune_scale`` are removed; at most ``max_points`` remain (memory is bounded);
- every ``opacity_reset_every`` steps the opacities drop to at most 0.01;
- the means' learning rate decays log-linearly from ``position_lr`` to ``position_lr_final``.
Every row change goes through ``ctx.optimizer``, so surviving Gaussians keep their Adam moments bit-exact,
and the statistics are buffers listed in ``resizable_parameters``: a checkpoint with any count resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.config import domain
from lift3d.errors import ConfigError
from lift3d.geometry.base import BaseGeometry
from lift3d.plugin import StepContext
from lift3d.registry import register
from lift3d.renderers.gaussian_raster import quat_to_rotmat

SH_C0 = 0.28209479177387814
PARAMETERS = ("means", "log_scales", "quats", "opacity_logits", "colors_dc")
STATISTICS = ("grad_accum", "grad_count")


@register("gaussians", "geometry")
class Gaussians(BaseGeometry):
    @dataclass
    class Config(BaseGeometry.Config):
        num_points: int = domain(5000, ge=1)        # initial Gaussians, uniform in a ball of init_radius
        init_radius: float = domain(0.5, gt=0)      # and at most radius
        init_opacity: float = domain(0.1, gt=0, lt=1)
        n_feature_dims: int = 3              # RGB (SH degree 0)
        # Learning rates (DreamGaussian's image.yaml, its spatial_lr_scale 10 applied to the means)
        position_lr: float = domain(0.01, gt=0)
        position_lr_final: float = domain(0.0002, gt=0)
        position_lr_steps: int = domain(500, ge=1)
        color_lr: float = domain(0.01, gt=0)
        opacity_lr: float = domain(0.05, gt=0)
        scale_lr: float = domain(0.005, gt=0)
        rotation_lr: float = domain(0.005, gt=0)
        # Adaptive density control
        densify_from: int = domain(100, ge=0)
        densify_until: int = domain(3000, ge=0)
        densify_every: int = domain(100, ge=1)
        densify_grad_threshold: float = domain(0.01, ge=0)
        percent_dense: float = domain(0.01, ge=0)   # clone below, split above percent_dense x extent
        extent: float = domain(4.0, gt=0)
        prune_opacity: float = domain(0.01, ge=0, lt=1)
        prune_scale: float = domain(0.4, gt=0)      # world units (DreamGaussian: 0.1 x extent)
        opacity_reset_every: int = domain(700, ge=1)
        max_points: int = domain(100000, ge=1)

    resizable_parameters = PARAMETERS + STATISTICS

    def __init__(self, cfg=None, path: str = "geometry"):
        super().__init__(cfg, path)
        c = self.cfg
        if c.n_feature_dims != 3:
            raise ConfigError(f"{path}.n_feature_dims must be 3: the Gaussians store RGB (SH degree 0), "
                              f"got {c.n_feature_dims}")
        if c.init_radius > c.radius:
            raise ConfigError(f"{path}.init_radius must be at most {path}.radius ({c.radius}), got {c.init_radius}")
        n = c.num_points
        means = F.normalize(torch.randn(n, 3), dim=-1) * c.init_radius * torch.rand(n, 1) ** (1 / 3)
        self.means = nn.Parameter(means)
        self.log_scales = nn.Parameter(torch.log(_neighbour_spacing(means))[:, None].repeat(1, 3))
        self.quats = nn.Parameter(torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1))
        self.opacity_logits = nn.Parameter(torch.full((n,), math.log(c.init_opacity / (1 - c.init_opacity))))
        self.colors_dc = nn.Parameter(torch.zeros(n, 3))             # grey: rgb 0.5
        self.register_buffer("grad_accum", torch.zeros(n))
        self.register_buffer("grad_count", torch.zeros(n))

    # ------------------------------------------------------------------ activated values

    @property
    def n_points(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def colors(self) -> torch.Tensor:
        return (SH_C0 * self.colors_dc + 0.5).clamp(min=0.0)

    def inverse_covariances(self) -> torch.Tensor:
        """(N, 3, 3) Sigma^-1 = R S^-2 R^T."""
        return self._rotated(torch.exp(-2 * self.log_scales))

    def covariances(self) -> torch.Tensor:
        """(N, 3, 3) Sigma = R S^2 R^T."""
        return self._rotated(torch.exp(2 * self.log_scales))

    def _rotated(self, diagonal: torch.Tensor) -> torch.Tensor:
        R = quat_to_rotmat(self.quats)
        return R @ torch.diag_embed(diagonal) @ R.transpose(1, 2)

    # ------------------------------------------------------------------ the field

    def forward(self, points: torch.Tensor, chunk: int = 2 ** 22) -> dict:
        """Density sum_i o_i g_i(x) and colour sum_i o_i g_i c_i / sum_i o_i g_i at (P, 3) points (all pairs,
        in chunks of ``chunk`` point-Gaussian pairs: for evaluation-sized point sets; the grid has its own path)."""
        inv, o, c = self.inverse_covariances(), self.opacities, self.colors
        density, color = [], []
        step = max(chunk // max(self.n_points, 1), 1)
        for i in range(0, len(points), step):
            d = points[i:i + step, None, :] - self.means[None]                  # (p, N, 3)
            w = o * torch.exp(-0.5 * torch.einsum("pni,nij,pnj->pn", d, inv, d))
            total = w.sum(-1)
            density.append(total)
            color.append((w @ c) / total.clamp(min=1e-8)[:, None])
        return {"density": torch.cat(density), "features": torch.cat(color)}

    @torch.no_grad()
    def density_grid(self, resolution: int, chunk: int = 2 ** 21) -> torch.Tensor:
        """The density at the grid's cell centres, each Gaussian added only over a cube of cells 3 standard
        deviations (along its widest world axis) around it; Gaussians are binned by that window's size."""
        r, R = self.cfg.radius, resolution
        cell = 2 * r / R
        means, inv, o = self.means.float(), self.inverse_covariances().float(), self.opacities.float()
        # Window half-width: 3 standard deviations along the widest world axis (sqrt of Sigma's diagonal),
        # rounded up to one of ~12 % apart sizes so that few window shapes cover all Gaussians.
        sigma = torch.sqrt(torch.diagonal(self.covariances().float(), dim1=-2, dim2=-1).amax(-1))
        half = torch.ceil(3 * sigma / cell).clamp(min=1)
        bucket = torch.ceil(1.125 ** torch.ceil(torch.log(half) / math.log(1.125))).long()
        huge = bucket > R // 4          # windows beyond a quarter of the grid: every cell, directly
        P = int(bucket[~huge].max()) if (~huge).any() else 0
        S = R + 2 * P                   # a grid padded by the largest window: no bounds tests per pair
        grid = torch.zeros(S ** 3, device=means.device)
        centre = torch.floor((means + r) / cell).long().clamp(-P, R - 1 + P)
        centre_flat = ((centre[:, 0] + P) * S + centre[:, 1] + P) * S + centre[:, 2] + P
        # d^T A d for d = b + u (b: the window's middle cell centre minus the mean, u: the offsets) is
        # b^T A b + 2 (A b) . u + u^T A u: two matrix products per bucket instead of a 3x3 form per pair.
        pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
        quad = torch.stack([inv[:, i, j] * (1 if i == j else 2) for i, j in pairs], -1)          # (N, 6)
        for k in bucket[~huge].unique().tolist():
            ids = torch.nonzero((bucket == k) & ~huge)[:, 0]
            axis = torch.arange(-k, k + 1, device=means.device)
            offsets = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
            offset_flat = (offsets[:, 0] * S + offsets[:, 1]) * S + offsets[:, 2]
            monomials = torch.stack([(offsets[:, i] * offsets[:, j]).float() for i, j in pairs], -1) * cell ** 2
            for part in ids.split(max(chunk // len(offsets), 1)):
                b = (centre[part].float() + 0.5) * cell - r - means[part]                             # (n, 3)
                Ab = (inv[part] @ b[..., None])[..., 0]
                m = (Ab * b).sum(-1, keepdim=True) + 2 * cell * Ab @ offsets.T.float() + quad[part] @ monomials.T
                w = o[part, None] * torch.exp(-0.5 * m)                                               # (n, K)
                grid.index_add_(0, (centre_flat[part, None] + offset_flat).reshape(-1), w.reshape(-1))
        grid = grid.reshape(S, S, S)[P:P + R, P:P + R, P:P + R].contiguous()
        if huge.any():
            points = self.grid_points(R).reshape(-1, 3).to(means)
            for i in range(0, len(points), 2 ** 16):
                d = points[i:i + 2 ** 16, None] - means[huge]
                w = o[huge] * torch.exp(-0.5 * torch.einsum("pni,nij,pnj->pn", d, inv[huge], d))
                grid.view(-1)[i:i + 2 ** 16] += w.sum(-1)
        return grid.cpu()

    # ------------------------------------------------------------------ training hooks

    def param_groups(self, lr: float) -> list:
        c = self.cfg
        rates = {"means": c.position_lr, "log_scales": c.scale_lr, "quats": c.rotation_lr,
                 "opacity_logits": c.opacity_lr, "colors_dc": c.color_lr}
        return [{"params": [getattr(self, name)], "lr": rates[name], "name": name} for name in PARAMETERS]

    def position_lr_at(self, step: int) -> float:
        c = self.cfg
        t = min(max(step / c.position_lr_steps, 0.0), 1.0)
        return math.exp((1 - t) * math.log(c.position_lr) + t * math.log(c.position_lr_final))

    def after_backward(self, ctx: StepContext) -> None:
        c, step = self.cfg, ctx.step
        self._accumulate(ctx.outputs)
        ctx.optimizer.set_lr(self.means, self.position_lr_at(step))
        if c.densify_from <= step <= c.densify_until and step > 0 and step % c.densify_every == 0:
            self.densify_and_prune(ctx)
        if step > 0 and step % c.opacity_reset_every == 0:
            self.opacity_logits = ctx.optimizer.replace(self.opacity_logits,
                                                        torch.clamp(self.opacity_logits.detach(), max=math.log(0.01 / 0.99)))

    @torch.no_grad()
    def _accumulate(self, outputs: dict) -> None:
        """Add each drawn Gaussian's screen-space gradient norm (NDC units) from every render of the step."""
        for out in outputs.values():
            means2d = out.get("means2d")
            if means2d is None or means2d.grad is None or means2d.shape[1] != self.n_points:
                continue
            B, H, W = means2d.shape[0], out["opacity"].shape[1], out["opacity"].shape[2]
            g = means2d.grad * means2d.new_tensor([W / 2, H / 2]) * B
            drawn = out["radii"] > 0                                          # (B, N)
            self.grad_accum += torch.where(drawn, g.norm(dim=-1), 0.0).sum(0)
            self.grad_count += drawn.sum(0)

    @torch.no_grad()
    def densify_and_prune(self, ctx: StepContext) -> None:
        c = self.cfg
        grads = self.grad_accum / self.grad_count.clamp(min=1)
        big = self.scales.amax(-1) > c.percent_dense * c.extent
        grow = grads >= c.densify_grad_threshold
        room = c.max_points - self.n_points
        if int(grow.sum()) + int((grow & big).sum()) > room:   # keep the strongest that fit (splits add 2 rows)
            order = torch.argsort(torch.where(grow, grads, -1.0), descending=True)
            cost = torch.cumsum((1 + big[order].long()), 0)
            grow = torch.zeros_like(grow)
            grow[order[(cost <= max(room, 0))]] = True
            grow &= grads >= c.densify_grad_threshold
        clone, split = grow & ~big, grow & big
        rows = {name: getattr(self, name).detach() for name in PARAMETERS}
        new = {name: value[clone] for name, value in rows.items()}
        # Split: two Gaussians drawn from each large one, scales / (0.8 x 2), the rest copied.
        ids = torch.nonzero(split)[:, 0].repeat(2)
        sample = torch.randn(len(ids), 3, device=self.means.device) * self.scales[ids]
        split_rows = {name: value[ids] for name, value in rows.items()}
        split_rows["means"] = self.means[ids] + (quat_to_rotmat(self.quats[ids]) @ sample[..., None])[..., 0]
        split_rows["log_scales"] = self.log_scales[ids] - math.log(0.8 * 2)
        for name in PARAMETERS:
            setattr(self, name, ctx.optimizer.extend(getattr(self, name), torch.cat([new[name], split_rows[name]])))
        added = int(clone.sum()) + len(ids)
        keep = torch.cat([~split, torch.ones(added, dtype=torch.bool, device=split.device)])
        keep &= self.opacities >= c.prune_opacity
        keep &= self.scales.amax(-1) <= c.prune_scale
        for name in PARAMETERS:
            setattr(self, name, ctx.optimizer.prune(getattr(self, name), keep))
        for name in STATISTICS:
            self.register_buffer(name, torch.zeros(self.n_points, device=self.means.device))
        self.last_densify = {"step": ctx.step, "cloned": int(clone.sum()), "split": int(split.sum()),
                             "pruned": int((~keep).sum() - split.sum()), "points": self.n_points}   # not the split parents


def _neighbour_spacing(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """The root mean squared distance of each point to its k nearest others (3DGS's initial scale)."""
    out = []
    for i in range(0, len(points), chunk):
        d2 = torch.cdist(points[i:i + chunk], points) ** 2
        nearest = d2.topk(min(k + 1, len(points)), largest=False).values[:, 1:]   # without the point itself
        out.append(nearest.mean(-1) if nearest.shape[1] else torch.full((len(d2),), 1e-4))
    return torch.cat(out).clamp(min=1e-7).sqrt()
