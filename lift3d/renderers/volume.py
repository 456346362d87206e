"""Volume rendering of a geometry field over a background, in plain PyTorch (no nerfacc).

Per ray: intersect the field's box, take ``num_samples_per_ray`` stratified samples between entry
and exit (one per equal stratum, jittered when ``perturb``, stratum midpoints otherwise, which
matches 3drec's un-jittered marching), and composite:
    alpha_i = 1 - exp(-sigma_i * delta),  T_i = exp(-sum_{j<i} sigma_j * delta),  w_i = alpha_i * T_i
    comp_rgb_fg = sum w_i c_i,  opacity = sum w_i,  comp_rgb = comp_rgb_fg + (1 - opacity) * background
    depth = sum w_i t_i + (1 - opacity) * background_depth      (3drec uses 10)
with t the distance from the camera along the unit ray direction.

Empty-space skipping: once the occupancy grid (occupancy.py) is built, at step
``occ_warmup_steps`` and then every ``occ_update_every`` steps in ``update_step`` (and 1, 2, 4, ...
steps after the warm-up, while the field changes fastest), only samples in
occupied cells are kept: the field, the transmittance (a cumulative sum per ray over the kept
samples, which is the dense one since skipped samples have sigma = 0) and the sums are computed on
them alone, so the cost follows the occupied volume. Rays that miss the box cost nothing. A field that starts as
uniform fog (voxel-rf) keeps every cell occupied until training carves empty space; a hash grid
with a blob bias skips the outside of the blob from the start, as threestudio does.

Normals (``normals=True``): per-sample unit normals -grad(sigma) by central differences
(``normal_eps``; differentiable), blended by the weights over a zero "background normal" and
mapped to colours: ``comp_normal = (sum w_i n_i + 1) / 2``. So a covered pixel shows (n + 1) / 2,
an empty one 0.5, and ``comp_normal * 2 - 1`` is the opacity-weighted world normal.

The renderer references its geometry and background without registering them as child modules
(the system owns them), so their parameters are neither duplicated in the state dict nor in the
optimiser. Its only state is the occupancy grid (buffers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lift3d.cameras import Cameras
from lift3d.config import domain
from lift3d.errors import ConfigError
from lift3d.plugin import MemoryPlan, PluginModule
from lift3d.registry import register
from lift3d.renderers.occupancy import OccupancyGrid


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, radius: float, near: float = 0.0):
    """Slab test of rays (N, 3) against [-radius, radius]^3 -> t_near, t_far (N,), hit (N,) bool.

    For rays that miss, t_far == t_near (an empty interval)."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-radius - origins) / safe, (radius - origins) / safe
    t_near = torch.minimum(t0, t1).amax(-1).clamp(min=near)
    t_far = torch.maximum(t0, t1).amin(-1)
    hit = t_far > t_near
    return t_near, torch.where(hit, t_far, t_near), hit


def composite_weights(sigma: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Volume-rendering weights (N, S) from densities (N, S) and step lengths (N, S) or (N, 1)."""
    tau = sigma * delta
    # Transmittance from an exclusive cumulative sum: stabler than a cumprod of (1 - alpha).
    optical_depth = torch.cumsum(tau, dim=-1) - tau
    return (1.0 - torch.exp(-tau)) * torch.exp(-optical_depth)


def _exclusive_segment_cumsum(x: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """For x (K,) in runs of equal, non-decreasing ``segment`` ids: the sum of the earlier elements of
    each element's run (the optical depth in front of a sample of its ray). One cumulative sum over all
    runs in float64 (so that subtracting the run's start loses nothing), differentiable."""
    total = torch.cumsum(x.double(), 0) - x.double()                  # exclusive, over all runs
    first = torch.ones_like(segment, dtype=torch.bool)
    first[1:] = segment[1:] != segment[:-1]
    start = torch.cumsum(first, 0) - 1                                 # run number of each element
    return (total - total[first][start]).to(x.dtype)


GIB = 2 ** 30
NORMALS_FACTOR = 1.9     # a render with normals holds this much more for backward (hash grid: 6.0 KB a sample, not 3.2)


@dataclass
class _Parts:
    """Plain holder, so that nn.Module does not register geometry/background as children."""
    geometry: torch.nn.Module
    background: torch.nn.Module


@register("volume-renderer", "renderer")
class VolumeRenderer(PluginModule):
    @dataclass
    class Config:
        num_samples_per_ray: int = domain(128, ge=1)
        near_plane: float = domain(0.0, ge=0)       # samples start at least this far from the camera
        background_depth: float = domain(10.0, gt=0)  # depth given to the uncovered part of a pixel
        normal_eps: float = domain(0.01, gt=0)      # finite-difference step for normals (world units)
        normal_weight_threshold: float = domain(1e-4, ge=0)  # normals only where a sample's weight exceeds this
        eval_chunk_rays: int = domain(8192, ge=1)   # rays per chunk when rendering without gradients / in eval
        # Training renders of more than this many samples (rays x num_samples_per_ray) go in chunks whose
        # graph is recomputed in the backward pass (activation checkpointing): the peak memory of a step
        # stays that of one chunk whatever the resolution, at the cost of a second field forward. 0: never.
        train_chunk_samples: int = domain(2 ** 21, ge=0)
        use_occupancy_grid: bool = True
        occ_resolution: int = domain(64, ge=1)
        occ_update_every: int = domain(16, ge=1)    # steps between grid refreshes
        occ_warmup_steps: int = domain(0, ge=0)     # no skipping before this step (threestudio skips from step 0)
        occ_alpha_threshold: float = domain(0.01, ge=0, le=1)
        occ_ema_decay: float = domain(0.95, ge=0, le=1)
        occ_dilation: int = domain(1, ge=0)         # cells of dilation around occupied cells

    def __init__(self, cfg=None, geometry=None, background=None, path: str = "system.renderer"):
        super().__init__(cfg, path)
        if geometry is None or background is None:
            raise ValueError("VolumeRenderer needs geometry= and background=")
        c = self.cfg
        n_bg = getattr(background, "n_channels", None)
        if n_bg is not None and n_bg != geometry.n_feature_dims:
            raise ConfigError(f"the background has {n_bg} channels but the geometry has {geometry.n_feature_dims} "
                              f"feature channels; give the background {geometry.n_feature_dims} values")
        self._parts = _Parts(geometry, background)
        self.radius = float(geometry.cfg.radius)
        self.occupancy = OccupancyGrid(self.radius, c.occ_resolution, c.occ_alpha_threshold,
                                       c.occ_ema_decay, c.occ_dilation)
        self.stats: dict = {}   # diagnostics of the last render (fraction of samples evaluated)

    @property
    def geometry(self):
        return self._parts.geometry

    @property
    def background(self):
        return self._parts.background

    @property
    def step_size(self) -> float:
        """Nominal sample spacing: the box diagonal over the number of samples (threestudio's)."""
        return math.sqrt(3) * 2 * self.radius / self.cfg.num_samples_per_ray

    @property
    def skipping(self) -> bool:
        return self.cfg.use_occupancy_grid and bool(self.occupancy.ready)

    # ------------------------------------------------------------------ training hooks

    def update_step(self, step: int) -> None:
        c = self.cfg
        if not c.use_occupancy_grid or step < c.occ_warmup_steps:
            return
        every, since = max(c.occ_update_every, 1), step - c.occ_warmup_steps
        # Also at 1, 2, 4, 8 ... steps after the warm-up: a fresh field changes fastest in its first steps.
        early = 0 < since < every and since & (since - 1) == 0
        if step % every == 0 or early or not self.occupancy.ready:
            self.update_occupancy()

    def update_occupancy(self, jitter: bool = True) -> None:
        self.occupancy.update(self.geometry.density, self.step_size, jitter=jitter)

    # ------------------------------------------------------------------ rendering

    def forward(self, cameras: Cameras, bg_color=None, perturb: Optional[bool] = None, normals: bool = False) -> dict:
        device = next(self.geometry.parameters(), self.occupancy.occ).device
        if self.occupancy.occ.device != device:   # the grid follows its field
            self.occupancy.to(device)
        origins, dirs = cameras.to(device).rays()
        B, H, W, _ = dirs.shape
        bg = self._background(dirs, bg_color)
        perturb = self.training if perturb is None else perturb

        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        parts = [render(o[i:i + chunk], d[i:i + chunk], perturb, normals)
                 for render, chunk in [self._chunking(len(o))] for i in range(0, len(o), chunk)]
        self.stats = {"evaluated_fraction": sum(p.pop("n_evaluated") for p in parts) /
                      max(len(o) * self.cfg.num_samples_per_ray, 1)}
        ray = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

        def image(x):
            return x.view(B, H, W, -1)

        fg, opacity = image(ray["features"]), image(ray["opacity"])
        out = {
            "comp_rgb": fg + (1.0 - opacity) * bg,
            "comp_rgb_fg": fg,
            "comp_rgb_bg": bg,
            "opacity": opacity,
            "depth": image(ray["depth"]) + (1.0 - opacity) * self.cfg.background_depth,
        }
        if normals:
            out["comp_normal"] = (image(ray["normal"]) + 1.0) / 2.0
        return out

    def memory_estimate(self, plan: MemoryPlan) -> dict:
        """Activations the step's renders hold for backward: the geometry's ``bytes_per_sample`` per sample;
        a render above ``train_chunk_samples`` holds one checkpointed chunk at a time, smaller ones are held
        whole until backward. The largest stage counts."""
        S, budget = self.cfg.num_samples_per_ray, self.cfg.train_chunk_samples
        worst = 0.0
        for renders in plan.stages:
            samples = [(views * h * w * S, NORMALS_FACTOR if plan.normals and name != "reference" else 1.0)
                       for name, views, h, w in renders]
            held = sum(n * f for n, f in samples if not budget or n <= budget)
            chunk = max((min(n, budget) * f for n, f in samples if budget and n > budget), default=0)
            worst = max(worst, held + chunk)
        setting = (f"system.renderer.train_chunk_samples (now {budget})" if budget else
                   f"system.renderer.num_samples_per_ray (now {S}) or set train_chunk_samples")
        return {"render": (worst * self.geometry.bytes_per_sample / GIB, setting)}

    def _chunking(self, n_rays: int):
        """(how to render a chunk of rays, rays per chunk) for this render."""
        if not torch.is_grad_enabled():
            return self.render_rays, max(self.cfg.eval_chunk_rays, 1)
        budget = self.cfg.train_chunk_samples
        if not budget or n_rays * self.cfg.num_samples_per_ray <= budget:
            return self.render_rays, max(n_rays, 1)
        from torch.utils.checkpoint import checkpoint

        def recomputed(*args):  # the same samples again in backward: checkpoint restores the RNG state
            return checkpoint(self.render_rays, *args, use_reentrant=False)

        return recomputed, max(budget // self.cfg.num_samples_per_ray, 1)

    def render_rays(self, origins: torch.Tensor, dirs: torch.Tensor, perturb: bool, normals: bool = False) -> dict:
        """Composite rays (N, 3) -> features (N, C), opacity (N, 1), depth (N, 1) without background
        terms, normal (N, 3) when asked, and n_evaluated (number of field queries).

        Only rays that cross the box are marched, and once the occupancy grid is built only their
        samples in occupied cells are kept: everything after the occupancy test (points, field,
        transmittance, sums) is computed on the kept samples alone, so a step costs what the occupied
        space costs. Skipped samples have sigma = 0, so the result is that of the dense (N, S) march."""
        geometry, S = self.geometry, self.cfg.num_samples_per_ray
        n, C, device = len(origins), geometry.n_feature_dims, origins.device
        t_near, t_far, hit = ray_aabb(origins, dirs, self.radius, self.cfg.near_plane)
        rays = hit.nonzero().squeeze(1)                                            # (M,) rays through the box
        o, d, t0 = origins[rays], dirs[rays], t_near[rays]
        delta = (t_far[rays] - t0) / S                                             # (M,)
        m = len(rays)
        offset = torch.rand(m, S, device=device) if perturb else torch.full((m, S), 0.5, device=device)
        t = torch.addcmul(t0[:, None], torch.arange(S, device=device) + offset, delta[:, None])   # (M, S)

        if self.skipping:
            keep = self.occupancy.occupied_along(o, d, t).view(-1)
            index = keep.nonzero().squeeze(1)             # kept samples, grouped by ray, in ray order
            local = torch.div(index, S, rounding_mode="floor")                   # their ray in 0..M-1
            t = t.view(-1)[index]
            points = torch.addcmul(o[local], t[:, None], d[local])
            field = geometry(points)
            sigma = field["density"].to(points.dtype)
            tau = sigma * delta[local]
            weights = (1.0 - torch.exp(-tau)) * torch.exp(-_exclusive_segment_cumsum(tau, local))
        else:
            local = torch.arange(m, device=device).repeat_interleave(S)
            points = torch.addcmul(o[:, None, :], t[..., None], d[:, None, :]).view(-1, 3)
            field = geometry(points)
            sigma = field["density"].to(points.dtype)
            weights = composite_weights(sigma.view(m, S), delta[:, None]).view(-1)
            t = t.view(-1)
        ray = rays[local]                                                          # sample -> ray in 0..N-1
        zeros = points.new_zeros(n, 1)
        out = {
            "features": points.new_zeros(n, C).index_add(0, ray, weights[:, None] * field["features"].to(points.dtype)),
            "opacity": zeros.index_add(0, ray, weights[:, None]),
            "depth": zeros.index_add(0, ray, (weights * t)[:, None]),
            "n_evaluated": len(points),
        }
        if normals:
            # Only samples that show: a normal costs six more density queries.
            visible = weights.detach() > self.cfg.normal_weight_threshold
            nrm = geometry.normal(points[visible], self.cfg.normal_eps).to(points.dtype)
            out["normal"] = points.new_zeros(n, 3).index_add(0, ray[visible], weights[visible, None] * nrm)
        return out

    def _background(self, dirs: torch.Tensor, bg_color) -> torch.Tensor:
        B, H, W, _ = dirs.shape
        C = self.geometry.n_feature_dims
        if bg_color is None:
            return self.background(dirs)
        bg = torch.as_tensor(bg_color, dtype=dirs.dtype, device=dirs.device)
        if bg.shape[-1] != C:
            raise ValueError(f"bg_color has {bg.shape[-1]} channels but the geometry renders {C}")
        return bg.expand(B, H, W, C)
