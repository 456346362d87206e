"""The EscherNet model: a Stable-Diffusion UNet with CaPE multi-view attention (4 input channels, no
concatenated image latent), its VAE, a ConvNeXt-V2 image encoder and the noise schedule.

Conditioning, as kxhit/EscherNet's pipeline and training script do it:
- every reference image (RGB on white, [0, 1]) is resized to the encoder's 224 px (bicubic, no
  antialiasing, ``align_corners=False``: torchvision's tensor resize of the pinned version), normalised
  with ImageNet's mean/std and run through ConvNeXt-V2; its last feature map, flattened to tokens and
  passed through the model's final LayerNorm (per token, not pooled), gives L tokens per image; the
  tokens of all R reference images, view after view, are the cross-attention context (1, R·L, C);
- the T target views' noisy latents (scaled by the VAE's ``scaling_factor``) go through the UNet
  together, attending each other and the reference tokens with CaPE (:mod:`lift3d.eschernet.cape`);
- classifier-free guidance: the unconditional half has all-zero reference tokens and the same poses;
  ε = ε_u + s (ε_c − ε_u), batch order [uncond, cond].
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.eschernet.cape import CaPEAttnProcessor, ViewPoses
from lift3d.utils.latent_model import ScaledVAEMixin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_SIZE = 224   # the pipeline's ConvNeXt input size, fixed whatever the encoder's config says


class EscherNetModel(ScaledVAEMixin, nn.Module):
    def __init__(self, unet, vae, image_encoder, scheduler, variant: str):
        super().__init__()
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.scheduler = scheduler          # a diffusers DDIMScheduler (no weights)
        self.variant = variant              # "4dof" | "6dof"
        self.unet.set_attn_processor(CaPEAttnProcessor())
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str, variant: str = "auto", torch_dtype: Optional[torch.dtype] = None):
        """Load a published folder (``kxic/eschernet-4dof`` / ``-6dof`` layout) or a hub id."""
        from lift3d.eschernet.folder import assemble, read_parts

        parts = read_parts(path)
        return assemble(cls, parts, variant, torch_dtype or torch.float32, os.path.expanduser(str(path)))

    def save_pretrained(self, out_dir: str) -> None:
        from lift3d.eschernet.folder import write_folder

        write_folder(self, out_dir)

    # dtype, device, latent_scale, alphas_cumprod, num_train_timesteps, encode, decode: ScaledVAEMixin

    # ------------------------------------------------------------------ encoders

    def encoder_input(self, images_01: torch.Tensor) -> torch.Tensor:
        """Reference images (R, 3, H, W) in [0, 1] -> ConvNeXt input (the pipeline's [-1, 1] round trip,
        bicubic resize without antialiasing, ImageNet normalisation)."""
        x = (images_01.contiguous().to(self.device, self.dtype) * 2 - 1 + 1) / 2
        x = F.interpolate(x, size=(ENCODER_SIZE, ENCODER_SIZE), mode="bicubic", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_references(self, images_01: torch.Tensor) -> torch.Tensor:
        """Reference images (R, 3, H, W) in [0, 1] -> cross-attention context (1, R·L, C)."""
        features = self.image_encoder(pixel_values=self.encoder_input(images_01)).last_hidden_state  # (R, C, h, w)
        tokens = self.image_encoder.layernorm(features.flatten(2).transpose(1, 2))                   # (R, h·w, C)
        return tokens.reshape(1, -1, tokens.shape[-1])

    # ------------------------------------------------------------------ denoiser

    def conditional_noise(self, noisy: torch.Tensor, t, context: torch.Tensor, target_poses: torch.Tensor,
                          reference_poses: torch.Tensor) -> torch.Tensor:
        """ε of one UNet pass of the T target views with ``context`` (no CFG; float32, with gradients w.r.t.
        whatever in the UNet requires them): :meth:`predict_noise`'s arguments without the scale."""
        noisy = noisy.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(noisy))
        poses = ViewPoses(self.variant, target_poses.to(self.device)[None], reference_poses.to(self.device)[None])
        return self.unet(noisy, t, encoder_hidden_states=context.to(self.device, self.dtype),
                         cross_attention_kwargs={"cape": poses}).sample.float()

    def predict_noise(self, noisy: torch.Tensor, t, context: torch.Tensor, target_poses: torch.Tensor,
                      reference_poses: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """CFG ε̂ (float32) of T target views denoised together: ``noisy`` (T, 4, h, w) scaled latents at
        timesteps ``t`` (T,) or scalar, ``context`` (1, R·L, C) from :meth:`encode_references`, poses
        (T, ...) and (R, ...) as :mod:`lift3d.eschernet.cape` defines them for this model's variant."""
        noisy = noisy.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(noisy))
        context = context.to(self.device, self.dtype)
        poses = ViewPoses(self.variant, target_poses.to(self.device)[None], reference_poses.to(self.device)[None])
        eps = self.unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([torch.zeros_like(context), context]),
                        cross_attention_kwargs={"cape": poses}).sample.float()
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
