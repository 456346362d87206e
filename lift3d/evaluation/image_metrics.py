"""Per-image metrics of (B, C, H, W) images in [0, 1]: PSNR and a Gaussian-window SSIM.

SSIM follows Wang et al. 2004: an 11x11 Gaussian window (σ = 1.5), C1 = (0.01 L)², C2 = (0.03 L)²
with L = 1, computed per channel on the "valid" region (no padding) and averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, C, H, W) images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (mean over channels and valid positions)."""
    c = a.shape[1]
    w = gaussian_window(size, sigma).expand(c, 1, size, size).to(a.device)
    a, b = a.double(), b.double()  # float64: E[x²] - E[x]² cancels badly in float32

    def blur(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()
