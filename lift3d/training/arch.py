"""Zero123-architecture models at sizes that train on a CPU, built fresh (no pretrained weights).

The pieces are exactly Zero123's families (diffusers ``UNet2DConditionModel`` with 8 input
channels, ``AutoencoderKL``, transformers ``CLIPVisionModelWithProjection``, a ``Linear(d+4 -> d)``
camera projection, Zero123's DDIM schedule); only the widths and depths shrink. A model built
here saves and loads through :class:`lift3d.zero123.Zero123Model` like a published checkpoint.

``"mini"`` (the shipped model): 64 px images, an 8x-downsampling VAE (8x8x4 latents, as SD's
256 px -> 32x32 ratio), a 3-level UNet and a 2-layer ViT, all with a 128-d context. ``"tiny"``: the same at toy widths, for tests.
"""

from __future__ import annotations

import torch

SIZES = {
    "mini": dict(
        image=64,
        unet=dict(block_out_channels=(32, 64, 128), layers_per_block=1, attention_head_dim=8, norm_num_groups=32),
        # 2 GroupNorm groups, not 8: with one channel per group the decoder's last norm standardises
        # every channel per image, which erases the colour of a flat object on white (the first
        # mini model was colour-blind for exactly this reason).
        vae=dict(block_out_channels=(8, 16, 32, 64), layers_per_block=1, norm_num_groups=2),
        clip=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, patch_size=8),
        context=128),
    "tiny": dict(
        image=32,
        unet=dict(block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=8),
        vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=2),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
        context=16),
}


def build_model(size: str = "mini", seed: int = 0):
    """A randomly initialised :class:`Zero123Model` of a preset size (see :data:`SIZES`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lift3d.zero123.model import SCHEDULER, Zero123Model

    cfg = SIZES[size]
    torch.manual_seed(seed)
    levels = len(cfg["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=cfg["image"],
                        scaling_factor=1.0,  # set from the latents' spread after the VAE is trained
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **cfg["vae"])
    latent = cfg["image"] // 2 ** (levels - 1)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=8, out_channels=4, cross_attention_dim=cfg["context"],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **cfg["unet"])
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=cfg["image"], projection_dim=cfg["context"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
        **cfg["clip"]))
    projection = torch.nn.Linear(cfg["context"] + 4, cfg["context"])
    identity_projection_(projection)
    model = Zero123Model(unet, vae, clip, projection, DDIMScheduler.from_config(SCHEDULER))
    model.source = f"fresh-{size}"
    return model


@torch.no_grad()
def identity_projection_(projection: torch.nn.Linear) -> None:
    """Zero123's init: the CLIP embedding passes through unchanged, the 4 pose columns start at 0."""
    d = projection.out_features
    projection.weight.zero_()
    projection.weight[:, :d] = torch.eye(d)
    projection.bias.zero_()
