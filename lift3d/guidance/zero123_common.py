"""What the two Zero123 guidances (``zero123-sds``, ``zero123-sjc``) share: the config, loading the
model in ``prepare`` (so ``--test``/``--export`` never load it), encoding the reference view, the
relative pose of each guidance view, turning a render into UNet latents, and decoding latents.

Both plugins accept the same config keys, so ``system.guidance_type`` can be swapped without
touching ``system.guidance``; only the defaults differ. The noise level range is given as
threestudio's ``min/max_step_percent`` of the 1000 training timesteps for both: SDS draws t
uniformly in it, SJC draws the σ tick index uniformly in it (3drec's ``us[30:-10]`` is t ∈ [10, 969],
i.e. 0.01 .. 0.969).

Renders reach the guidance as ``render["comp_rgb"]`` (B, H, W, C):
- C = 3 (``render_space: rgb``): RGB in [0, 1], resized to the model's 256 px and VAE-encoded;
- C = 4 (``render_space: latent``): the field renders scaled SD latents directly (3drec), resized to
  the latent size (32) if needed; :meth:`decode_features` turns them into RGB for the
  reference-view loss and validation images.
``render_space: auto`` decides per call from C.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lift3d.cameras import Cameras, zero123_pose
from lift3d.config import C, schedulable
from lift3d.errors import ConfigError, UserError
from lift3d.guidance.base import BaseGuidance, GuidanceContext

log = logging.getLogger(__name__)

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "zero123-mini")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """The user's model path, or the bundled small model when none is given."""
    if path:
        return path
    if os.path.isdir(BUNDLED_MODEL):
        return BUNDLED_MODEL
    raise UserError("no Zero123 model given and the bundled lift3d/assets/zero123-mini is not installed; set "
                    "system.guidance.pretrained_model_name_or_path=PATH (a diffusers folder or an original .ckpt)")


class Zero123GuidanceBase(BaseGuidance):
    @dataclass
    class Config:
        # A kxic or bennyguo/ashawkey diffusers folder, an original Zero123 .ckpt, or a hub id;
        # empty: the bundled lift3d/assets/zero123-mini.
        pretrained_model_name_or_path: str = ""
        variant: Optional[str] = None          # weight-file variant of a diffusers folder, e.g. "fp16"
        use_ema: bool = True                   # .ckpt: use its EMA weights when present
        dtype: str = "float32"                 # float32 | float16 (float16 only on CUDA)
        pose_variant: str = "zero123"          # zero123 | stable (Stable-Zero123: condition polar angle in slot 4)
        guidance_scale: float = 3.0
        min_step_percent: Any = schedulable(0.02)
        max_step_percent: Any = schedulable(0.98)
        grad_clip: Any = schedulable(0.0)      # clamp the per-element gradient to ±value; 0: off
        render_space: str = "auto"             # auto | rgb | latent (see module docstring)

    def __init__(self, cfg: Any = None, path: str = ""):
        super().__init__(cfg, path)
        c = self.cfg
        checks = [("pose_variant", c.pose_variant, ("zero123", "stable")), ("dtype", c.dtype, tuple(DTYPES)),
                  ("render_space", c.render_space, ("auto", "rgb", "latent"))]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{path or 'guidance'}.{key} is '{value}'; use one of {', '.join(allowed)}")
        self.model = None

    @property
    def render_space(self) -> str:
        return self.cfg.render_space

    # ------------------------------------------------------------------ setup

    def prepare(self, reference, context: GuidanceContext) -> None:
        from lift3d.zero123.model import Zero123Model

        super().prepare(reference, context)
        device = torch.device(context.device)
        dtype = DTYPES[self.cfg.dtype]
        if dtype == torch.float16 and device.type != "cuda":
            log.warning("guidance dtype float16 needs CUDA; using float32 on %s", device)
            dtype = torch.float32
        path = resolve_model_path(self.cfg.pretrained_model_name_or_path)
        self.model = Zero123Model.from_pretrained(path, torch_dtype=dtype, variant=self.cfg.variant,
                                                  use_ema=self.cfg.use_ema).to(device)
        self.set_reference(reference)

    def reference_image(self, reference) -> torch.Tensor:
        """The reference view composited on white at the model's resolution, (1, 3, S, S) in [0, 1]."""
        size = self.model.image_size
        image = reference.rgb.permute(2, 0, 1)[None].float()
        if image.shape[-2:] != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return image.clamp(0, 1)

    def set_reference(self, reference) -> None:
        """Encode the reference view."""
        self.condition = self.model.encode_condition(self.reference_image(reference).to(self.model.device))
        self.reference_camera = reference.camera

    # ------------------------------------------------------------------ per step

    def eps(self, noisy: torch.Tensor, t: torch.Tensor, cameras: Cameras, render: dict, step: int) -> torch.Tensor:
        """CFG noise prediction for the guidance views; Cascade-Zero123 replaces this (its
        refiner's context holds several condition images)."""
        return self.model.predict_noise(noisy, t, self.condition, self.poses(cameras), self.cfg.guidance_scale)

    def sds(self, render: dict, cameras: Cameras, step: int) -> dict:
        """threestudio's SDS: t ~ U[t_min, t_max], grad = (1 − ᾱ_t)(ε̂ − ε); see zero123_sds.py."""
        z = self.latents(render)
        t_min, t_max = self.step_range(step)
        t = torch.randint(t_min, t_max + 1, (len(z),), device=z.device)
        alpha = self.model.alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            noise = torch.randn_like(z, dtype=torch.float32)
            noisy = alpha.sqrt() * z.float() + (1 - alpha).sqrt() * noise
            eps = self.eps(noisy, t, cameras, render, step)
            grad = self.finish_grad((1 - alpha) * (eps - noise), step)
        return {"loss_guidance": self.gradient_loss(z, grad), "guidance_grad_norm": grad.norm().detach(),
                "guidance_t": t.float().mean()}

    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for t = 0 .. T−1 (increasing with t)."""
        a = self.model.alphas_cumprod
        return ((1 - a) / a).sqrt()

    def sjc_score(self, y: torch.Tensor, cameras: Cameras, render: dict, step: int, var_red: bool = True):
        """The SJC score of latents y (B, 4, h, w); see zero123_sjc.py. Returns (grad, σ (B,), t (B,))."""
        T = self.model.num_train_timesteps
        t_min, t_max = self.step_range(step)
        j = torch.randint(T - 1 - t_max, T - 1 - t_min + 1, (len(y),), device=y.device)  # tick index, uniform
        t = T - 1 - j
        sigma = self.sigmas()[t].view(-1, 1, 1, 1)
        y = y.detach().float()
        zs = y + sigma * torch.randn_like(y)
        eps = self.eps(zs / (1 + sigma ** 2).sqrt(), t, cameras, render, step)
        denoised = zs - sigma * eps
        grad = (denoised - y) / sigma if var_red else (denoised - zs) / sigma
        return grad, sigma.view(-1), t

    def sjc(self, render: dict, cameras: Cameras, step: int, var_red: bool = True) -> dict:
        y = self.latents(render)
        with torch.no_grad():
            grad, sigma, t = self.sjc_score(y, cameras, render, step, var_red)
            grad = self.finish_grad(grad, step)
        # The score points towards the data: descend along −grad, i.e. y.backward(−grad) in 3drec.
        return {"loss_guidance": self.gradient_loss(y, -grad), "guidance_grad_norm": grad.norm(),
                "guidance_sigma": sigma.mean(), "guidance_t": t.float().mean()}

    def poses(self, cameras: Cameras) -> torch.Tensor:
        """Zero123 relative pose (B, 4) of each guidance view w.r.t. the reference view."""
        stable = self.cfg.pose_variant == "stable"
        return zero123_pose(cameras, self.reference_camera.to(cameras.device), stable=stable)

    def step_range(self, step: int) -> tuple[int, int]:
        """Inclusive timestep range [t_min, t_max] at training ``step``."""
        T = self.model.num_train_timesteps
        lo = int(round(T * C(self.cfg.min_step_percent, step)))
        hi = int(round(T * C(self.cfg.max_step_percent, step)))
        lo, hi = max(0, min(lo, T - 1)), max(0, min(hi, T - 1))
        if lo > hi:
            raise UserError(f"guidance min_step_percent ({lo / T}) exceeds max_step_percent ({hi / T}) at step {step}")
        return lo, hi

    def latents(self, render: dict) -> torch.Tensor:
        """Scaled UNet latents (B, 4, h, w) of a render, differentiable w.r.t. ``comp_rgb``."""
        x = render["comp_rgb"].permute(0, 3, 1, 2)
        space = self.cfg.render_space
        if space == "auto":
            space = "latent" if x.shape[1] == 4 else "rgb"
        channels = 4 if space == "latent" else 3
        if x.shape[1] != channels:
            raise UserError(f"guidance render_space '{space}' needs {channels}-channel renders, got {x.shape[1]}; "
                            "set system.guidance.render_space to match system.geometry.n_feature_dims")
        if space == "latent":
            size = tuple(self.condition.latent.shape[-2:])
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            return x.to(self.model.dtype)
        size = self.model.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.model.encode(x)

    def finish_grad(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """NaN guard and optional clipping of a latent-space gradient."""
        grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
        clip = C(self.cfg.grad_clip, step)
        return grad.clamp(-clip, clip) if clip > 0 else grad

    @staticmethod
    def gradient_loss(z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        """0.5 ‖z − sg(z − dz)‖² / B: a loss whose gradient w.r.t. z is exactly dz / B
        (its value, 0.5 ‖dz‖² / B, is only for logging)."""
        target = (z.float() - dz).detach()
        return 0.5 * ((z.float() - target) ** 2).sum() / len(z)

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Latent renders (B, H, W, 4) -> RGB (B, 8H, 8W, 3), about [0, 1], differentiable."""
        return self.model.decode(features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
