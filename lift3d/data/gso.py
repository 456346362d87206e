"""Google Scanned Objects (GSO) folders and their evaluation renders.

A dataset is a folder of objects in the GSO layout (what Gazebo Fuel's zips unpack to)::

    <dataset>/<NAME>/meshes/model.obj            # + meshes/model.mtl ("map_Kd texture.png")
    <dataset>/<NAME>/materials/textures/texture.png
    <dataset>/<NAME>/metadata.pbtxt              # name, description, license, ...

The .mtl names ``texture.png`` next to itself although it lives in materials/textures/;
lift3d.mesh.io.load_mesh resolves that. ``render_gso`` renders the SyncDreamer evaluation set-up
on the CPU: the object normalised to longest side 1 and centred, 16 views at elevation 30 deg,
azimuth every 22.5 deg, distance 1.5, 256 x 256, fovy 49.13 deg; view 000 is the input view.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from lift3d.config import Domain, number_arg
from lift3d.errors import UserError
from lift3d.utils import io

MESH_PATH = os.path.join("meshes", "model.obj")
# The render's numbers (render_gso's keywords and render-gso's flags). A camera inside the normalised object's
# bounding sphere (radius sqrt(3)/2) sees it from within.
RESOLUTION, VIEWS = Domain(ge=1, le=8192), Domain(ge=1, le=10000)
ELEVATION, FOVY = Domain(ge=-90, le=90), Domain(gt=0, lt=180)
DISTANCE = Domain(gt=0.87, why="the camera outside the object's bounding sphere")
DEPTH_NEAR, DEPTH_FAR = 0.6, 2.4      # SyncDreamer's 16-bit depth PNG range (0 = background)


def mesh_path(object_dir: str) -> str:
    """Path of the object's mesh; UserError when ``object_dir`` is not in the GSO layout."""
    path = os.path.join(object_dir, MESH_PATH)
    if not os.path.isfile(path):
        raise UserError(f"{object_dir} is not a GSO object folder (no {MESH_PATH}); "
                        "pass a folder laid out as <NAME>/meshes/model.obj")
    return path


def list_objects(dataset_dir: str, names: Optional[list[str]] = None) -> list[str]:
    """Sorted object names (sub-folders with meshes/model.obj); ``names`` selects and checks a subset."""
    if not os.path.isdir(dataset_dir):
        raise UserError(f"dataset folder not found: {dataset_dir}")
    found = sorted(n for n in os.listdir(dataset_dir) if os.path.isfile(os.path.join(dataset_dir, n, MESH_PATH)))
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise UserError(f"object(s) {', '.join(missing)} not in {dataset_dir} (found: {', '.join(found) or 'none'})")
        return list(names)
    if not found:
        raise UserError(f"no objects in {dataset_dir}: expected sub-folders with {MESH_PATH}")
    return found


def read_metadata(object_dir: str) -> dict:
    """Top-level ``key: "value"`` fields of metadata.pbtxt (name, description, license, ...); {} if absent."""
    path = os.path.join(object_dir, "metadata.pbtxt")
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, errors="replace") as f:
        for key, value in re.findall(r'^\s*(\w+)\s*:\s*"((?:[^"\\]|\\.)*)"', f.read(), flags=re.M):
            out.setdefault(key, value)
    return out


def load_object(object_dir: str, normalize: bool = True):
    """The object's textured mesh (trimesh), normalised to longest side 1 and centred by default."""
    from lift3d.mesh.io import load_mesh

    return load_mesh(mesh_path(object_dir), normalize=normalize)


def _encode_depth(z: np.ndarray, valid: np.ndarray) -> np.ndarray:
    scaled = np.clip((z - DEPTH_NEAR) / (DEPTH_FAR - DEPTH_NEAR), 0, 1) * 65535
    return np.where(valid, np.round(scaled), 0).astype(np.uint16)


def _save_png16(path: str, image: np.ndarray) -> None:
    import imageio.v3 as iio

    with io.atomic_path(path) as tmp:   # io.save_image would squash uint16 to 8 bits
        iio.imwrite(tmp, image)


def decode_depth(png: np.ndarray) -> np.ndarray:
    """z-depth from a depth PNG written by :func:`render_gso`; 0 where there is no object."""
    png = np.asarray(png)
    z = DEPTH_NEAR + png.astype(np.float64) / 65535 * (DEPTH_FAR - DEPTH_NEAR)
    return np.where(png > 0, z, 0.0)


def render_gso(object_dir: str, out_dir: str, *, resolution: Optional[int] = None, n_views: Optional[int] = None,
               elevation_deg: Optional[float] = None, distance: Optional[float] = None,
               fovy_deg: Optional[float] = None, samples_per_pixel: int = 4, shading: str = "lambert") -> dict:
    """Render the input view and the evaluation views of a GSO-layout object into ``out_dir``.

    Writes ``NNN.png`` (RGBA), ``NNN-depth.png`` (uint16 z-depth, linear over [0.6, 2.4], 0 = empty,
    as SyncDreamer's set), ``input.png`` (= view 000) and ``cameras.json`` (poses, intrinsics,
    the normalisation applied to the mesh). Defaults are the SyncDreamer set-up. Returns paths.
    """
    from lift3d.cameras import orbit_views
    from lift3d.evaluation import protocols as P
    from lift3d.mesh.io import load_mesh, normalize_mesh
    from lift3d.mesh.raycast import MeshRaycaster

    resolution = P.EVAL_RESOLUTION if resolution is None else int(resolution)
    n_views = P.EVAL_N_VIEWS if n_views is None else int(n_views)
    elevation_deg = P.EVAL_ELEVATION_DEG if elevation_deg is None else float(elevation_deg)
    distance = P.EVAL_DISTANCE if distance is None else float(distance)
    fovy_deg = P.EVAL_FOVY_DEG if fovy_deg is None else float(fovy_deg)
    for flag, value, dom in (("--resolution", resolution, RESOLUTION), ("--views", n_views, VIEWS),
                             ("--elevation", elevation_deg, ELEVATION), ("--distance", distance, DISTANCE),
                             ("--fovy", fovy_deg, FOVY)):
        if dom.problem(value):
            raise UserError(f"{flag} {dom.problem(value)}")
    source = mesh_path(object_dir)
    mesh, scale, offset = normalize_mesh(load_mesh(source))
    cameras = orbit_views(n_views, elevation_deg, distance, fovy_deg, resolution, resolution)
    caster = MeshRaycaster(mesh)
    views, paths = [], {}
    for i in range(n_views):
        cam = cameras[i]
        out = caster.render(cam, shading=shading, samples_per_pixel=samples_per_pixel)
        forward = -cam.c2w[0, :3, 2].numpy()
        _, directions = cam.rays()
        z = out["depth"][0].numpy() * (directions[0].numpy() @ forward)   # ray distance -> z-depth
        rgba = out["rgba"][0].numpy()
        name = f"{i:03d}"
        io.save_image(os.path.join(out_dir, f"{name}.png"), rgba)
        _save_png16(os.path.join(out_dir, f"{name}-depth.png"), _encode_depth(z, rgba[..., 3] > 0))
        if i == 0:
            io.save_image(os.path.join(out_dir, "input.png"), rgba)
        views.append({"index": i, "image": f"{name}.png", "depth": f"{name}-depth.png",
                      "elevation_deg": elevation_deg, "azimuth_deg": float(cam.azimuth_deg[0] % 360),
                      "distance": float(distance), "fovy_deg": float(fovy_deg),
                      "c2w": cam.c2w[0].tolist(), "K": cam.intrinsics()[0].tolist()})
    meta = {
        "object": os.path.basename(os.path.normpath(object_dir)),
        "source_mesh": os.path.abspath(source),
        "metadata": read_metadata(object_dir),
        "normalization": {"scale": float(scale), "offset": np.asarray(offset).tolist(),
                          "rule": "v_normalized = v * scale + offset (longest bbox side 1, bbox centred)"},
        "input_view": 0, "input_image": "input.png", "width": resolution, "height": resolution,
        "conventions": ("lift3d world (z-up); camera at elevation/azimuth/distance looking at the origin; c2w is "
                        "OpenGL-style (camera looks down -z); K in pixels (x right, y down)"),
        "depth_png": {"encoding": "uint16, z = near + value / 65535 * (far - near), 0 = background",
                      "near": DEPTH_NEAR, "far": DEPTH_FAR, "kind": "z-depth along the camera axis"},
        "render": {"renderer": "lift3d.mesh.raycast.MeshRaycaster (embree)", "shading": shading,
                   "samples_per_pixel": samples_per_pixel},
        "views": views,
    }
    paths["cameras"] = os.path.join(out_dir, "cameras.json")
    paths["input"] = os.path.join(out_dir, "input.png")
    io.write_json(paths["cameras"], meta)   # written last: its presence marks a complete render
    return paths


def render_main(argv: list) -> int:
    """``lift3d render-gso --object DIR --out DIR [...]``."""
    import argparse

    from lift3d.evaluation import protocols as P

    p = argparse.ArgumentParser(prog="lift3d render-gso", description="Render the input view and the evaluation "
                                "views (RGBA + depth + cameras.json) of a GSO-layout object on the CPU.")
    p.add_argument("--object", required=True, help="object folder (<NAME>/meshes/model.obj inside)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resolution", type=number_arg(int, RESOLUTION), default=P.EVAL_RESOLUTION)
    p.add_argument("--views", type=number_arg(int, VIEWS), default=P.EVAL_N_VIEWS,
                   help="views evenly spaced in azimuth")
    p.add_argument("--elevation", type=number_arg(float, ELEVATION), default=P.EVAL_ELEVATION_DEG,
                   help="degrees")
    p.add_argument("--distance", type=number_arg(float, DISTANCE), default=P.EVAL_DISTANCE,
                   help="camera distance from the object's centre (the object's longest side is 1)")
    p.add_argument("--fovy", type=number_arg(float, FOVY), default=P.EVAL_FOVY_DEG,
                   help="vertical field of view, degrees")
    p.add_argument("--samples-per-pixel", type=number_arg(int, ge=1), default=4, help="a square number (antialiasing)")
    p.add_argument("--shading", choices=("lambert", "albedo"), default="lambert")
    args = p.parse_args(argv)
    k = int(round(args.samples_per_pixel ** 0.5))
    if k < 1 or k * k != args.samples_per_pixel:
        raise UserError(f"--samples-per-pixel must be a square number (1, 4, 9, ...), got {args.samples_per_pixel}")
    paths = render_gso(args.object, args.out, resolution=args.resolution, n_views=args.views,
                       elevation_deg=args.elevation, distance=args.distance, fovy_deg=args.fovy,
                       samples_per_pixel=args.samples_per_pixel, shading=args.shading)
    print(paths["cameras"])
    return 0
