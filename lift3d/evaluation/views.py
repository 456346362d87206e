"""Image-space scores of a trained field against ground-truth renders of a mesh."""

from __future__ import annotations

import torch

from lift3d.cameras import Cameras, orbit_views
from lift3d.mesh.io import load_mesh
from lift3d.mesh.raycast import MeshRaycaster
from lift3d.evaluation.image_metrics import psnr


def held_out_views(distance: float, fovy: float, size: int) -> Cameras:
    """A low ring offset by half a step from the usual 45-degree azimuths, and a high ring."""
    low = orbit_views(8, 15.0, distance, fovy, size, size, azimuth_start_deg=22.5)
    high = orbit_views(4, 55.0, distance, fovy, size, size, azimuth_start_deg=45.0)
    return Cameras.cat([low, high])


@torch.no_grad()
def view_scores(system, gt_mesh: str, cameras: Cameras, shading: str = "lambert", samples_per_pixel: int = 1):
    """Per-view silhouette IoU (opacity > 0.5 vs alpha > 0.5) and PSNR on white.

    Returns (rows, images): rows of {elevation, azimuth, silhouette_iou, psnr}; images alternate
    ground truth and prediction (H, W, 3)."""
    gt = MeshRaycaster(load_mesh(gt_mesh, normalize=True)).render(cameras, shading=shading,
                                                                  samples_per_pixel=samples_per_pixel)
    alpha = gt["rgba"][..., 3:]
    gt_rgb = gt["rgba"][..., :3] * alpha + (1 - alpha)
    device = system.device
    rows, images = [], []
    for i in range(len(cameras)):
        out = system.render(cameras[i].to(device), bg_color=torch.ones(3, device=device))
        rgb, opacity = out["comp_rgb"][0].clamp(0, 1).cpu(), out["opacity"][0].cpu()
        pred_sil, gt_sil = opacity[..., 0] > 0.5, alpha[i, ..., 0] > 0.5
        iou = (pred_sil & gt_sil).sum().item() / max((pred_sil | gt_sil).sum().item(), 1)
        rows.append({"elevation": round(float(cameras.elevation_deg[i]), 1),
                     "azimuth": round(float(cameras.azimuth_deg[i]), 1),
                     "silhouette_iou": iou, "psnr": float(psnr(rgb[None], gt_rgb[i][None])[0])})
        images += [gt_rgb[i], rgb]
    return rows, images
