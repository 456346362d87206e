"""``cascade-zero123``: SJC or SDS scored by a Cascade-Zero123 refiner (see lift3d/zero123/cascade.py).

At ``prepare`` the base model (``pretrained_model_name_or_path``, the same key and meaning as in
``zero123-sjc``) generates the self-prompts once by DDIM. They are cached by input image, base
weights, views, sampler settings and seed: in the trial folder (``save/self_prompts/``, so a resume
reuses them) and in a shared cache (``prompt_cache_dir``; default ``$LIFT3D_CACHE_DIR`` or
``~/.cache/lift3d``, ``none`` to disable) so a re-run of the same input does not regenerate them.
The refiner (``refiner_name_or_path``) then replaces the base as the score model; everything else
(noise levels, CFG, SJC/SDS maths, render spaces) is shared with the other Zero123 guidances, so
swapping ``system.guidance_type`` from ``zero123-sjc`` is the only change needed.

The coarse-target token (``coarse_token``):
- ``none``: a zero embedding (what the refiner sees when the token is dropped in training);
- ``render``: the CLIP embedding of the current render of the guidance view;
- ``estimate``: the base model's one-step estimate x̂₀ of the same noisy latent (one more UNet call
  per step; keeps the base loaded).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lift3d.config import schedulable
from lift3d.errors import ConfigError, UserError
from lift3d.guidance.zero123_common import BUNDLED_MODEL, DTYPES, Zero123GuidanceBase, resolve_model_path
from lift3d.registry import register
from lift3d.utils import io

log = logging.getLogger(__name__)

BUNDLED_REFINER = os.path.join(os.path.dirname(BUNDLED_MODEL), "cascade-mini-refiner")
COARSE_TOKENS = ("none", "render", "estimate")


def default_cache_dir() -> str:
    root = os.environ.get("LIFT3D_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lift3d")
    return os.path.join(root, "self_prompts")


@register("cascade-zero123")
class CascadeZero123(Zero123GuidanceBase):
    @dataclass
    class Config(Zero123GuidanceBase.Config):
        # pretrained_model_name_or_path is the *base* model, as in zero123-sjc (empty: the bundled mini).
        refiner_name_or_path: str = ""         # empty: the bundled mini refiner (needs the bundled base)
        method: str = "sjc"                    # sjc | sds: the score-distillation maths of zero123-sjc / -sds
        guidance_scale: float = 100.0
        min_step_percent: Any = schedulable(0.01)
        max_step_percent: Any = schedulable(0.969)
        var_red: bool = True                   # SJC only (PAAS)
        nearby_views: Optional[list] = None    # [[Δelev°, Δazim°, Δdist], ...]; None: the refiner's cascade.json
        prompt_steps: int = 50                 # DDIM steps of the self-prompts (eta 0)
        prompt_scale: float = 3.0              # their CFG scale (the paper: 3.0)
        prompt_cache_dir: str = ""             # "": $LIFT3D_CACHE_DIR or ~/.cache/lift3d; "none": trial folder only
        coarse_token: str = "none"             # none | render | estimate (module docstring)

    def __init__(self, cfg: Any = None, path: str = ""):
        super().__init__(cfg, path)
        where = path or "guidance"
        if self.cfg.method not in ("sjc", "sds"):
            raise ConfigError(f"{where}.method is '{self.cfg.method}'; use sjc or sds")
        if self.cfg.coarse_token not in COARSE_TOKENS:
            raise ConfigError(f"{where}.coarse_token is '{self.cfg.coarse_token}'; use one of {', '.join(COARSE_TOKENS)}")
        if self.cfg.pose_variant != "zero123":
            raise ConfigError(f"{where}.pose_variant: Cascade-Zero123 refiners use the zero123 pose vector")
        self.base = None

    # ------------------------------------------------------------------ setup

    def prepare(self, reference, context) -> None:
        from lift3d.zero123.cascade import CascadeLayout
        from lift3d.zero123.model import Zero123Model

        self.context = context
        device = torch.device(context.device)
        dtype = DTYPES[self.cfg.dtype] if device.type == "cuda" else torch.float32
        base_path = resolve_model_path(self.cfg.pretrained_model_name_or_path)
        refiner_path = self.cfg.refiner_name_or_path
        if not refiner_path:
            if os.path.abspath(base_path) != os.path.abspath(BUNDLED_MODEL):
                raise UserError("cascade-zero123 with your own base model needs its refiner: set "
                                "system.guidance.refiner_name_or_path=PATH (train one with lift3d train-cascade)")
            if not os.path.isdir(BUNDLED_REFINER):
                raise UserError("the bundled refiner lift3d/assets/cascade-mini-refiner is not installed; set "
                                "system.guidance.refiner_name_or_path=PATH")
            refiner_path = BUNDLED_REFINER
        load = dict(torch_dtype=dtype, variant=self.cfg.variant, use_ema=self.cfg.use_ema)
        self.base = Zero123Model.from_pretrained(base_path, **load).to(device)
        self.model = Zero123Model.from_pretrained(refiner_path, **load).to(device)
        if self.model.image_size != self.base.image_size:
            raise UserError(f"the refiner takes {self.model.image_size} px images but the base "
                            f"{self.base.image_size} px; pair a refiner with the base it was trained from")
        offsets = self.cfg.nearby_views or CascadeLayout.load(refiner_path).nearby
        self.set_reference(reference)
        self.prompt_images, self.prompt_views = self.self_prompts(reference, offsets, base_path)
        self.refresh_condition()
        if self.cfg.coarse_token == "estimate":
            self.base_condition = self.base.encode_condition(self.reference_image(reference).to(device))
        else:
            self.base = None  # only the self-prompts needed it: free its memory

    def reference_view(self) -> torch.Tensor:
        return self.reference_camera.spherical[0].cpu()

    def refresh_condition(self) -> None:
        from lift3d.zero123.cascade import encode_cascade_condition

        self.cascade = encode_cascade_condition(self.model, self.reference_image(self.reference).to(self.model.device),
                                                self.reference_view(), self.prompt_images.to(self.model.device),
                                                self.prompt_views)

    def set_reference(self, reference) -> None:
        super().set_reference(reference)
        self.reference = reference

    # ------------------------------------------------------------------ self-prompts

    def self_prompts(self, reference, offsets, base_path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate (or load from a cache) the base model's views at the nearby offsets."""
        from lift3d.zero123.cascade import generate_prompts, nearby_views, weights_fingerprint

        image = self.reference_image(reference)
        image_u8 = (image * 255).round().to(torch.uint8)
        view = self.reference_view()
        seed = int(getattr(self.context, "seed", 0))
        meta = {"base_model": base_path, "base_weights": weights_fingerprint(self.base),
                "image_sha256": hashlib.sha256(image_u8.numpy().tobytes()).hexdigest(),
                "input_view": [round(float(v), 4) for v in view], "offsets": [list(map(float, o)) for o in offsets],
                "steps": self.cfg.prompt_steps, "scale": self.cfg.prompt_scale, "seed": seed}
        key = hashlib.sha256(repr(sorted((k, v) for k, v in meta.items() if k != "base_model")).encode()).hexdigest()[:16]
        meta["key"] = key
        trial = os.path.join(self.context.trial_dir, "save", "self_prompts") if self.context.trial_dir else None
        shared = None if self.cfg.prompt_cache_dir == "none" else \
            os.path.join(self.cfg.prompt_cache_dir or default_cache_dir(), key)
        for folder in (trial, shared):
            images = _load_prompts(folder, key, len(offsets))
            if images is not None:
                log.info("self-prompts: reusing %s", folder)
                if folder != trial and trial:
                    _copy_prompts(folder, trial)
                return images, nearby_views(view, offsets)
        log.info("self-prompts: generating %d views with the base model (%d DDIM steps)", len(offsets),
                 self.cfg.prompt_steps)
        images, views = generate_prompts(self.base, image.to(self.base.device), view, offsets,
                                         self.cfg.prompt_steps, self.cfg.prompt_scale, seed)
        images = (images.float().cpu() * 255).round() / 255      # what the PNGs hold: a resume sees the same
        for folder in (trial, shared):
            if folder:
                _save_prompts(folder, images, views, meta)
        return images, views

    def validation_images(self) -> list:
        """The self-prompts (H, W, 3), shown after the validation renders."""
        return [img.permute(1, 2, 0) for img in self.prompt_images]

    # ------------------------------------------------------------------ per step

    def coarse_embedding(self, noisy: torch.Tensor, t, cameras, render: dict) -> Optional[torch.Tensor]:
        from lift3d.zero123.cascade import embed

        mode = self.cfg.coarse_token
        if mode == "none":
            return None
        if mode == "render":
            x = render["comp_rgb"].detach()
            if x.shape[-1] == 4:
                x = self.decode_features(x)
            image = x.permute(0, 3, 1, 2).float()
        else:  # the base's one-step estimate of the clean latent
            a = self.base.alphas_cumprod[torch.as_tensor(t, device=self.base.device).reshape(-1)].view(-1, 1, 1, 1)
            eps = self.base.predict_noise(noisy, t, self.base_condition, self.poses(cameras), self.cfg.prompt_scale)
            x0 = (noisy.float() - (1 - a).sqrt() * eps) / a.sqrt()
            image = self.base.decode(x0)
        size = self.model.image_size
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        return embed(self.model, image)

    def eps(self, noisy: torch.Tensor, t: torch.Tensor, cameras, render: dict, step: int) -> torch.Tensor:
        from lift3d.zero123.cascade import refiner_noise

        targets = cameras.spherical
        coarse = self.coarse_embedding(noisy, t, cameras, render)
        return refiner_noise(self.model, noisy, t, self.cascade, targets, self.cfg.guidance_scale, coarse)

    def __call__(self, render: dict, cameras, step: int) -> dict:
        if self.cfg.method == "sds":
            return self.sds(render, cameras, step)
        return self.sjc(render, cameras, step, self.cfg.var_red)


def _load_prompts(folder: Optional[str], key: str, n: int) -> Optional[torch.Tensor]:
    if not folder or not os.path.isfile(os.path.join(folder, "prompts.json")):
        return None
    import json

    with open(os.path.join(folder, "prompts.json")) as f:
        meta = json.load(f)
    paths = [os.path.join(folder, f"prompt_{i:02d}.png") for i in range(n)]
    if meta.get("key") != key or not all(os.path.isfile(p) for p in paths):
        return None
    from lift3d.zero123.nvs import load_image

    return torch.cat([load_image(p, None) for p in paths])


def _save_prompts(folder: str, images: torch.Tensor, views: torch.Tensor, meta: dict) -> None:
    from lift3d.utils.images import image_grid

    for i, img in enumerate(images):
        io.save_image(os.path.join(folder, f"prompt_{i:02d}.png"), img.permute(1, 2, 0))
    io.save_image(os.path.join(folder, "prompts.png"), image_grid([img.permute(1, 2, 0) for img in images]))
    io.write_json(os.path.join(folder, "prompts.json"), {**meta, "views": views.tolist()})  # last: marks complete


def _copy_prompts(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src), key=lambda n: n == "prompts.json"):  # the json last
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
