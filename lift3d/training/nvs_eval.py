"""Novel-view evaluation: the held-out bench views as tensors, silhouettes and multi-view hull
consistency. Per-image PSNR and SSIM are :mod:`lift3d.evaluation.image_metrics`'.
"""

from __future__ import annotations

import torch


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
