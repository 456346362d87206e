"""``score-distillation``: a distillation method (``method_type``: sds, sjc, ...) over a view-conditioned
prior (``prior_type``: zero123, cascade-zero123, ...), any pair chosen in YAML::

    guidance_type: score-distillation
    guidance:
      method_type: sjc
      method: {guidance_scale: 100.0, var_red: true}
      prior_type: zero123
      prior: {pretrained_model_name_or_path: path/to/zero123-xl, pose_variant: zero123}

Renders reach the guidance as ``render["comp_rgb"]`` (B, H, W, C) and become the prior's latents:
- C = 3 (``render_space: rgb``): RGB in [0, 1], resized to the prior's resolution and encoded;
- C = 4 (``render_space: latent``): the field renders the prior's latents directly (3drec), resized to
  the latent size if needed; :meth:`decode_features` turns them into RGB for the reference-view loss
  and validation images.
``render_space: auto`` decides per call from C. The method's latent gradient g is applied as the loss
0.5 ‖z − sg(z − g)‖² / B, whose gradient w.r.t. the latents z is exactly g / B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lift3d.config import domain
from lift3d.errors import UserError
from lift3d.guidance.base import BaseGuidance, GuidanceContext
from lift3d.priors.zero123 import check_choice
from lift3d.registry import find, register
from lift3d.utils.images import resize

RENDER_SPACES = ("auto", "rgb", "latent")


def gradient_loss(z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """0.5 ‖z − sg(z − dz)‖² / B: a loss whose gradient w.r.t. z is exactly dz / B
    (its value, 0.5 ‖dz‖² / B, is only for logging)."""
    target = (z.float() - dz).detach()
    return 0.5 * ((z.float() - target) ** 2).sum() / len(z)


@register("score-distillation", "guidance")
class ScoreDistillation(BaseGuidance):
    @dataclass
    class Config:
        method_type: str = "sds"
        method: dict = field(default_factory=dict)
        prior_type: str = "zero123"
        prior: dict = field(default_factory=dict)
        render_space: str = "auto"             # auto | rgb | latent (see module docstring)
        encode_chunk: int = domain(1, ge=1)    # images per VAE-encoder pass (see latents())

    def __init__(self, cfg: Any = None, path: str = "system.guidance"):
        super().__init__(cfg, path)
        c = self.cfg
        self.build(c.method_type, c.method, f"{path}.method", c.prior_type, c.prior, f"{path}.prior", path)

    def build(self, method_type: str, method_cfg, method_path: str, prior_type: str, prior_cfg, prior_path: str,
              path: str) -> None:
        check_choice(path, "render_space", self.cfg.render_space, RENDER_SPACES)
        if self.cfg.encode_chunk < 1:
            raise UserError(f"{path}.encode_chunk must be at least 1, got {self.cfg.encode_chunk}")
        self.method = find(method_type, "method")(method_cfg, path=method_path)
        self.prior = find(prior_type, "prior")(prior_cfg, path=prior_path)
        # The method's own loss terms (VSD's LoRA loss) are the guidance's, weighted by system.loss.lambda_<name>.
        self.loss_defaults = {**type(self).loss_defaults, **self.method.loss_defaults}

    @classmethod
    def declared_losses(cls, cfg: Any = None, path: str = "system.guidance") -> dict:
        return dict(cls(cfg, path).loss_defaults)   # they depend on method_type; building is cheap (no weights)

    @property
    def render_space(self) -> str:
        return self.cfg.render_space

    @property
    def latent_factor(self) -> int:
        return self.prior.latent_factor

    def prepare(self, reference, context: GuidanceContext) -> None:
        super().prepare(reference, context)
        self.prior.prepare(reference, context)
        self.method.prepare(self.prior, context)

    # The method's trainable state, its optimiser groups and its losses are the guidance's (lift3d/plugin.py).
    def trainable_state(self):
        return self.method.trainable_state()

    def param_groups(self, lr: float) -> list:
        # The method's own learning rates; else (a subclass's own state) every parameter at lr.
        return self.method.param_groups(lr) if self.method.trainable_state() is not None else super().param_groups(lr)

    def losses(self, ctx) -> dict:
        return self.method.losses(ctx)

    def memory_estimate(self, plan) -> dict:
        """The prior's parts, and for RGB renders the VAE encoder with gradients, ``encode_chunk`` images
        at a time (each chunk's graph is recomputed in backward)."""
        parts = self.prior.memory_estimate(plan)
        vae = getattr(self.prior, "part_config", None)
        if not plan.latent_field and vae is not None:
            from lift3d.preflight import vae_gib

            views = max((v for v, _, _ in plan.renders("guidance")), default=1)
            n = min(self.cfg.encode_chunk, views)
            parts["vae"] = (vae_gib(vae("vae"), n, decoder=False),
                            f"system.guidance.encode_chunk (now {self.cfg.encode_chunk})")
        for name, (gib, setting) in self.method.memory_estimate(plan, self.prior).items():
            parts[name] = (parts.get(name, (0.0, None))[0] + gib, setting or parts.get(name, (0, None))[1])
        return parts

    def update_step(self, step: int) -> None:
        self.method.update_step(step)
        self.prior.update_step(step)

    def views(self, cameras):
        return self.prior.views(cameras)

    def validation_images(self) -> list:
        return self.prior.validation_images()

    def __call__(self, render: dict, cameras, step: int) -> dict:
        z = self.latents(render)
        with torch.no_grad():
            out = self.method(self.prior, z.detach(), cameras, render, step)
        grad = out.pop("grad")
        return {"loss_guidance": gradient_loss(z, grad), **{k: v.detach() for k, v in out.items()}}

    def latents(self, render: dict) -> torch.Tensor:
        """The prior's latents (B, C, h, w) of a render, differentiable w.r.t. ``comp_rgb``."""
        x = render["comp_rgb"].permute(0, 3, 1, 2)
        space = self.render_space
        if space == "auto":
            space = "latent" if x.shape[1] == self.prior.latent_channels else "rgb"
        channels = self.prior.latent_channels if space == "latent" else 3
        if x.shape[1] != channels:
            raise UserError(f"guidance render_space '{space}' needs {channels}-channel renders, got {x.shape[1]}; "
                            "set system.guidance.render_space to match system.geometry.n_feature_dims")
        # prior.tile: the views one latent covers (Zero123++: 6 views in a 3x2 tile; others: one each).
        if space == "latent":
            return self.prior.tile(resize(x, self.prior.latent_size).to(self.prior.dtype))
        # resize() returns a contiguous batch: a channels-last view shifts CPU GroupNorm by ~1e-3.
        return self.encode(self.prior.tile(resize(x, self.prior.image_size)).contiguous())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The prior's encoder, ``encode_chunk`` images at a time. With gradients, each chunk's graph is
        recomputed in the backward pass, so the encoder's activations are held for one chunk only
        (the same latents and gradients: the batch's latent noise is drawn once, as in one pass)."""
        n = self.cfg.encode_chunk
        if len(images) <= n:
            return self.prior.encode(images)
        h, w = (side // self.prior.latent_factor for side in images.shape[-2:])
        noise = torch.randn(len(images), self.prior.latent_channels, h, w, device=images.device, dtype=self.prior.dtype)
        chunks = [(images[i:i + n], noise[i:i + n]) for i in range(0, len(images), n)]
        if not torch.is_grad_enabled() or not images.requires_grad:
            return torch.cat([self.prior.encode(x, e) for x, e in chunks])
        from torch.utils.checkpoint import checkpoint

        return torch.cat([checkpoint(self.prior.encode, x, e, use_reentrant=False) for x, e in chunks])

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Latent renders (B, H, W, C) -> RGB (B, fH, fW, 3), about [0, 1], differentiable."""
        return self.prior.decode(features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
