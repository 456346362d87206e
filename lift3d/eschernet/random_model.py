"""Randomly initialised EscherNet-shaped models, for tests and memory benchmarks (no weights are
downloaded), written in the published folder layout.

- ``"tiny"``: the same architecture families at toy sizes (64 px images, 8x8 latents, 16/32-wide UNet,
  a four-stage ConvNeXt-V2 with 32-d tokens); runs in milliseconds.
- ``"full"``: the published shapes (Stable-Diffusion 1.x UNet with 4 input channels and 768-d context,
  SD VAE, ConvNeXt-V2-tiny at 224 px).

The weights are a function of ``seed`` and each tensor's name and shape only (one generator per tensor,
seeded from both), not of the order in which a library version happens to initialise modules: the same
seed gives the same folder under any diffusers/transformers version that names the weights the same,
which is what lets a test compare against outputs recorded with the reference code.
"""

from __future__ import annotations

import math
import zlib

import torch

UNET = {
    "tiny": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=2),
    "full": dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8),
}
VAE = {
    "tiny": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64),
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256),
}
ENCODER = {
    "tiny": dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
    "full": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
}
# Stable Diffusion's training schedule, as the published scheduler_config.json holds it.
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "timestep_spacing": "leading"}


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter and buffer of ``module`` values drawn from its own generator: weights
    N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases and other vectors N(0, 0.1²)."""
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            values = torch.randn(tensor.shape, generator=g, dtype=torch.float64)
            if tensor.dim() >= 2 and tensor.shape[0] * tensor[0].numel() == tensor.numel() and "grn" not in name:
                values = values / math.sqrt(max(1, tensor[0].numel()))
            elif name.endswith("weight") and tensor.dim() == 1:
                values = 1 + 0.1 * values
            else:
                values = 0.1 * values
            tensor.copy_(values.to(tensor.dtype))


def random_eschernet(size: str = "tiny", seed: int = 0, variant: str = "6dof", dtype: torch.dtype = torch.float32):
    """An :class:`~lift3d.eschernet.model.EscherNetModel` with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ConvNextV2Config, ConvNextV2Model

    from lift3d.eschernet.model import EscherNetModel

    unet = UNet2DConditionModel(**UNET[size])
    levels = len(VAE[size]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels,
                        **VAE[size])
    encoder = ConvNextV2Model(ConvNextV2Config(num_channels=3, patch_size=4, num_stages=4, image_size=224,
                                               drop_path_rate=0.0, **ENCODER[size]))
    for i, part in enumerate((unet, vae, encoder)):
        _fill(part, seed * 3 + i)
    model = EscherNetModel(unet, vae, encoder, DDIMScheduler.from_config(SCHEDULER), variant).to(dtype)
    model.source = f"random-{size}"
    return model


def write_random_folder(out_dir: str, size: str = "tiny", seed: int = 0) -> str:
    """Write a random model in the published layout to ``out_dir`` (the variant is not stored: name the
    folder ``...-4dof`` / ``...-6dof`` or give ``variant`` when loading)."""
    random_eschernet(size, seed).save_pretrained(out_dir)
    return out_dir
