"""``multiview``: generate-then-reconstruct over any prior that can sample views.

The prior generates K views of the object once (``prior.generate``: DDIM, one seed per view, the
configured CFG scale) at cameras on rings around the input: ``rings`` lists [elevation offset from the
input's, number of views], spread evenly in azimuth from the input's (the input's own view is left out);
a multi-view prior with views of its own (``prior.fixed_views``: Zero123++'s six) generates those instead.
With several photos the rings go round the first, and a ring view within ``photo_clearance_deg`` of another
photo's camera is not generated: that photo already shows that side.
They are cached in the trial folder (``save/generated/``: one PNG per view and ``generated.json`` with the
cameras and settings) and reused on resume when the settings match.

The field fits them through the ``losses(ctx)`` hook: each step ``views_per_step`` of them are rendered on
the prior's background (white; Zero123++: gray) and compared with the generated images (``loss_views_rgb``)
and with their silhouettes, the pixels that differ from that background (``loss_views_mask``), weighted by ``system.loss.lambda_views_rgb`` /
``lambda_views_mask`` (by default 10x under the mini recipe's reference view). With ``method_type`` (sds,
sjc), score distillation keeps running on the random views at ``lambda_guidance``; null (the default) turns it off.
With ``refresh_every: N`` the views are regenerated every N steps from the field's renders of them by SDEdit
at ``refresh_strength`` (a schedule allowed), as DreamGaussian's second stage refines its texture.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lift3d.cameras import Cameras
from lift3d.config import C, domain, schedulable
from lift3d.data.reference import direction_cosines, reference_list
from lift3d.errors import ConfigError, UserError
from lift3d.guidance.base import GuidanceContext
from lift3d.guidance.distillation import ScoreDistillation
from lift3d.registry import register
from lift3d.utils import io
from lift3d.utils.images import resize

BACKGROUND_TOLERANCE = 0.03    # a generated pixel this close to white in every channel is background


def ring_cameras(reference: Cameras, rings: list, with_rings: bool = False):
    """Cameras on ``rings`` ([elevation offset, count], ...) around the reference view's centre, at its
    distance and field of view; each ring evenly in azimuth from the reference's, without the reference.
    ``with_rings``: also each camera's ring index (a list)."""
    elevation, azimuth, distance = (float(v) for v in reference.spherical[0])
    views, ring_of = [], []
    for ring, (offset, count) in enumerate(rings):
        for k in range(int(count)):
            if offset == 0 and k == 0:
                continue
            views.append(Cameras.from_spherical(elevation + offset, azimuth + 360.0 * k / count, distance,
                                                float(reference.fovy_deg[0]), reference.height, reference.width))
            ring_of.append(ring)
    return (Cameras.cat(views), ring_of) if with_rings else Cameras.cat(views)


def near_photos(cameras: Cameras, photos: list, degrees: float) -> torch.Tensor:
    """(B,) bool: the cameras that look from within ``degrees`` of one of the ``photos``' cameras' directions
    (seen from the origin)."""
    if degrees <= 0 or not photos:
        return torch.zeros(len(cameras), dtype=torch.bool)
    cosines = direction_cosines(cameras, Cameras.cat([p.with_size(1, 1) for p in photos]))
    return (cosines.clamp(-1, 1) >= math.cos(math.radians(degrees))).any(-1).cpu()


@register("multiview", "guidance")
class MultiviewGuidance(ScoreDistillation):
    @dataclass
    class Config(ScoreDistillation.Config):
        method_type: Optional[str] = None      # null | sds | sjc: score distillation beside the views
        rings: list = field(default_factory=lambda: [[0.0, 8], [30.0, 4], [-20.0, 4]])
        sample_steps: int = domain(50, ge=1, le=1000)  # DDIM steps of each generated view
        sample_scale: float = domain(3.0, ge=0)  # their classifier-free guidance scale
        sample_eta: float = domain(1.0, ge=0)
        seed: int = domain(0, ge=0, lt=2 ** 32)  # view i is drawn with seed + i
        views_per_step: int = domain(2, ge=1)
        render_size: int = domain(0, ge=0)     # pixels a side of the fitted renders; 0: the prior's image size
        refresh_every: int = domain(0, ge=0)   # regenerate the views from the field's renders (SDEdit); 0: never
        refresh_strength: Any = schedulable(0.5, ge=0, le=1)
        photo_clearance_deg: float = domain(20.0, ge=0, le=180)  # with several photos: no ring view this close
                                                                  # to another photo (the photo shows that side)

    loss_defaults = {"views_rgb": 100.0, "views_mask": 100.0}

    def build(self, method_type, method_cfg, method_path, prior_type, prior_cfg, prior_path, path) -> None:
        c = self.cfg
        if not c.rings or any(len(r) != 2 or int(r[1]) < 1 for r in c.rings):
            raise ConfigError(f"{path}.rings must be a list of [elevation offset, number of views >= 1], got {c.rings}")
        for key in ("sample_steps", "views_per_step"):
            if getattr(c, key) < 1:
                raise ConfigError(f"{path}.{key} must be at least 1, got {getattr(c, key)}")
        if c.refresh_every < 0 or c.render_size < 0:
            raise ConfigError(f"{path}.refresh_every and {path}.render_size must be >= 0")
        super().build(method_type or "sds", method_cfg, method_path, prior_type, prior_cfg, prior_path, path)
        self.distils = method_type is not None

    # ------------------------------------------------------------------ the generated views

    def prepare(self, reference, context: GuidanceContext) -> None:
        super().prepare(reference, context)
        photos = reference_list(reference)
        primary = photos[0].camera
        fixed = self.prior.fixed_views(primary)      # a multi-view prior's own views (Zero123++), else the rings
        self.fixed = fixed is not None
        if self.fixed:
            self.cameras, self.ring_of = fixed, [0] * len(fixed)
        else:                                        # around the primary photo, clear of the others
            cameras, ring_of = ring_cameras(primary, self.cfg.rings, with_rings=True)
            keep = ~near_photos(cameras, [p.camera for p in photos[1:]], self.cfg.photo_clearance_deg)
            if not keep.any():
                raise ConfigError(f"system.guidance.rings: every ring view lies within {self.cfg.photo_clearance_deg}° "
                                  "of a photo; add views or lower system.guidance.photo_clearance_deg")
            self.cameras = cameras[keep.nonzero()[:, 0]]
            self.ring_of = [r for r, k in zip(ring_of, keep.tolist()) if k]
        self.folder = os.path.join(context.trial_dir, "save", "generated") if context.trial_dir else None
        self.images = self._cached() if self.folder else None
        if self.images is None:
            seeds = [self.cfg.seed + i for i in range(len(self.cameras))]
            self.images = self.prior.generate(self.cameras.to(context.device), seeds, self.cfg.sample_steps,
                                              self.cfg.sample_scale, self.cfg.sample_eta)
            self._save(step=0)
        self.gt_mesh = context.gt_mesh
        if self.gt_mesh:
            self.against_gt = self.score_against(self.gt_mesh)

    def score_against(self, mesh_path: str) -> dict:
        """How good the generated views are: each against the ground truth's albedo render at its camera
        (whole images on white; silhouettes: the views' non-white pixels), written to ``generated.json``.
        This is the ceiling a field fitted to them can reach."""
        from lift3d.evaluation.appearance import compare_views, render_albedo
        from lift3d.mesh import load_mesh

        size = self.images.shape[-1]
        gt = render_albedo(load_mesh(mesh_path, normalize=True), self.cameras.with_size(size, size).to("cpu"))
        rows = []
        for image, target in zip(self.images.permute(0, 2, 3, 1), gt):
            alpha = ((image - self.prior.background).abs().amax(-1, keepdim=True) > BACKGROUND_TOLERANCE).float()
            rows.append(compare_views(torch.cat([image, alpha], -1), target))
        scores = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr_image", "ssim", "silhouette_iou")}
        if self.folder:
            record = io.read_json_if_any(os.path.join(self.folder, "generated.json")) or {}
            io.write_json(os.path.join(self.folder, "generated.json"), {**record, "against_gt": scores})
        return scores

    def _meta(self) -> dict:
        c = self.cfg
        return {"rings": [list(r) for r in c.rings], "sample_steps": c.sample_steps, "sample_scale": c.sample_scale,
                "sample_eta": c.sample_eta, "seed": c.seed, "prior": dict(self.cfg.prior or {}),
                "cameras": self.cameras.spherical.tolist()}

    def _cached(self) -> Optional[torch.Tensor]:
        """The views of an earlier run of this trial with the same settings (a resume), else None."""
        from lift3d.utils.images import load_image

        record = io.read_json_if_any(os.path.join(self.folder, "generated.json"))
        if not record or record.get("meta") != json.loads(json.dumps(self._meta())):
            return None
        paths = [os.path.join(self.folder, f"view_{i:02d}.png") for i in range(len(self.cameras))]
        if not all(os.path.isfile(p) for p in paths):
            return None
        return torch.cat([load_image(p) for p in paths])

    def _save(self, step: int) -> None:
        if not self.folder:
            return
        for i, image in enumerate(self.images):
            io.save_image(os.path.join(self.folder, f"view_{i:02d}.png"), image.permute(1, 2, 0))
        record = {"meta": self._meta(), "step": step}
        if getattr(self, "against_gt", None):
            record["against_gt_at_step_0"] = self.against_gt
        io.write_json(os.path.join(self.folder, "generated.json"), record)

    # ------------------------------------------------------------------ hooks

    def __call__(self, render: dict, cameras, step: int) -> dict:
        if self.distils:
            return super().__call__(render, cameras, step)
        return {"loss_guidance": render["comp_rgb"].sum() * 0.0}

    def losses(self, ctx) -> dict:
        c = self.cfg
        if c.refresh_every and ctx.step > 0 and ctx.step % c.refresh_every == 0:
            self.refresh(ctx)
        pick = torch.randperm(len(self.cameras))[:c.views_per_step]
        size = c.render_size or self.images.shape[-1]
        out = ctx.render(self.cameras[pick].with_size(size, size), bg_color=self._background())
        if out["comp_rgb"].shape[-1] != 3:
            raise UserError("guidance multiview fits RGB renders; a latent field (n_feature_dims=4) cannot use it")
        target = resize(self.images[pick], size).permute(0, 2, 3, 1).to(out["comp_rgb"])
        mask = ((target - self.prior.background).abs().amax(-1, keepdim=True) > BACKGROUND_TOLERANCE).to(target)
        terms = {"views_rgb": F.mse_loss(out["comp_rgb"], target), "views_mask": F.mse_loss(out["opacity"], mask)}
        return {**terms, **(super().losses(ctx) if self.distils else {})}   # a distilling method's own (VSD)

    def _background(self) -> torch.Tensor:
        """The prior's background colour (white, or Zero123++'s gray), behind the fitted renders."""
        return torch.full((3,), float(self.prior.background))

    @torch.no_grad()
    def refresh(self, ctx) -> None:
        """SDEdit: the generated views again, from the field's renders of them."""
        size = self.images.shape[-1]
        renders = ctx.render(self.cameras.with_size(size, size), bg_color=self._background())["comp_rgb"]
        seeds = [self.cfg.seed + ctx.step + i for i in range(len(self.cameras))]
        init = renders.permute(0, 3, 1, 2).clamp(0, 1)
        self.images = self.prior.generate(self.cameras.to(init.device), seeds, self.cfg.sample_steps,
                                          self.cfg.sample_scale, self.cfg.sample_eta, init=init,
                                          strength=C(self.cfg.refresh_strength, ctx.step))
        self._save(step=ctx.step)
        if self.gt_mesh:      # how good the refreshed views are ("against_gt"; step 0's stays beside it)
            self.score_against(self.gt_mesh)

    def validation_images(self) -> list:
        return list(self.images.permute(0, 2, 3, 1)) + super().validation_images()

    def summary_rows(self) -> list:
        """The generated views, a ring per row, each titled with its camera."""
        images, spherical = self.images.permute(0, 2, 3, 1), self.cameras.spherical
        if self.fixed:   # the prior's own views: one row
            return [[("generated", None)] + [(f"el {spherical[i, 0]:.0f} az {spherical[i, 1] % 360:.0f}", images[i])
                                             for i in range(len(images))]]
        rows = []
        for ring, (offset, _) in enumerate(self.cfg.rings):
            row = [(f"generated {offset:+g}°", None)]
            row += [(f"el {spherical[i, 0]:.0f} az {spherical[i, 1] % 360:.0f}", images[i])
                    for i, r in enumerate(self.ring_of) if r == ring]
            rows.append(row)
        return rows
