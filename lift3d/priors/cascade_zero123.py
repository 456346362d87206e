"""``cascade-zero123``: the Cascade-Zero123 refiner as a prior (see lift3d/zero123/cascade.py).

At ``prepare`` the base model (``pretrained_model_name_or_path``, the same key and meaning as in the
``zero123`` prior) generates the self-prompts once by DDIM, cached in the trial folder
(``save/self_prompts/``) and in a shared cache (``prompt_cache_dir``; default ``$LIFT3D_CACHE_DIR`` or
``~/.cache/lift3d``, ``none`` to disable); see ``self_prompts.py``. The refiner
(``refiner_name_or_path``) then predicts the noise, with the reference view and the self-prompts as
its context.

The coarse-target token (``coarse_token``):
- ``none``: a zero embedding (what the refiner sees when the token is dropped in training);
- ``render``: the CLIP embedding of the current render of the guidance view;
- ``estimate``: the base model's one-step estimate x̂₀ of the same noisy latent (one more UNet call
  per step; keeps the base loaded).

With several photos each has its own self-prompts and refiner condition, and each guidance view is refined
with its nearest photo's (as the ``zero123`` prior conditions on it); the self-prompts of the second and later
photos are cached in the trial folder under ``save/self_prompts/photo<N>/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lift3d.config import Domain, domain
from lift3d.data.reference import reference_list
from lift3d.errors import ConfigError, UserError
from lift3d.priors import self_prompts
from lift3d.priors.zero123 import ASSETS, BUNDLED_MODEL, Zero123Prior, check_choice, resolve_model_path
from lift3d.registry import register
from lift3d.utils.images import resize

BUNDLED_REFINER = os.path.join(ASSETS, "cascade-mini-refiner")
COARSE_TOKENS = ("none", "render", "estimate")
NEARBY = Domain(length=3)        # one self-prompt view: [Δelevation°, Δazimuth°, Δdistance]


@register("cascade-zero123", "prior")
class CascadeZero123Prior(Zero123Prior):
    @dataclass
    class Config(Zero123Prior.Config):
        # pretrained_model_name_or_path is the *base* model (empty: the bundled mini).
        refiner_name_or_path: str = ""         # empty: the bundled mini refiner (needs the bundled base)
        nearby_views: Optional[list] = None    # [[Δelev°, Δazim°, Δdist], ...]; None: the refiner's cascade.json
        prompt_steps: int = domain(50, ge=1, le=1000)  # DDIM steps of the self-prompts (eta 0)
        prompt_scale: float = domain(3.0, ge=0)        # their CFG scale (the paper: 3.0)
        prompt_cache_dir: str = ""             # "": $LIFT3D_CACHE_DIR or ~/.cache/lift3d; "none": trial folder only
        coarse_token: str = "none"             # none | render | estimate (module docstring)

    def __init__(self, cfg: Any = None, path: str = "system.guidance.prior"):
        super().__init__(cfg, path)
        check_choice(path, "coarse_token", self.cfg.coarse_token, COARSE_TOKENS)
        if self.cfg.pose_variant != "zero123":
            raise ConfigError(f"{path}.pose_variant: Cascade-Zero123 refiners use the zero123 pose vector")
        views = self.cfg.nearby_views
        if views is not None and (not views or any(NEARBY.problem(list(v)) for v in views)):
            raise ConfigError(f"{path}.nearby_views must be a list of [Δelevation°, Δazimuth°, Δdistance] triples, "
                              f"got {views}")
        self.base = None

    def weight_paths(self) -> list:
        base = super().weight_paths()
        return base + [self.cfg.refiner_name_or_path or BUNDLED_REFINER]

    # ------------------------------------------------------------------ set-up

    def refiner_path(self, base_path: str) -> str:
        if self.cfg.refiner_name_or_path:
            return self.cfg.refiner_name_or_path
        if os.path.abspath(base_path) != os.path.abspath(BUNDLED_MODEL):
            raise UserError("cascade-zero123 with your own base model needs its refiner: set "
                            "system.guidance.refiner_name_or_path=PATH (train one with lift3d train-cascade)")
        if not os.path.isdir(BUNDLED_REFINER):
            raise UserError("the bundled refiner lift3d/assets/cascade-mini-refiner is not installed; set "
                            "system.guidance.refiner_name_or_path=PATH")
        return BUNDLED_REFINER

    def load_dtype(self, device: torch.device) -> torch.dtype:
        return super().load_dtype(device) if device.type == "cuda" else torch.float32

    def prepare(self, reference, context) -> None:
        from lift3d.zero123.cascade import CascadeLayout

        self.context = context
        device = torch.device(context.device)
        base_path = resolve_model_path(self.cfg.pretrained_model_name_or_path)
        refiner_path = self.refiner_path(base_path)
        layout = CascadeLayout.load(refiner_path, required=True)    # a plain Zero123 folder is refused
        self.base = self.load_model(base_path, device)
        self.model = self.load_model(refiner_path, device)
        if self.model.image_size != self.base.image_size:
            raise UserError(f"the refiner takes {self.model.image_size} px images but the base "
                            f"{self.base.image_size} px; pair a refiner with the base it was trained from")
        offsets = self.cfg.nearby_views or layout.nearby
        self.set_reference(reference)
        prompts = [self.self_prompts(r, offsets, base_path, photo=i) for i, r in enumerate(self.photos)]
        self.prompt_images, self.prompt_views = prompts[0]
        self.other_prompts = prompts[1:]
        self.refresh_condition()
        if self.cfg.coarse_token == "estimate":
            self.base_conditions = [self.base.encode_condition(self.reference_image(r).to(device)) for r in self.photos]
            self.base_condition = self.base_conditions[0]
        else:
            self.base = None  # only the self-prompts needed it: free its memory

    def set_reference(self, reference) -> None:
        super().set_reference(reference)
        self.photos = reference_list(reference)
        self.reference = self.photos[0]

    def reference_view(self, reference=None) -> torch.Tensor:
        return (self.reference_camera if reference is None else reference.camera).spherical[0].cpu()

    def refresh_condition(self) -> None:
        from lift3d.zero123.cascade import encode_cascade_condition

        prompts = [(self.prompt_images, self.prompt_views)] + list(getattr(self, "other_prompts", []))
        self.cascades = [encode_cascade_condition(self.model, self.reference_image(r).to(self.model.device),
                                                  self.reference_view(r), images.to(self.model.device), views)
                         for r, (images, views) in zip(self.photos, prompts)]
        self.cascade = self.cascades[0]

    def self_prompts(self, reference, offsets, base_path: str, photo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's views at the nearby offsets of photo ``photo``, generated once (see self_prompts.py)."""
        from lift3d.zero123.cascade import generate_prompts, nearby_views, weights_fingerprint

        image, view = self.reference_image(reference), self.reference_view(reference)
        seed = int(getattr(self.context, "seed", 0))
        meta = {"base_model": base_path, "base_weights": weights_fingerprint(self.base),
                "image_sha256": self_prompts.image_digest(image),
                "input_view": [round(float(v), 4) for v in view], "offsets": [list(map(float, o)) for o in offsets],
                "steps": self.cfg.prompt_steps, "scale": self.cfg.prompt_scale, "seed": seed}
        trial = os.path.join(self.context.trial_dir, "save", "self_prompts", *([f"photo{photo + 1}"] if photo else [])) \
            if self.context.trial_dir else None
        shared = None if self.cfg.prompt_cache_dir == "none" else \
            os.path.join(self.cfg.prompt_cache_dir or self_prompts.default_cache_dir(), self_prompts.cache_key(meta))

        def generate():
            self_prompts.log.info("self-prompts: generating %d views with the base model (%d DDIM steps)",
                                  len(offsets), self.cfg.prompt_steps)
            return generate_prompts(self.base, image.to(self.base.device), view, offsets,
                                    self.cfg.prompt_steps, self.cfg.prompt_scale, seed)

        images = self_prompts.cached_prompts(meta, len(offsets), [trial, shared], generate)
        return images, nearby_views(view, offsets)

    def validation_images(self) -> list:
        """The self-prompts (H, W, 3), shown after the validation renders (every photo's)."""
        images = [self.prompt_images] + [p for p, _ in getattr(self, "other_prompts", [])]
        return [img.permute(1, 2, 0) for batch in images for img in batch]

    # ------------------------------------------------------------------ per step

    def coarse_embedding(self, noisy: torch.Tensor, t, cameras, render: dict) -> Optional[torch.Tensor]:
        from lift3d.zero123.cascade import embed

        mode = self.cfg.coarse_token
        if mode == "none":
            return None
        if mode == "render":
            x = render["comp_rgb"].detach()
            if x.shape[-1] == 4:
                x = self.decode(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            image = x.permute(0, 3, 1, 2).float()
        else:  # the base's one-step estimate of the clean latent
            a = self.base.alphas_cumprod[torch.as_tensor(t, device=self.base.device).reshape(-1)].view(-1, 1, 1, 1)
            condition, pick = self.base_condition, self.nearest(cameras)
            if pick is not None:      # several photos: each view's nearest photo's, as condition_for
                from lift3d.zero123.model import Zero123Condition

                condition = Zero123Condition(torch.cat([self.base_conditions[k].embedding for k in pick.tolist()]),
                                             torch.cat([self.base_conditions[k].latent for k in pick.tolist()]))
            eps = self.base.predict_noise(noisy, t, condition, self.poses(cameras), self.cfg.prompt_scale)
            x0 = (noisy.float() - (1 - a).sqrt() * eps) / a.sqrt()
            image = self.base.decode(x0)
        return embed(self.model, resize(image, self.image_size).clamp(0, 1))

    @property
    def denoiser(self) -> torch.nn.Module:
        # The refiner's context is the reference, the coarse target and the self-prompts, not one pose.
        raise UserError("method vsd needs a single-condition prior (zero123: Zero123, Stable-Zero123); the "
                        "cascade-zero123 refiner is distilled with sds or sjc")

    def noise_chunk(self, noisy, t, cameras, guidance_scale, render) -> torch.Tensor:
        from lift3d.zero123.cascade import refiner_noise

        coarse = self.coarse_embedding(noisy, t, cameras, render)
        pick = self.nearest(cameras)
        if pick is None:
            return refiner_noise(self.model, noisy, t, self.cascade, cameras.spherical, guidance_scale, coarse)
        # Several photos: the views of each photo in one pass with its condition, put back in their order.
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(len(noisy))
        targets, out = cameras.spherical, None
        for k in pick.unique().tolist():
            rows = torch.nonzero(pick == k).reshape(-1)
            eps = refiner_noise(self.model, noisy[rows.to(noisy.device)], t[rows.to(t.device)], self.cascades[k],
                                targets[rows.to(targets.device)], guidance_scale,
                                None if coarse is None else coarse[rows.to(coarse.device)])
            out = eps.new_empty((len(noisy),) + eps.shape[1:]) if out is None else out
            out[rows.to(out.device)] = eps
        return out
