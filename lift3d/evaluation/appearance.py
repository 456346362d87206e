"""How an exported, textured mesh looks: scores that ray-cast the mesh as a viewer would show it.

- :func:`reference_view_scores` needs no ground truth: the mesh rendered from the input camera
  against the input image (what the user photographed is what they expect to see from there).
- :func:`gt_view_scores` compares the mesh with a textured ground truth at the evaluation views.

Both render the mesh's albedo (its texture, no lighting) with :class:`MeshRaycaster`, 2x2 rays
per pixel, composited on white as the input is.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from lift3d.cameras import Cameras
from lift3d.evaluation.image_metrics import psnr, ssim

SAMPLES_PER_PIXEL = 4


def _on_white(rgba: torch.Tensor) -> torch.Tensor:
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha + (1 - alpha)


def _chw(image: torch.Tensor) -> torch.Tensor:
    return image.permute(2, 0, 1)[None].double()


def render_albedo(mesh, cameras: Cameras) -> torch.Tensor:
    """(B, H, W, 4) straight-alpha renders of ``mesh``'s texture (no lighting)."""
    from lift3d.mesh.raycast import MeshRaycaster

    return MeshRaycaster(mesh).render(cameras, shading="albedo", samples_per_pixel=SAMPLES_PER_PIXEL)["rgba"]


def compare_views(pred_rgba: torch.Tensor, target_rgba: torch.Tensor) -> dict:
    """Scores of one (H, W, 4) render against one (H, W, 4) target, both straight alpha.

    - ``psnr``: over the target's object pixels (alpha > 0.5), both composited on white;
    - ``psnr_image`` / ``ssim``: the whole images composited on white;
    - ``silhouette_iou``: alpha > 0.5 of both;
    - ``see_through``: the fraction of the target's object pixels that the render misses although
      they lie inside the render's own outline (holes through the mesh, not a silhouette that is
      too small: that is what the IoU measures).
    """
    from scipy.ndimage import binary_fill_holes

    pred, target = _on_white(pred_rgba), _on_white(target_rgba)
    obj = target_rgba[..., 3] > 0.5
    hit = pred_rgba[..., 3] > 0.5
    n_obj = int(obj.sum())
    outline = torch.from_numpy(binary_fill_holes(hit.numpy()))
    union = int((obj | hit).sum())
    diff = (pred - target)[obj]
    mse = float(diff.pow(2).mean()) if n_obj else float("nan")
    return {
        "psnr": -10 * float(np.log10(max(mse, 1e-12))) if n_obj else float("nan"),
        "psnr_image": float(psnr(_chw(pred), _chw(target))[0]),
        "ssim": float(ssim(_chw(pred), _chw(target))[0]),
        "silhouette_iou": int((obj & hit).sum()) / union if union else 0.0,
        "see_through": int((obj & ~hit & outline).sum()) / n_obj if n_obj else 0.0,
    }


def reference_view_scores(mesh, camera: Cameras, rgba: torch.Tensor) -> dict:
    """``mesh`` (world frame) rendered from the input ``camera`` against the input ``rgba`` (H, W, 4).

    Returns :func:`compare_views`'s scores plus the camera and image size they were measured at.
    """
    render = render_albedo(mesh, camera[:1].to("cpu"))[0]
    scores = compare_views(render, rgba.float().cpu())
    scores.update(camera={k: round(float(v), 4) for k, v in zip(
        ("elevation_deg", "azimuth_deg", "distance", "fovy_deg"),
        (camera.elevation_deg[0], camera.azimuth_deg[0], camera.distance[0], camera.fovy_deg[0]))},
        size=[camera.height, camera.width])
    return scores


def gt_view_scores(pred_mesh, gt_mesh, cameras: Optional[Cameras] = None) -> Optional[dict]:
    """PSNR / SSIM / silhouette IoU of ``pred_mesh``'s texture against a textured ``gt_mesh`` at the
    evaluation views (both in the ground truth's normalised frame); the mean over views and each view.

    None when the ground truth has no colour (nothing to compare the texture with).
    """
    from lift3d.evaluation.protocols import eval_cameras

    if getattr(gt_mesh.visual, "kind", None) is None:
        return None
    cameras = eval_cameras() if cameras is None else cameras
    pred, gt = render_albedo(pred_mesh, cameras), render_albedo(gt_mesh, cameras)
    rows = []
    for i in range(len(cameras)):
        s = compare_views(pred[i], gt[i])
        rows.append({"azimuth_deg": round(float(cameras.azimuth_deg[i]), 1), "psnr": s["psnr_image"],
                     "ssim": s["ssim"], "silhouette_iou": s["silhouette_iou"]})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "silhouette_iou")}
    return {**mean, "views": rows,
            "note": f"{len(rows)} evaluation views, albedo renders composited on white, whole images"}


def export_reference_view(mesh_path: str, mesh=None) -> Optional[dict]:
    """:func:`reference_view_scores` of a lift3d export, from the input view and camera its export folder
    keeps (``input_view.png``, ``model_info.json``'s ``reference_camera``); None for other meshes."""
    import os

    from lift3d.export.frame import info_path_for
    from lift3d.export.mesh import INPUT_VIEW
    from lift3d.utils.images import open_image
    from lift3d.utils.inputs import read_json_object

    info_path, image_path = info_path_for(mesh_path), os.path.join(os.path.dirname(mesh_path), INPUT_VIEW)
    if not (os.path.lexists(info_path) and os.path.lexists(image_path)):
        return None
    camera = read_json_object(info_path, "mesh info", "fix or delete it (it comes with a lift3d export)").get(
        "reference_camera")
    keys = ("elevation_deg", "azimuth_deg", "distance", "fovy_deg")
    if not isinstance(camera, dict) or not all(isinstance(camera.get(k), (int, float)) for k in keys):
        return None
    if mesh is None:
        from lift3d.mesh.io import load_mesh

        mesh = load_mesh(mesh_path)
    rgba = torch.from_numpy(np.asarray(open_image(image_path).convert("RGBA"), dtype=np.float32) / 255)
    cam = Cameras.from_spherical(camera["elevation_deg"], camera["azimuth_deg"], camera["distance"],
                                 camera["fovy_deg"], rgba.shape[0], rgba.shape[1])
    return reference_view_scores(mesh, cam, rgba)
