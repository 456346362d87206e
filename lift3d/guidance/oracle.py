"""The multiview oracle: a "perfect" guidance that shows the field the ground-truth mesh.

Instead of asking a diffusion model what a novel view should look like, it ray-casts the
ground-truth mesh at the same cameras and penalises the difference. A run with this guidance
measures everything *except* the diffusion prior: the field, renderer, optimiser and mesh
export. If it cannot reach a good Chamfer distance, no diffusion model will.

The mesh must be in the run's world frame. With ``normalize: true`` (default) it is scaled to
a longest side of 1 and centred (:func:`lift3d.mesh.normalize_mesh`), which is the frame of
reference images rendered from the normalised mesh (``foreground_ratio: null`` then keeps the
camera exact; see ``examples/README.md``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from lift3d.config import C, domain, schedulable
from lift3d.errors import UserError
from lift3d.guidance.base import BaseGuidance, GuidanceContext
from lift3d.registry import register


@register("multiview-oracle", "guidance")
class MultiviewOracle(BaseGuidance):
    @dataclass
    class Config:
        mesh_path: str = ""              # empty: the run's ground-truth mesh (gt=PATH)
        normalize: bool = True           # longest side 1, centred at the origin
        mask_weight: Any = schedulable(1.0, ge=0)
        # L1 on the expected ray distance where the ground truth is covered, relative to the true
        # distance. Colour and mask alone cannot tell a hollow from a filled concavity of the same
        # colour (the inside of a cup); the depth of a multi-view RGB-D render can.
        depth_weight: Any = schedulable(0.0, ge=0)
        shading: str = "lambert"         # albedo | lambert (fixed world light, view-independent)
        samples_per_pixel: int = domain(1, ge=1)  # k*k rays per pixel for antialiased edges
        cache_views: int = domain(64, ge=0)       # ground-truth renders kept for repeated cameras (0: none)

    render_space = "rgb"

    def __init__(self, cfg: Any = None, path: str = "system.guidance"):
        super().__init__(cfg, path)
        if self.cfg.shading not in ("albedo", "lambert"):
            raise UserError(f"{path}.shading must be 'albedo' or 'lambert', got '{self.cfg.shading}'")
        k = int(round(self.cfg.samples_per_pixel ** 0.5))
        if self.cfg.samples_per_pixel < 1 or k * k != self.cfg.samples_per_pixel:
            raise UserError(f"{path}.samples_per_pixel must be a square number (1, 4, 9, ...)")
        self._cache: OrderedDict = OrderedDict()

    def prepare(self, reference, context: GuidanceContext) -> None:
        from lift3d.mesh import MeshRaycaster, load_mesh

        super().prepare(reference, context)
        path = self.cfg.mesh_path or context.gt_mesh
        if not path:
            raise UserError("the multiview-oracle guidance needs a mesh: pass gt=PATH or set system.guidance.mesh_path")
        self.mesh = load_mesh(path, normalize=self.cfg.normalize)
        self.raycaster = MeshRaycaster(self.mesh)

    @torch.no_grad()
    def ground_truth(self, cameras) -> torch.Tensor:
        """(B, H, W, 5) ground truth at ``cameras`` (CPU): straight-alpha RGBA and the ray distance
        to the first hit (0 where empty); cached per camera."""
        views = []
        for i in range(len(cameras)):
            camera = cameras[i].to("cpu")
            key = (camera.c2w.numpy().tobytes(), camera.fovy_deg.numpy().tobytes(), camera.height, camera.width)
            view = self._cache.get(key)
            if view is None:
                out = self.raycaster.render(camera, shading=self.cfg.shading,
                                            samples_per_pixel=self.cfg.samples_per_pixel)
                view = torch.cat([out["rgba"][0], out["depth"][0, ..., None]], -1)
                if self.cfg.cache_views > 0:
                    self._cache[key] = view
                    while len(self._cache) > self.cfg.cache_views:
                        self._cache.popitem(last=False)  # least recently used
            else:
                self._cache.move_to_end(key)
            views.append(view)
        return torch.stack(views)

    def __call__(self, render: dict, cameras, step: int) -> dict:
        if not hasattr(self, "raycaster"):
            raise RuntimeError("MultiviewOracle.prepare() must be called before the guidance is used")
        rgb, opacity = render["comp_rgb"], render["opacity"]
        if rgb.shape[-1] != 3:
            raise UserError("the multiview-oracle guidance compares RGB renders; set system.geometry.n_feature_dims=3")
        gt = self.ground_truth(cameras).to(rgb.device, rgb.dtype)
        if gt.shape[1:3] != rgb.shape[1:3]:
            raise ValueError(f"render is {tuple(rgb.shape[1:3])} but the cameras are {tuple(gt.shape[1:3])}")
        alpha = gt[..., 3:4]
        background = _background_like(render.get("comp_rgb_bg"), rgb)
        target = gt[..., :3] * alpha + background.detach() * (1 - alpha)
        loss_rgb = torch.mean((rgb - target) ** 2)
        loss_mask = torch.mean((opacity.reshape(alpha.shape) - alpha) ** 2)
        loss = loss_rgb + C(self.cfg.mask_weight, step) * loss_mask
        out = {"oracle_psnr": -10 * torch.log10(loss_rgb.detach().clamp_min(1e-10)),
               "oracle_mask_mse": loss_mask.detach()}
        depth_weight = C(self.cfg.depth_weight, step)
        if depth_weight > 0:
            if "depth" not in render:
                raise UserError("system.guidance.depth_weight > 0 needs a renderer that outputs depth")
            covered = (alpha[..., 0] > 0.5) & (gt[..., 4] > 0)
            depth = render["depth"].reshape(covered.shape)
            rel = (depth - gt[..., 4]).abs() / gt[..., 4].clamp_min(1e-6)
            loss_depth = rel[covered].mean() if covered.any() else rel.sum() * 0
            loss = loss + depth_weight * loss_depth
            out["oracle_depth_rel"] = loss_depth.detach()
        out["loss_guidance"] = loss
        return out


def _background_like(background, rgb: torch.Tensor) -> torch.Tensor:
    """The renderer's background as a tensor that broadcasts against ``rgb`` (B, H, W, 3); white if absent."""
    if background is None:
        return torch.ones_like(rgb)
    background = torch.as_tensor(background, device=rgb.device, dtype=rgb.dtype)
    if background.dim() == 1:                      # one colour (3,)
        return background.view(1, 1, 1, -1).expand_as(rgb)
    if background.dim() == 2:                      # one colour per view (B, 3)
        return background[:, None, None, :].expand_as(rgb)
    return background.expand_as(rgb)               # an image (B, H, W, 3) or (1, H, W, 3)
