"""Loss terms of the image-to-3D system. Each returns a scalar; the system weights ``loss_x``
by ``system.loss.lambda_x``. Image tensors are (B, H, W, C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_rgb_mse(rgb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reference-view colour loss over the whole image: the target is composited on the same
    background the render used, so the background pixels also say "nothing here"."""
    return F.mse_loss(rgb, target)


def mask_mse(opacity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(opacity, mask)


def depth_smoothness(depth: torch.Tensor) -> torch.Tensor:
    """Mean absolute finite differences of a depth image, averaged over x and y (Zero123 3drec)."""
    dx = (depth[:, :, 1:] - depth[:, :, :-1]).abs().mean()
    dy = (depth[:, 1:] - depth[:, :-1]).abs().mean()
    return (dx + dy) / 2


def near_view_consistency(rgb: torch.Tensor, depth: torch.Tensor, rgb_near: torch.Tensor,
                          depth_near: torch.Tensor) -> torch.Tensor:
    """L1 change of colour and depth between a view and one from a slightly moved eye (no warping,
    as in Zero123's SJC recipe: for a small offset the image should barely change)."""
    return (rgb_near - rgb).abs().mean() + (depth_near - depth).abs().mean()


def normal_smoothness(normal: torch.Tensor) -> torch.Tensor:
    """Squared finite differences of the rendered normal image."""
    return ((normal[:, 1:] - normal[:, :-1]) ** 2).mean() + ((normal[:, :, 1:] - normal[:, :, :-1]) ** 2).mean()


def orientation(weighted_normal: torch.Tensor, opacity: torch.Tensor, ray_dirs: torch.Tensor) -> torch.Tensor:
    """Penalise visible normals that face away from the camera: max(0, n . d)^2 summed over pixels
    and divided by the number of covered pixels. ``weighted_normal`` is the opacity-weighted world
    normal sum_i w_i n_i (the renderer's ``comp_normal * 2 - 1``), so faint pixels count less; a
    per-pixel form of DreamFusion's per-sample term."""
    facing_away = F.relu((weighted_normal * ray_dirs).sum(-1, keepdim=True)) ** 2
    covered = (opacity.detach() > 0.01).sum().clamp(min=1)
    return facing_away.sum() / covered


def sparsity(opacity: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(opacity ** 2 + 0.01).mean()


def opaque(opacity: torch.Tensor) -> torch.Tensor:
    """Binary entropy of the opacity: pushes every pixel to fully empty or fully covered."""
    p = opacity.clamp(1e-3, 1 - 1e-3)
    return -(p * torch.log(p) + (1 - p) * torch.log(1 - p)).mean()

