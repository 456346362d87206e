"""Multi-view training data for Zero123: generate it (CPU ray casting) and read it back.

On-disk layout (what ``lift3d train-zero123 --data ROOT`` reads; a GPU user with Objaverse-style
renders can write the same thing from Blender):

    ROOT/split.json                {"train": [object ids], "heldout": [object ids]}
    ROOT/dataset.json              how the data was made (free-form, for the model card)
    ROOT/<object_id>/000.png ...   RGBA renders, straight alpha, all the same square size
    ROOT/<object_id>/cameras.json  {"fovy_deg": F, "views": [{"file": "000.png", "elevation_deg": e,
                                    "azimuth_deg": a, "distance": r, "c2w": 4x4 (OpenGL, world z-up)}, ...],
                                    "bench": {"input": i, "offsets": {"90": j, "180": k}}   (optional)}

Objects are normalised (longest bounding-box side 1, centred at the origin) and viewed from random
points on a sphere around them; the trainer composites the RGBA on white as Zero123 did.

Generated sources (object ids): ``proc-NNNNN`` procedural shapes (:mod:`lift3d.training.shapes`),
``urdf-NNN`` pybullet's ``random_urdfs``, ``pyb-NAME`` pybullet's textured/scanned meshes, and
``example-NAME`` the bundled examples (``examples/objects/*``, always held out).
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Optional

import numpy as np
import torch

from lift3d.cameras import Cameras, sample_views
from lift3d.errors import UserError
from lift3d.utils.inputs import read_json_object
from lift3d.utils.io import save_image, write_json

FOVY_DEG = 49.13                     # Zero123 / SyncDreamer renders
ELEVATION_RANGE = (-10.0, 70.0)
DISTANCE_RANGE = (1.5, 2.2)          # Zero123's Objaverse renders: radius U[1.5, 2.2]
BENCH_ELEVATION, BENCH_DISTANCE = 30.0, 1.8
PYBULLET_MESHES = {                  # name -> obj path inside pybullet_data
    "duck": "duck.obj", "soccerball": "soccerball.obj", "laikago": "laikago/chassis.obj",
    "a1": "a1/meshes/trunk.obj", "aliengo": "aliengo/meshes/trunk.obj", "sphere": "textured_sphere_smooth.obj",
    "jenga": "jenga/jenga.obj", "table": "table/table.obj", "domino": "domino/domino.obj",
    "tray": "tray/tray_textured.obj", "bunny": "bunny.obj", "teddy": "teddy2_VHACD_CHs.obj",
}
HELDOUT_PYBULLET = ("duck", "bunny")
HELDOUT_URDF_FROM = 900              # random_urdfs 900..999 are held out
HELDOUT_PROC_FROM = 100_000          # procedural seeds >= this are held out


def _pybullet_data_path() -> str:
    try:
        import pybullet_data
    except ImportError:
        from lift3d.errors import UserError

        raise UserError("the pybullet meshes of the training set need pybullet: pip install pybullet") from None
    return pybullet_data.getDataPath()


def object_sources(n_procedural: int, n_urdf: int, n_heldout_procedural: int = 16, n_heldout_urdf: int = 12,
                   examples_dir: Optional[str] = "examples", pybullet_meshes: bool = True) -> list[tuple[str, str, Callable]]:
    """``(object_id, split, make_mesh)`` for every object to generate."""
    from lift3d.mesh import load_mesh
    from lift3d.training.shapes import procedural_object

    root = _pybullet_data_path() if (n_urdf or n_heldout_urdf or pybullet_meshes) else ""
    out = []
    for seed in range(n_procedural):
        out.append((f"proc-{seed:06d}", "train", lambda s=seed: procedural_object(s)))
    for seed in range(HELDOUT_PROC_FROM, HELDOUT_PROC_FROM + n_heldout_procedural):
        out.append((f"proc-{seed:06d}", "heldout", lambda s=seed: procedural_object(s)))
    urdf = [(i, split) for i, split in [(i, "train") for i in range(min(n_urdf, HELDOUT_URDF_FROM))]
            + [(i, "heldout") for i in range(HELDOUT_URDF_FROM, HELDOUT_URDF_FROM + n_heldout_urdf)]]
    for i, split in urdf:
        paths = sorted(glob.glob(os.path.join(root, "random_urdfs", f"{i:03d}", "*.obj")))
        if paths:
            out.append((f"urdf-{i:03d}", split, lambda p=paths[0], s=i: painted(load_mesh(p), s)))
    for name, rel in PYBULLET_MESHES.items() if pybullet_meshes else ():
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            split = "heldout" if name in HELDOUT_PYBULLET else "train"
            out.append((f"pyb-{name}", split, lambda p=path: load_mesh(p)))
    if examples_dir:
        for path in sorted(glob.glob(os.path.join(examples_dir, "objects", "*", "meshes", "model.obj"))):
            name = path.split(os.sep)[-3]
            out.append((f"example-{name}", "heldout", lambda p=path: load_mesh(p)))
    return out


def painted(mesh, seed: int):
    """Give an untextured (grey) mesh random procedural vertex colours, for colour variety."""
    import trimesh

    from lift3d.training.shapes import _paint

    if mesh.visual.kind == "texture":
        return mesh
    local = (mesh.vertices - mesh.bounds.mean(0)) / max(float(np.ptp(mesh.bounds, 0).max()), 1e-9)
    rgb = _paint(np.asarray(local), np.random.default_rng(seed + 7_000_000))
    rgba = np.concatenate([rgb, np.ones((len(rgb), 1))], -1)
    return trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=(rgba * 255).astype(np.uint8), process=False)


def random_cameras(n: int, size: int, seed: int) -> Cameras:
    g = torch.Generator().manual_seed(seed)
    return sample_views(n, ELEVATION_RANGE, (0.0, 360.0), DISTANCE_RANGE, (FOVY_DEG, FOVY_DEG), size, size,
                        uniform_sphere_fraction=0.5, generator=g)


def bench_cameras(size: int, seed: int) -> Cameras:
    """Input view at elevation 30°, a random azimuth; targets at +90° and +180° azimuth."""
    a0 = float(np.random.default_rng(seed).uniform(0, 360))
    return Cameras.from_spherical(BENCH_ELEVATION, [a0, a0 + 90, a0 + 180], BENCH_DISTANCE, FOVY_DEG, size, size)


def render_views(mesh, cameras: Cameras, samples_per_pixel: int = 4) -> np.ndarray:
    """(B, H, W, 4) uint8 RGBA renders of an already normalised mesh."""
    from lift3d.mesh import MeshRaycaster

    rgba = MeshRaycaster(mesh).render(cameras, shading="lambert", samples_per_pixel=samples_per_pixel)["rgba"]
    return (rgba.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def write_object(folder: str, mesh, n_views: int, size: int, seed: int, bench: bool) -> None:
    """Render ``mesh`` (normalised here) into ``folder`` in the documented layout."""
    from lift3d.mesh import normalize_mesh

    mesh, _, _ = normalize_mesh(mesh)
    cams = random_cameras(n_views, size, seed)
    if bench:
        cams = Cameras.cat([cams, bench_cameras(size, seed)])
    images = render_views(mesh, cams)
    views = []
    for i, (img, c) in enumerate(zip(images, cams)):
        name = f"{i:03d}.png"
        save_image(os.path.join(folder, name), img)
        views.append({"file": name, "elevation_deg": float(c.elevation_deg[0]), "azimuth_deg": float(c.azimuth_deg[0]) % 360,
                      "distance": float(c.distance[0]), "c2w": c.c2w[0].tolist()})
    meta = {"fovy_deg": FOVY_DEG, "views": views}
    if bench:
        meta["bench"] = {"input": n_views, "offsets": {"90": n_views + 1, "180": n_views + 2}}
    write_json(os.path.join(folder, "cameras.json"), meta)  # written last: marks the object complete


def generate_dataset(root: str, n_procedural: int = 600, n_urdf: int = 300, n_views: int = 12, size: int = 64,
                     examples_dir: Optional[str] = "examples", log: Callable = print, **kw) -> dict:
    """Generate (or finish generating: complete objects are skipped) a dataset under ``root``."""
    sources = object_sources(n_procedural, n_urdf, examples_dir=examples_dir, **kw)
    split = {"train": [], "heldout": []}
    for k, (object_id, which, make) in enumerate(sources):
        folder = os.path.join(root, object_id)
        if not os.path.isfile(os.path.join(folder, "cameras.json")):
            try:
                mesh = make()
            except Exception as e:  # an unreadable asset is skipped, not fatal
                log(f"skipping {object_id}: {e}")
                continue
            write_object(folder, mesh, n_views, size, seed=k + 1, bench=which == "heldout")
        split[which].append(object_id)
        if (k + 1) % 50 == 0:
            log(f"{k + 1}/{len(sources)} objects")
    write_json(os.path.join(root, "split.json"), split)
    write_json(os.path.join(root, "dataset.json"), {
        "generator": "lift3d.training.data.generate_dataset", "n_procedural": n_procedural, "n_urdf": n_urdf,
        "n_views": n_views, "size": size, "fovy_deg": FOVY_DEG, "elevation_range": ELEVATION_RANGE,
        "distance_range": DISTANCE_RANGE, "shading": "lambert", "samples_per_pixel": 4})
    return split


# --------------------------------------------------------------------------- reading


def read_object(folder: str) -> tuple[np.ndarray, dict]:
    """(V, H, W, 4) uint8 RGBA and the parsed cameras.json of one object folder."""
    import imageio.v3 as iio

    path = os.path.join(folder, "cameras.json")
    if not os.path.lexists(path):
        raise UserError(f"{folder} has no cameras.json; see lift3d/training/data.py for the dataset layout")
    meta = read_json_object(path, "cameras file", "see lift3d/training/data.py for the dataset layout", keys=("views",))
    images = []
    for v in meta["views"]:
        img = iio.imread(os.path.join(folder, v["file"]))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        if img.shape[-1] == 3:
            img = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], -1)
        images.append(img)
    return np.stack(images), meta


def on_white(rgba: torch.Tensor) -> torch.Tensor:
    """(..., 4, H, W) straight-alpha RGBA in [0, 1] -> (..., 3, H, W) composited on white."""
    rgb, a = rgba[..., :3, :, :], rgba[..., 3:, :, :]
    return rgb * a + (1 - a)


class MultiViewSet:
    """All views of one split in memory: ``images`` (N, V, 3, S, S) uint8 on white, ``positions`` (N, V, 3).

    Only the random views are used (``bench`` views, if any, are kept apart in ``bench``).
    """

    def __init__(self, root: str, split: str = "train", limit: Optional[int] = None):
        path = os.path.join(root, "split.json")
        if not os.path.lexists(path):
            raise UserError(f"no split.json in {root}; generate data with `lift3d train-zero123 --make-data` "
                            "or write the layout described in lift3d/training/data.py")
        splits = read_json_object(path, "dataset split", "see lift3d/training/data.py for the layout")
        if not isinstance(splits.get(split, []), list):
            raise UserError(f"{path}: split {split!r} must be a list of object folders")
        ids = splits.get(split, [])[:limit]
        if not ids:
            raise UserError(f"split {split!r} of {root} is empty")
        images, positions, self.bench = [], [], {}
        n_views = None
        for object_id in ids:
            rgba, meta = read_object(os.path.join(root, object_id))
            n_random = len(meta["views"]) - (3 if "bench" in meta else 0)
            n_views = n_views or n_random
            if n_random < n_views:
                raise UserError(f"{object_id} has {n_random} views, expected {n_views}: all objects need the same count")
            rgb = on_white(torch.from_numpy(rgba).permute(0, 3, 1, 2).float() / 255)
            rgb8 = (rgb * 255 + 0.5).to(torch.uint8)
            images.append(rgb8[:n_views])
            positions.append(torch.tensor([v["c2w"] for v in meta["views"][:n_views]])[:, :3, 3])
            if "bench" in meta:
                b = meta["bench"]
                idx = [b["input"]] + [b["offsets"][k] for k in sorted(b["offsets"], key=float)]
                self.bench[object_id] = {"images": rgb8[idx], "cameras": [meta["views"][i] for i in idx],
                                         "offsets": sorted(b["offsets"], key=float)}
        self.ids = ids
        self.images = torch.stack(images)
        self.positions = torch.stack(positions).float()
        self.fovy_deg = float(meta["fovy_deg"])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        return self.images.shape[-1]
