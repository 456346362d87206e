"""What the latent-diffusion model classes (Zero123, EscherNet, Zero123++) share: a VAE (``self.vae``), a
DDPM scheduler (``self.scheduler``) and a UNet (``self.unet``), as mixins of their ``nn.Module``.

- :class:`LatentModelMixin`: ``dtype``/``device`` (the UNet's input convolution's), ``latent_scale`` (the
  VAE's ``scaling_factor``), ``alphas_cumprod`` and ``num_train_timesteps``;
- :class:`ScaledVAEMixin`: ``encode``/``decode`` between images in [0, 1] and the VAE's latents times
  ``latent_scale``, Stable Diffusion's latents (Zero123, EscherNet; not Zero123++, whose latents are shifted
  and gained and whose images are scaled before the VAE).
"""

from __future__ import annotations

import torch


class LatentModelMixin:
    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0 .. T-1 (float32, on the model's device)."""
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


class ScaledVAEMixin(LatentModelMixin):
    def encode(self, images_01: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (differentiable w.r.t. the images)."""
        dist = self.vae.encode((images_01.contiguous() * 2 - 1).to(self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] (not clamped; differentiable w.r.t. the latents)."""
        x = self.vae.decode((latents / self.latent_scale).to(self.dtype)).sample
        return (x.float() + 1) / 2
