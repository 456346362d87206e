"""Textured mesh export of a trained field: ``model.obj`` + ``model.mtl`` + ``model.png`` and ``model.glb``.

density grid -> level (level.py: chosen from the field, unless a threshold is configured) ->
iso-surface (isosurface.py) -> xatlas UVs -> texture baked from rendered views of the field and the
input photo, projected onto the surface with visibility and view-angle weights (view_bake.py; or
from the field's colour near each texel, texture.py) -> files, each written atomically, and
``model_info.json`` saying what was done. Files are y-up by default (glTF's convention, Blender's OBJ import default); see
frame.py. ``lift3d.mesh.load_mesh`` reads them back in the z-up world frame of the cameras, so
the mesh is scored against a ground truth where it was trained.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from lift3d.config import domain
from lift3d.data.reference import reference_list
from lift3d.errors import UserError
from lift3d.export.frame import EXTRAS_KEY, UP_AXES, file_from_world, frame_description, info_path_for, marker_text
from lift3d.utils import io

log = logging.getLogger("lift3d")

INPUT_VIEW = "input_view.png"   # the input as the reference camera sees it (RGBA), next to the mesh
LEVELS = ("auto", "ring")
BAKES = ("views", "volume", "surface")
UNITS = ("lift3d world units, the object's reference frame: the frame of the cameras the field was trained "
         "with (camera distance and field radius are in these units). The bundled examples and GSO ground "
         "truths are normalised to a longest bounding-box side of 1; no metric scale is known.")


@dataclass
class ExportConfig:
    """``system.export`` in experiment configs."""

    resolution: int = domain(128, ge=8)   # density samples per axis over [-radius, radius]^3
    level: str = "auto"                   # used when threshold and relative_threshold are None (level.py):
    #   auto: the level whose silhouette best matches the reference view's mask (8 views of the
    #   field's own opacity-1/2 surface when no reference is given); ring: always the 8 views
    threshold: Optional[float] = domain(None)   # absolute density iso-level (wins over everything; one that misses
    #                                             the field, below or above all of it, falls back to auto)
    relative_threshold: Optional[float] = domain(None, gt=0)  # level = this x mean density (3drec used 8)
    # Gaussian blur of the density grid, in grid cells, before the level and marching cubes. On the main
    # job's field: 872 marching-cubes pieces -> 26, watertight, xatlas 11 s -> 2 s, volume IoU +0.004.
    blur_sigma: float = domain(1.0, ge=0)          # 0: no blur
    smooth: bool = False                  # 3drec smoothing: upsample, box blur, optional erosion
    upsample: int = domain(2, ge=1)
    blur_kernel: int = domain(7, ge=1)    # odd
    erode: int = domain(0, ge=0)          # grey erosion size (3drec used 5); 0: none
    # Edit the grid so the surface agrees with the reference mask at the chosen level (mask_fit.py): empty
    # where the input camera sees background, holes and pits under its mask closed, enclosed cavities filled.
    # On the main job's mushroom: see-through 0.09 % -> 0.07 %, silhouette IoU 0.951 -> 0.988, Chamfer
    # 0.0448 -> 0.0441 (benchmarks/RESULTS.md, issue 22).
    fit_mask: bool = True
    min_component_fraction: float = domain(0.05, ge=0, le=1)  # drop components with less area than this x the largest
    max_faces: int = domain(30000, ge=4)  # decimate before xatlas (xatlas time grows fast with faces)
    texture_size: int = domain(1024, ge=16)
    texture_padding: int = domain(0, ge=0)  # texels between xatlas charts; 0: texture_size / 256, at least 2
    # views: project renders of the field (decoded, for a latent field) and the input photo onto the surface
    # (view_bake.py) | volume: the field's colour on a short ray along the normal | surface: colour at the point
    bake: str = "views"
    bake_size: int = domain(0, ge=0)      # views: render size of the baked views; 0: the data's eval size
    input_weight: float = domain(100.0, ge=0)  # views: the input photo's weight against one rendered view's
    bake_depth: float = domain(0.0, ge=0)  # volume: half-length of that ray; 0: two cells of the density grid
    bake_samples: int = domain(8, ge=1)
    glb: bool = True
    up_axis: str = "y"                    # y: glTF / Blender-import convention (file y = world z, the input
    #                                       view on file +z); z: the world frame


def check_export_config(cfg: ExportConfig) -> None:
    """What the numbers' domains (checked by parse_config) do not say; the system calls it before training too."""
    problems = [
        (cfg.level not in LEVELS, f"level must be one of {', '.join(LEVELS)}, got '{cfg.level}'"),
        (cfg.up_axis not in UP_AXES, f"up_axis must be one of {', '.join(UP_AXES)}, got '{cfg.up_axis}'"),
        (cfg.blur_kernel % 2 == 0, f"blur_kernel must be odd, got {cfg.blur_kernel}"),
        (cfg.bake not in BAKES, f"bake must be one of {', '.join(BAKES)}, got '{cfg.bake}'"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(f"system.export.{message}")


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


def export_mesh(geometry, out_dir: str, cfg: Any = None, reference=None, render=None, eval_size: int = 256) -> dict:
    """Export ``geometry`` (a BaseGeometry) to ``out_dir``; returns {"obj", "mtl", "texture", "glb", "info"} paths.

    ``reference`` (a ReferenceView, optional) lets the automatic level match the user's image
    (its camera and mask) and is projected onto the texture; several photos (a list of them, the primary first):
    the level matches all their masks, the grid is fitted to each mask and every photo is projected onto the
    texture (``input_view.png`` and ``reference_camera`` are the primary one's). ``render(cameras)`` -> (rgb on white
    (B, H, W, 3), opacity (B, H, W, 1)) draws the field for ``bake="views"`` (the system's renderer:
    it decodes a latent field, whose RGB may be larger than the cameras); without it the texture
    comes from the field's colour. ``eval_size``: the bake views' size when ``bake_size`` is 0. The level is ``cfg.threshold`` if set, else ``cfg.relative_threshold`` x
    mean density if set, else automatic (level.py). A configured level that leaves the field
    empty (or full) falls back to the automatic one, with a warning and a note in model_info.json.
    Raises UserError only when the field itself is empty, diverged or degenerate.
    """
    from lift3d.config import parse_config
    from lift3d.export.isosurface import prepare_grid

    cfg = parse_config(ExportConfig, cfg, "system.export")
    check_export_config(cfg)
    t0 = time.time()
    grid = geometry.density_grid(cfg.resolution)
    grid = grid.detach().cpu().numpy() if hasattr(grid, "detach") else np.asarray(grid)
    grid = prepare_grid(grid, cfg.smooth, cfg.upsample, cfg.blur_kernel, cfg.erode, cfg.blur_sigma)
    radius = float(geometry.cfg.radius)
    photos = reference_list(reference) if reference is not None else []
    reference = photos[0] if photos else None
    vertices, faces, info = _surface(grid, radius, cfg, photos or None)
    info["seconds_surface"] = time.time() - t0
    if cfg.bake == "views" and render is not None:
        color_fn = _view_color_fn(vertices, faces, photos or None, render, cfg.bake_size or eval_size,
                                  cfg.input_weight, info)
    else:
        depth = cfg.bake_depth if cfg.bake_depth > 0 else 2 * (2 * radius / cfg.resolution)
        color_fn = field_color_fn(geometry, "volume" if cfg.bake == "views" else cfg.bake, depth, cfg.bake_samples)
        info["bake"] = "field colour near the surface" if color_fn else "none"
    if color_fn is None:
        log.warning("the field stores latents and no renderer was given to decode them: the exported texture is "
                    "plain grey")
        color_fn = lambda p, n: np.full((len(p), 3), 0.5, np.float32)  # noqa: E731
    with io.all_or_nothing():    # a full disk at model.glb leaves the previous export, not half of a new one
        paths = write_textured_mesh(out_dir, vertices, faces, color_fn, texture_size=cfg.texture_size,
                                    padding=cfg.texture_padding, glb=cfg.glb, info=info, up_axis=cfg.up_axis)
        if reference is not None:    # what lift3d eval needs to score the export from the input camera again
            paths["input_view"] = os.path.join(out_dir, INPUT_VIEW)
            io.save_image(paths["input_view"], (reference.rgba.float().cpu().numpy() * 255 + 0.5).astype(np.uint8))
            info["reference_camera"] = camera_record(reference.camera)
            if len(photos) > 1:
                info["other_photo_cameras"] = [camera_record(p.camera) for p in photos[1:]]
        info["seconds_total"] = time.time() - t0
        info["config"] = asdict(cfg)
        io.write_json(paths["info"], info)
    log.info("export: %d faces, level %.4g (%s), texture coverage %.2f, %.1f s", info["faces"], info["threshold"],
             info["level_method"], info["texture_coverage"], info["seconds_total"])
    return paths


def camera_record(camera) -> dict:
    """One camera as model_info.json stores it (``Cameras.from_spherical``'s arguments)."""
    e, a, d = (round(float(x), 6) for x in camera.spherical[0])
    return {"elevation_deg": e, "azimuth_deg": a, "distance": d, "fovy_deg": round(float(camera.fovy_deg[0]), 6),
            "height": int(camera.height), "width": int(camera.width)}


def _view_color_fn(vertices: np.ndarray, faces: np.ndarray, reference, render, size: int, input_weight: float,
                   info: dict):
    """``color(points, normals)`` from renders of the field at the bake cameras and the input photo (every photo)."""
    import trimesh

    from lift3d.export.view_bake import BakeView, bake_cameras, bake_from_views, views_from_renders

    t0 = time.time()
    photos = reference_list(reference) if reference is not None else []
    reference = photos[0] if photos else None
    if reference is not None:
        camera = reference.camera
        distance, fovy = float(camera.distance[0]), float(camera.fovy_deg[0])
    else:
        from lift3d.cameras import Cameras

        camera, distance, fovy = Cameras.from_spherical(15.0, 0.0, 2.0, 49.13, 1, 1), 2.0, 49.13
    cameras = bake_cameras(camera, distance, fovy, size)
    rgb, opacity = render(cameras)
    views = views_from_renders(cameras, rgb, opacity)
    for photo in photos if input_weight > 0 else []:
        rgba = photo.rgba.float().cpu().numpy()
        views.append(BakeView(photo.camera[:1].to("cpu"), rgba[..., :3], rgba[..., 3], input_weight))
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    info["seconds_bake_renders"] = time.time() - t0

    def color(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        colours, seen = bake_from_views(mesh, points, normals, views)
        info["bake"] = (f"views: {len(cameras)} renders of the field at {rgb.shape[1]} px"
                        + (f" and the input photo (weight {input_weight:g})" if len(views) == len(cameras) + 1 else
                           f" and the {len(views) - len(cameras)} photos (weight {input_weight:g} each)"
                           if len(views) > len(cameras) else "")
                        + "; texels no view saw take the nearest seen texel's colour")
        info["texels_seen"] = float(seen.mean()) if len(seen) else 0.0
        return colours

    return color


def _surface(grid: np.ndarray, radius: float, cfg: ExportConfig, reference) -> tuple[np.ndarray, np.ndarray, dict]:
    """The iso-surface at the configured level, or the automatic one (also when the configured one is empty),
    of the grid fitted to the reference mask (``cfg.fit_mask``)."""
    from lift3d.export.isosurface import pick_threshold

    fallback = None
    if cfg.threshold is not None or cfg.relative_threshold is not None:
        level = pick_threshold(grid, cfg.threshold, cfg.relative_threshold)
        method = ("absolute threshold (system.export.threshold)" if cfg.threshold is not None else
                  f"relative threshold ({cfg.relative_threshold:g} x mean density)")
        try:
            return _surface_at(grid, radius, level, cfg, reference, {"level_method": method})
        except UserError as e:
            if "NaN" in str(e):
                raise
            fallback = f"the configured {method} {level:.4g} gave no usable surface ({e}); used the automatic level"
            log.warning("export: %s", fallback)
    level, details = auto_level(grid, radius, cfg.level, reference)
    extra = {"level_method": details.pop("method"), "level_details": details}
    if fallback:
        extra["level_fallback"] = fallback
    return _surface_at(grid, radius, level, cfg, reference, extra)


def _surface_at(grid: np.ndarray, radius: float, level: float, cfg: ExportConfig, reference, extra: dict):
    from lift3d.export.isosurface import surface_at_level

    if cfg.fit_mask and reference is not None and np.isfinite(grid).all():
        from lift3d.export.mask_fit import fit_to_mask

        for i, photo in enumerate(reference_list(reference)):     # several photos: fitted to each mask in turn
            grid, report = fit_to_mask(grid, radius, level, photo.camera, photo.mask)
            extra["mask_fit" if i == 0 else f"mask_fit_photo{i + 1}"] = report
    vertices, faces, info = surface_at_level(grid, radius, level, cfg.min_component_fraction, cfg.max_faces)
    info.update(extra)
    return vertices, faces, info


def auto_level(grid: np.ndarray, radius: float, mode: str = "auto", reference=None) -> tuple[float, dict]:
    """The automatic level (level.py) and how it was found."""
    from lift3d.export.isosurface import ring_level, ring_views
    from lift3d.export.level import choose_level

    details: dict = {}
    if reference is not None and mode == "auto":
        photos = reference_list(reference)
        if len(photos) == 1:
            camera, mask = photos[0].camera, photos[0].mask
        else:      # every photo's rays and mask (they share one size)
            import torch

            from lift3d.cameras import Cameras

            camera, mask = Cameras.cat([p.camera for p in photos]), torch.stack([p.mask[..., 0] for p in photos])
        level = choose_level(grid, radius, camera, mask, ring_cameras=ring_views(radius), details=details)
        details["method"] = "auto: reference view's mask (silhouette IoU)" + \
            (f" ({len(photos)} photos)" if len(photos) > 1 else "")
    else:
        level = ring_level(grid, radius, details)
        details["method"] = "auto: the field's own opacity-1/2 surface from 8 views" + \
            (" (no reference view given)" if reference is None else "")
    return level, details


def write_textured_mesh(out_dir: str, vertices: np.ndarray, faces: np.ndarray, color_fn, *, texture_size: int = 1024,
                        padding: int = 4, glb: bool = True, name: str = "model", info: Optional[dict] = None,
                        up_axis: str = "y") -> dict:
    """Unwrap, bake ``color_fn(points, normals)`` into a texture, write OBJ/MTL/PNG (+ GLB). Returns the paths.

    ``vertices`` and ``color_fn`` are in the world frame; the files get the ``up_axis`` frame
    (frame.py). ``info`` receives the texture and frame entries of model_info.json.
    """
    import trimesh

    from lift3d.export.texture import bake_texture, unwrap

    info = {} if info is None else info
    t0 = time.time()
    # Normals of the closed surface (area-weighted), so they are continuous across UV seams.
    normals = np.asarray(trimesh.Trimesh(vertices, faces, process=False).vertex_normals)
    split_vertices, split_faces, uv, vmapping, atlas = unwrap(vertices, faces, texture_size, padding)
    info["seconds_unwrap"] = time.time() - t0
    t0 = time.time()
    image, coverage = bake_texture(split_vertices, split_faces, uv, color_fn, texture_size, chunk=None)
    info.update(seconds_bake=time.time() - t0, texture_coverage=coverage, texture_size=texture_size,
                texture_atlas=atlas, vertices_uv=int(len(split_vertices)))
    paths = {"obj": os.path.join(out_dir, f"{name}.obj"), "mtl": os.path.join(out_dir, f"{name}.mtl"),
             "texture": os.path.join(out_dir, f"{name}.png")}
    paths["info"] = info_path_for(paths["obj"])
    rotation = file_from_world(up_axis)
    file_vertices, file_normals = vertices @ rotation.T, normals @ rotation.T
    io.save_image(paths["texture"], image)
    io.write_text(paths["mtl"], _mtl_text(os.path.basename(paths["texture"])))
    io.write_text(paths["obj"], _obj_text(file_vertices, file_normals, faces, uv, split_faces, vmapping,
                                          os.path.basename(paths["mtl"]), up_axis))
    files = {os.path.basename(paths["obj"]): frame_description(up_axis)}
    if glb:
        paths["glb"] = os.path.join(out_dir, f"{name}.glb")
        to_gltf = file_from_world("y")
        _write_glb(paths["glb"], (vertices @ to_gltf.T)[vmapping], (normals @ to_gltf.T)[vmapping], split_faces, uv,
                   image)
        files[os.path.basename(paths["glb"])] = frame_description("y")
    info.update(units=UNITS, world_frame="lift3d world: z up; the reference camera (azimuth 0) looks from +x",
                files=files)
    return paths


def _mtl_text(texture_name: str) -> str:
    return ("# lift3d export\nnewmtl material_0\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\n"
            f"Ns 10.0\nillum 1\nmap_Kd {texture_name}\n")


def _obj_text(vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray, uv: np.ndarray, uv_faces: np.ndarray,
              vmapping: np.ndarray, mtl_name: str, up_axis: str) -> str:
    """OBJ with one position and normal per surface vertex and one UV per chart corner.

    Written here rather than with trimesh's OBJ writer, which repeats every position along the
    UV seams: the file would then fall apart into one piece per texture chart in Blender.
    ``faces`` index ``vertices``/``normals``; ``uv_faces`` index ``uv``; ``vmapping`` takes a UV
    vertex to its surface vertex.
    """
    p = vmapping[uv_faces] + 1
    t = uv_faces + 1
    lines = [marker_text(up_axis),
             f"# lift3d export: {len(vertices)} vertices, {len(faces)} faces, {len(uv)} texture coordinates; "
             "frame and units in model_info.json",
             f"mtllib {mtl_name}", "o model"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uv]
    lines += [f"vn {x:.5f} {y:.5f} {z:.5f}" for x, y, z in normals]
    lines += ["usemtl material_0", "s 1"]
    lines += [f"f {a}/{d}/{a} {b}/{e}/{b} {c}/{f}/{c}" for (a, b, c), (d, e, f) in zip(p, t)]
    return "\n".join(lines) + "\n"


def _write_glb(path: str, vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray, uv: np.ndarray,
               image: np.ndarray) -> None:
    """glTF binary, y-up as the glTF specification says, with NORMAL and TEXCOORD_0 attributes."""
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(image), metallicFactor=0.0,
                                                   roughnessFactor=1.0, doubleSided=False)
    mesh = trimesh.Trimesh(vertices, faces, vertex_normals=normals, process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
                           metadata={EXTRAS_KEY: {"up_axis": "y", "front": "+z"}})
    data = mesh.export(file_type="glb", include_normals=True, tree_postprocessor=_buffer_view_targets)
    io.write_bytes(path, data)


def _buffer_view_targets(tree: dict) -> None:
    """Mark vertex and index buffer views (ARRAY_BUFFER / ELEMENT_ARRAY_BUFFER), as the Khronos
    validator recommends; trimesh leaves ``bufferView.target`` unset."""
    accessors, views = tree.get("accessors", []), tree.get("bufferViews", [])
    for mesh in tree.get("meshes", []):
        for primitive in mesh.get("primitives", []):
            targets = [(a, 34962) for a in primitive.get("attributes", {}).values()]
            if "indices" in primitive:
                targets.append((primitive["indices"], 34963))
            for accessor, target in targets:
                view = accessors[accessor].get("bufferView")
                if view is not None:
                    views[view]["target"] = target
