"""Novel-view evaluation: the held-out bench views as tensors, PSNR, and a Gaussian-window SSIM.

SSIM follows Wang et al. 2004: an 11x11 Gaussian window (σ = 1.5), C1 = (0.01 L)², C2 = (0.03 L)²
with L = 1, computed per channel on the "valid" region (no padding) and averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bench_tensors(heldout, max_objects: int | None = None):
    """From a :class:`~lift3d.training.data.MultiViewSet` with bench views: condition images (K, 3, H, W),
    targets (K, n_offsets, 3, H, W) in [0, 1], and Zero123 poses (K, n_offsets, 4)."""
    from lift3d.cameras import Cameras, zero123_pose

    cond, targets, poses = [], [], []
    for object_id in list(heldout.bench)[:max_objects]:
        b = heldout.bench[object_id]
        images = b["images"].float() / 255
        c2w = torch.tensor([v["c2w"] for v in b["cameras"]], dtype=torch.float32)
        cams = Cameras(c2w, torch.full((len(c2w),), heldout.fovy_deg), heldout.size, heldout.size)
        cond.append(images[0])
        targets.append(images[1:])
        poses.append(zero123_pose(cams[1:], cams[0:1]))
    return torch.stack(cond), torch.stack(targets), torch.stack(poses)


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


def silhouettes(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Foreground masks (B, H, W) of images (B, 3, H, W) on white: some channel darker than 1 − threshold."""
    return (1 - images.min(1).values) > threshold


def project(cameras, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel rows and columns (B, N) of world points (N, 3) in each camera, as ``Cameras.rays`` casts
    them (pixel centres at +0.5, OpenGL camera looking down −z); -1 where behind or outside."""
    p = torch.einsum("bnj,bji->bni", points[None] - cameras.position[:, None], cameras.c2w[:, :3, :3])
    depth = -p[..., 2]
    f = cameras.focal.view(-1, 1)
    col = torch.floor(f * p[..., 0] / depth.clamp_min(1e-6) + cameras.width / 2).long()
    row = torch.floor(cameras.height / 2 - f * p[..., 1] / depth.clamp_min(1e-6)).long()
    ok = (depth > 0) & (col >= 0) & (col < cameras.width) & (row >= 0) & (row < cameras.height)
    return torch.where(ok, row, -1), torch.where(ok, col, -1)


def hull_consistency(masks: torch.Tensor, cameras, radius: float = 0.6, resolution: int = 128,
                     skip: tuple = (0,)) -> torch.Tensor:
    """Multi-view silhouette consistency of one object's views: for each view i (except ``skip``),
    carve a visual hull from the masks (V, H, W) of all *other* views, project it into view i
    and return the IoU with view i's own mask (V − len(skip),). Views that agree on one 3D shape
    score near 1; views that contradict each other carve the hull away."""
    axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 * radius - radius
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    rows, cols = project(cameras, points)
    v, h, w = masks.shape
    inside = torch.stack([masks[k][rows[k].clamp_min(0), cols[k].clamp_min(0)] & (rows[k] >= 0) for k in range(v)])
    scores = []
    for i in range(v):
        if i in skip:
            continue
        others = [k for k in range(v) if k != i]
        hull = inside[others].all(0)
        seen = torch.zeros(h * w, dtype=torch.bool)
        keep = hull & (rows[i] >= 0)
        seen[rows[i][keep] * w + cols[i][keep]] = True
        seen = seen.view(h, w)  # voxels finer than pixels: the projected centres cover the silhouette
        union = (seen | masks[i]).sum()
        scores.append(((seen & masks[i]).sum() / union.clamp_min(1)).float())
    return torch.stack(scores)
