"""The interface of a view-conditioned prior, what the distillation methods (SDS, SJC) are written over.

A prior is a :class:`~lift3d.plugin.Plugin` registered with kind ``prior``. It is cheap to build;
``prepare(reference, context)`` loads its weights and encodes the reference view (so ``--test`` and
``--export`` never load a model). After that it offers:

- ``image_size``, ``latent_factor``, ``latent_channels``: the native resolution and the latent grid
  (``image_size // latent_factor`` pixels a side);
- ``alphas_cumprod`` (T,) and ``num_train_timesteps``: its DDPM noise schedule; ``dtype``: the dtype of
  its latents (float16 on a GPU when configured so);
- ``tile(views)`` / ``untile``: the views one latent covers (identity but for multi-view priors);
- ``encode(images, noise=None)`` (B,3,S,S) in [0, 1] (tiled) -> scaled latents, differentiable; a VAE prior
  samples its posterior with ``noise`` (B, C, h, w) when given, else draws it; ``decode(latents)`` back;
- ``predict_noise(noisy, t, cameras, guidance_scale, render)``: classifier-free-guided ε̂ for the
  noisy latents of the views ``cameras`` (``render`` is the renderer's output for them, for priors that
  also look at the render);
- optionally ``denoiser`` and ``conditional_noise(noisy, t, cameras, drop_pose)``, the network and its
  conditional branch alone (method ``vsd`` trains a LoRA on it);
- optionally ``generate(cameras, seeds, ...)``, sampled views for generate-then-reconstruct
  (guidance ``multiview``); ``views(cameras)``, the guidance views it wants instead of the data module's random ones,
  and ``validation_images()``, extra pictures for the validation strip; and ``memory_estimate(plan)``
  (lift3d/plugin.py), its weights and activations for the pre-flight check, without loading anything.
"""

from __future__ import annotations

from typing import Optional

import torch

from lift3d.plugin import Plugin


class ViewConditionedPrior(Plugin):
    latent_channels: int = 4
    #: the grey level behind the object in the images it scores and generates (1: white)
    background: float = 1.0

    # ------------------------------------------------------------------ set-up

    def prepare(self, reference, context) -> None:
        """Load the weights and encode ``reference`` (a :class:`lift3d.data.reference.ReferenceView`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the model

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    @property
    def latent_factor(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its latents are computed in."""
        return torch.float32

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_factor

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def encode(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, cameras, guidance_scale: float,
                      render: dict) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ optional

    def generate(self, cameras, seeds, steps: int = 50, guidance_scale: float = 3.0, eta: float = 1.0,
                 init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
        """Sampled views (B, 3, S, S) in [0, 1] at ``cameras`` (generate-then-reconstruct); SDEdit from
        ``init`` images at ``strength`` when given."""
        raise NotImplementedError(f"prior {type(self).__name__} cannot generate views; use guidance "
                                  "score-distillation with it")

    @property
    def denoiser(self) -> torch.nn.Module:
        """The noise-prediction network, for methods that adapt it (VSD puts a LoRA on it)."""
        raise NotImplementedError(f"prior {type(self).__name__} does not expose its denoiser; method vsd cannot "
                                  "adapt it")

    def conditional_noise(self, noisy: torch.Tensor, t: torch.Tensor, cameras, drop_pose=None) -> torch.Tensor:
        """ε of the conditional branch alone (no CFG), with gradients w.r.t. adapters on :attr:`denoiser`;
        views where the bool mask ``drop_pose`` (B,) is set see no camera (VSD's camera-condition dropout)."""
        raise NotImplementedError(f"prior {type(self).__name__} has no conditional branch for method vsd")

    def views(self, cameras):
        """The guidance views to render this step; by default the data module's random ones."""
        return cameras

    def fixed_views(self, reference_camera):
        """The views a multi-view prior always generates, relative to ``reference_camera`` (Zero123++'s six),
        or None when it takes any cameras (generate-then-reconstruct then uses its rings)."""
        return None

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """Views (B, C, h, w) (renders at ``image_size`` or latents at ``latent_size``) -> what one latent of
        the prior covers: by default one view each; Zero123++ puts 6 views in one 3x2 tile. The guidance tiles
        the renders before ``encode`` and ``predict_noise`` sees the tiles."""
        return images

    def untile(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`tile`."""
        return images

    def validation_images(self) -> list:
        """Extra (H, W, 3) images shown after the validation renders."""
        return []
