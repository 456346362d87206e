"""Textured mesh export of a trained field: ``model.obj`` + ``model.mtl`` + ``model.png`` and ``model.glb``.

density grid -> iso-surface (isosurface.py) -> xatlas UVs -> texture baked from the field's colour
at each texel's surface point (texture.py) -> files, each written atomically. Vertices are in the
world frame of the cameras, so the mesh can be scored against a ground truth directly.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from lift3d.errors import UserError
from lift3d.utils import io

log = logging.getLogger("lift3d")


@dataclass
class ExportConfig:
    """``system.export`` in experiment configs."""

    resolution: int = 128                 # density samples per axis over [-radius, radius]^3
    threshold: Optional[float] = None     # absolute density iso-level; None: relative_threshold x mean
    relative_threshold: float = 8.0       # 3drec's choice (8 x mean density of the grid)
    smooth: bool = False                  # 3drec smoothing: upsample, box blur, optional erosion
    upsample: int = 2
    blur_kernel: int = 7
    erode: int = 0                        # grey erosion size (3drec used 5); 0: none
    min_component_fraction: float = 0.05  # drop components with less area than this x the largest
    max_faces: int = 30000                # decimate before xatlas (xatlas time grows fast with faces)
    texture_size: int = 1024
    texture_padding: int = 4              # texels between xatlas charts
    bake: str = "volume"                  # volume: render a short ray along the normal | surface: colour at the point
    bake_depth: float = 0.0               # half-length of that ray; 0: two cells of the density grid
    bake_samples: int = 8
    glb: bool = True


def _check(cfg: ExportConfig) -> None:
    problems = [
        (cfg.resolution < 8, "resolution must be >= 8"),
        (cfg.texture_size < 16, "texture_size must be >= 16"),
        (cfg.threshold is None and cfg.relative_threshold <= 0, "relative_threshold must be > 0"),
        (cfg.upsample < 1, "upsample must be >= 1"),
        (cfg.blur_kernel < 1 or cfg.blur_kernel % 2 == 0, "blur_kernel must be odd and >= 1"),
        (cfg.bake not in ("volume", "surface"), f"bake must be 'volume' or 'surface', got '{cfg.bake}'"),
        (cfg.bake_samples < 1, "bake_samples must be >= 1"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(f"system.export: {message}")


def field_color_fn(geometry, bake: str = "volume", depth: float = 0.02, samples: int = 8):
    """``color(points, normals)`` -> (N, 3) RGB in [0, 1] from the field; None for latent fields.

    ``bake="surface"`` reads ``geometry.color`` at the surface point. ``"volume"`` volume-renders
    a short ray along the inward normal, from ``depth`` outside to ``depth`` inside the surface,
    and keeps the weighted mean colour: the colour the field shows in renders, wherever inside
    that band its density builds up (the iso-surface of a chosen threshold can sit deeper,
    where colours were never trained).
    """
    import torch

    if getattr(geometry, "n_feature_dims", 3) != 3:
        return None
    try:
        device = next(geometry.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    @torch.no_grad()
    def color(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        p = torch.as_tensor(points, dtype=torch.float32, device=device)
        surface = geometry.color(p).float().clamp(0, 1)
        if bake == "surface":
            return surface.cpu().numpy()
        n = torch.as_tensor(normals, dtype=torch.float32, device=device)
        step = 2 * depth / samples
        s = depth - (torch.arange(samples, device=device, dtype=torch.float32) + 0.5) * step   # outside -> inside
        x = (p[:, None, :] + s[None, :, None] * n[:, None, :]).reshape(-1, 3)
        sigma = geometry.density(x).float().reshape(-1, samples).clamp_min(0)
        rgb = geometry.color(x).float().clamp(0, 1).reshape(-1, samples, 3)
        alpha = 1 - torch.exp(-sigma * step)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
        w = alpha * trans
        total = w.sum(1, keepdim=True)
        out = (w[..., None] * rgb).sum(1) / total.clamp_min(1e-8)
        # Where the band holds almost no density the weights mean nothing: use the surface colour.
        return torch.where(total > 1e-3, out, surface).cpu().numpy()

    return color


def export_mesh(geometry, out_dir: str, cfg: Any = None) -> dict:
    """Export ``geometry`` (a BaseGeometry) to ``out_dir``; returns {"obj", "mtl", "texture", "glb", "info"} paths.

    Raises UserError when the field is empty or degenerate at the configured threshold.
    """
    from lift3d.config import parse_config
    from lift3d.export.isosurface import extract_surface

    cfg = parse_config(ExportConfig, cfg, "system.export")
    _check(cfg)
    t0 = time.time()
    grid = geometry.density_grid(cfg.resolution)
    grid = grid.detach().cpu().numpy() if hasattr(grid, "detach") else np.asarray(grid)
    vertices, faces, info = extract_surface(
        grid, float(geometry.cfg.radius), threshold=cfg.threshold, relative_threshold=cfg.relative_threshold,
        smooth=cfg.smooth, upsample=cfg.upsample, blur_kernel=cfg.blur_kernel, erode=cfg.erode,
        min_component_fraction=cfg.min_component_fraction, max_faces=cfg.max_faces)
    info["seconds_surface"] = time.time() - t0
    depth = cfg.bake_depth if cfg.bake_depth > 0 else 2 * (2 * float(geometry.cfg.radius) / cfg.resolution)
    color_fn = field_color_fn(geometry, cfg.bake, depth, cfg.bake_samples)
    if color_fn is None:
        log.warning("the field stores latents, not RGB: the exported texture is plain grey")
        color_fn = lambda p, n: np.full((len(p), 3), 0.5, np.float32)  # noqa: E731
    paths = write_textured_mesh(out_dir, vertices, faces, color_fn, texture_size=cfg.texture_size,
                                padding=cfg.texture_padding, glb=cfg.glb, info=info)
    info["seconds_total"] = time.time() - t0
    info["config"] = asdict(cfg)
    io.write_json(paths["info"], info)
    log.info("export: %d faces, threshold %.4g, %.1f s", info["faces"], info["threshold"], info["seconds_total"])
    return paths


def write_textured_mesh(out_dir: str, vertices: np.ndarray, faces: np.ndarray, color_fn, *, texture_size: int = 1024,
                        padding: int = 4, glb: bool = True, name: str = "model", info: Optional[dict] = None) -> dict:
    """Unwrap, bake ``color_fn(points, normals)`` into a texture, write OBJ/MTL/PNG (+ GLB). Returns the paths."""
    from lift3d.export.texture import bake_texture, unwrap

    info = {} if info is None else info
    t0 = time.time()
    vertices, faces, uv = unwrap(vertices, faces, texture_size, padding)
    info["seconds_unwrap"] = time.time() - t0
    t0 = time.time()
    image, coverage = bake_texture(vertices, faces, uv, color_fn, texture_size)
    info.update(seconds_bake=time.time() - t0, texture_coverage=coverage, texture_size=texture_size,
                vertices_uv=int(len(vertices)))
    paths = {"obj": os.path.join(out_dir, f"{name}.obj"), "mtl": os.path.join(out_dir, f"{name}.mtl"),
             "texture": os.path.join(out_dir, f"{name}.png"), "info": os.path.join(out_dir, f"{name}_info.json")}
    io.save_image(paths["texture"], image)
    io.write_text(paths["mtl"], _mtl_text(os.path.basename(paths["texture"])))
    io.write_text(paths["obj"], _obj_text(vertices, faces, uv, os.path.basename(paths["mtl"])))
    if glb:
        paths["glb"] = os.path.join(out_dir, f"{name}.glb")
        _write_glb(paths["glb"], vertices, faces, uv, image)
    return paths


def _mtl_text(texture_name: str) -> str:
    return ("# lift3d export\nnewmtl material_0\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\n"
            f"Ns 10.0\nillum 1\nmap_Kd {texture_name}\n")


def _obj_text(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, mtl_name: str) -> str:
    # xatlas gives one UV per (split) vertex, so position and UV indices coincide.
    f = faces + 1
    lines = [f"# lift3d export: {len(vertices)} vertices, {len(faces)} faces", f"mtllib {mtl_name}", "o model"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uv]
    lines += ["usemtl material_0"]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f]
    return "\n".join(lines) + "\n"


def _write_glb(path: str, vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, image: np.ndarray) -> None:
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(image), metallicFactor=0.0,
                                                   roughnessFactor=1.0)
    mesh = trimesh.Trimesh(vertices, faces, process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
    data = mesh.export(file_type="glb")
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
