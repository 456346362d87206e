"""Per-image metrics of (B, C, H, W) images in [0, 1]: PSNR and a Gaussian-window SSIM.

SSIM follows Wang et al. 2004 (pytorch-msssim's implementation): an 11x11 Gaussian window (σ = 1.5),
C1 = (0.01 L)², C2 = (0.03 L)² with L = 1, computed per channel on the "valid" region (no padding) and averaged.
"""

from __future__ import annotations

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, C, H, W) images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (mean over channels and valid positions), by
    pytorch-msssim. In float64: E[x²] - E[x]² cancels badly in float32."""
    from pytorch_msssim import ssim as msssim_ssim

    return msssim_ssim(a.double(), b.double(), data_range=1.0, size_average=False, win_size=size,
                       win_sigma=sigma).float()
