"""Randomly initialised Zero123-shaped models, for tests and benchmarks (no weights can be downloaded).

- ``"tiny"``: the same architecture families at toy sizes (64 px images, 8x8 latents, a 32-d
  context), runs in milliseconds; three UNet levels so both upsampler positions are exercised.
- ``"full"``: exactly Zero123's shapes (859 M UNet, 84 M VAE, CLIP ViT-L/14); ~5 GB of RAM.
"""

from __future__ import annotations

import torch

UNET = {
    "tiny": dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8),
    "full": dict(sample_size=32, in_channels=8, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8),
}
VAE = {
    "tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64),
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256),
}
CLIP = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=32),
    "full": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=768),
}


def random_zero123(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A :class:`Zero123Model` with random weights and Zero123's noise schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lift3d.zero123.model import SCHEDULER, Zero123Model

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET[size])
    levels = len(VAE[size]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels,
                        **VAE[size])
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, **CLIP[size]))
    d_ctx = UNET[size]["cross_attention_dim"]
    projection = torch.nn.Linear(CLIP[size]["projection_dim"] + 4, d_ctx)
    model = Zero123Model(unet, vae, clip, projection, DDIMScheduler.from_config(SCHEDULER)).to(dtype)
    model.source = f"random-{size}"
    return model
