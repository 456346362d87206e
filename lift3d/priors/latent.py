"""What the latent-diffusion priors (``zero123``, ``eschernet``, ``zero123plus``) share over ``self.model``.

Each loads a model in ``prepare`` (``self.model``, None before) with a VAE (``model.vae``), a DDPM schedule
(``model.alphas_cumprod``, ``model.num_train_timesteps``) and ``model.encode``/``model.decode`` between images
in [0, 1] and its scaled latents. :class:`LatentDiffusionPrior` answers the prior interface from it; a prior
whose latents are not the VAE's scaled posterior (Zero123++: shifted and gained) overrides ``encode``.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from lift3d.errors import ConfigError
from lift3d.priors.base import ViewConditionedPrior

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def check_choice(where: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}.{key} is '{value}'; use one of {', '.join(allowed)}")


class LatentDiffusionPrior(ViewConditionedPrior):
    """A prior over ``self.model``'s VAE latents; ``cfg.dtype`` is one of :data:`DTYPES`."""

    model = None

    def load_dtype(self, device: torch.device) -> torch.dtype:
        """The configured dtype, float32 off CUDA (float16 kernels are CUDA's)."""
        dtype = DTYPES[self.cfg.dtype]
        if dtype == torch.float16 and device.type != "cuda":
            log.warning("guidance dtype float16 needs CUDA; using float32 on %s", device)
            return torch.float32
        return dtype

    def vae_config(self) -> dict:
        """The VAE's config.json before the model is loaded (for ``latent_factor`` in the memory estimate)."""
        return self.part_config("vae")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def latent_factor(self) -> int:
        # The VAE halves the resolution between consecutive blocks (8 for Stable Diffusion's four).
        blocks = self.model.vae.config.block_out_channels if self.model is not None else \
            self.vae_config()["block_out_channels"]
        return 2 ** (len(blocks) - 1)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.model.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.model.num_train_timesteps

    def encode(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Contiguous latents: the CPU VAE may return channels-last ones, and noise drawn "like" them would
        # then depend on the memory layout.
        if noise is None:
            return self.model.encode(images).contiguous()
        # The posterior sample mean + std·noise, as latent_dist.sample() draws it, with the caller's noise.
        dist = self.model.vae.encode((images * 2 - 1).to(self.dtype)).latent_dist
        return ((dist.mean + dist.std * noise.to(dist.mean)) * self.model.latent_scale).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents)

    def reference_decoder_estimate(self, plan, vae: dict) -> tuple:
        """The memory estimate's ``vae`` entry with a latent field: the decoder with gradients when the
        reference render is decoded, and the setting that sizes it."""
        from lift3d.preflight import vae_gib

        size = plan.renders("reference")
        return (vae_gib(vae, 1, decoder=True) if plan.decode_reference else 0.0,
                f"data.reference_height (now {size[0][1] * self.latent_factor if size else '?'})")
