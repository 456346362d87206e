"""Exported files: y-up frame read back as world z-up, normals, atlas coverage, manifold repair, auto level."""

import json
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import trimesh

from lift3d.cameras import Cameras
from lift3d.evaluation.metrics import evaluate
from lift3d.export.isosurface import make_manifold, manifold_stats, marching_cubes
from lift3d.export.isosurface import ring_views
from lift3d.export.level import Rays, choose_level
from lift3d.export.mesh import export_mesh
from lift3d.geometry.base import BaseGeometry
from lift3d.mesh.io import load_mesh
from lift3d.mesh.raycast import MeshRaycaster

CENTER = (0.05, -0.15, 0.1)
SEMI_AXES = (0.18, 0.25, 0.45)      # tallest along world z


class TallField(BaseGeometry):
    """A solid ellipsoid, tallest along world z and off-centre, coloured by height."""

    @dataclass
    class Config(BaseGeometry.Config):
        density_scale: float = 60.0

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, points):
        q = (points - torch.tensor(CENTER)) / torch.tensor(SEMI_AXES)
        density = self.cfg.density_scale * torch.sigmoid((1 - q.norm(dim=-1)) * 30)
        t = (points[:, 2:3] + 1) / 2
        return {"density": density, "features": torch.cat([t, 0.5 * torch.ones_like(t), 1 - t], -1)}


def _ellipsoid():
    mesh = trimesh.creation.icosphere(4, 1.0)
    mesh.apply_scale(SEMI_AXES)
    mesh.apply_translation(CENTER)
    return mesh


def _glb_json(path):
    with open(path, "rb") as f:
        data = f.read()
    length = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20:20 + length])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    field = TallField({"radius": 0.6})
    out = {}
    for up in ("y", "z"):
        folder = tmp_path_factory.mktemp(f"up{up}")
        # Default settings except the grid resolution (test time).
        out[up] = export_mesh(field, str(folder), {"resolution": 64, "up_axis": up})
    return out


def test_glb_is_y_up_with_normals(exports):
    paths = exports["y"]
    raw = trimesh.load(paths["glb"], force="mesh", process=False)   # the file as any glTF viewer reads it
    lo, hi = raw.bounds
    extent = hi - lo
    assert np.argmax(extent) == 1                                   # tallest along glTF +y
    assert np.allclose(extent, [2 * SEMI_AXES[1], 2 * SEMI_AXES[2], 2 * SEMI_AXES[0]], atol=0.07)
    centre = (lo + hi) / 2                                          # (y, z, x) of the world centre
    assert np.allclose(centre, [CENTER[1], CENTER[2], CENTER[0]], atol=0.02)
    primitive = _glb_json(paths["glb"])["meshes"][0]["primitives"][0]
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= set(primitive["attributes"])
    # Normals point outwards: along the vector from the centre.
    normals = np.asarray(raw.vertex_normals)
    assert (np.einsum("ij,ij->i", normals, raw.vertices - centre) > 0).mean() > 0.99
    # Written as a proper rotation: outward winding kept (positive volume).
    assert raw.volume > 0


def test_obj_frames_normals_and_info(exports):
    y_obj = exports["y"]["obj"]
    text = open(y_obj).read()
    assert text.startswith("# lift3d export frame: up_axis=y front=+z")
    n_v, n_vn = text.count("\nv "), text.count("\nvn ")
    assert n_v == n_vn > 100
    raw = trimesh.load(y_obj, force="mesh", process=False)
    assert np.argmax(np.ptp(raw.vertices, axis=0)) == 1
    # One position per surface point: the OBJ is one closed piece, not one piece per UV chart.
    positions = np.array([line.split()[1:] for line in text.splitlines() if line.startswith("v ")], float)
    assert len(np.unique(positions.round(6), axis=0)) == len(positions)
    info = json.load(open(exports["y"]["info"]))
    assert info["files"]["model.obj"]["up_axis"] == "y" and info["files"]["model.glb"]["up_axis"] == "y"
    assert json.load(open(exports["z"]["info"]))["files"]["model.obj"]["up_axis"] == "z"
    assert "world units" in info["units"] and info["level_method"].startswith("auto")
    assert info["non_manifold_edges"] == 0 and info["watertight"] and info["components"] == 1
    # The atlas fills at least half of the texture at default settings.
    assert info["texture_coverage"] >= 0.5, info["texture_atlas"]
    for paths in exports.values():     # the loader brings every file back to the world frame
        for key in ("obj", "glb"):
            world = load_mesh(paths[key])
            assert np.argmax(np.ptp(world.vertices, axis=0)) == 2
            assert np.allclose(world.bounds.mean(0), CENTER, atol=0.02)


def test_scores_identical_in_every_file_frame(exports):
    gt = _ellipsoid()
    options = {"n_points": 20000, "iou_resolutions": (32,)}
    y, z = (evaluate(exports[k]["obj"], gt, "surface", **options) for k in ("y", "z"))
    for key in ("chamfer_distance", "volume_iou"):
        assert y[key] == z[key]
    glb = evaluate(exports["y"]["glb"], gt, "surface", **options)
    assert glb["volume_iou"] == pytest.approx(y["volume_iou"], abs=2e-3)
    assert glb["chamfer_distance"] == pytest.approx(y["chamfer_distance"], rel=0.05)
    # (the ground truth is normalised by evaluate(): the absolute numbers here mean little)


def test_choose_level_matches_the_reference_silhouette():
    # The ellipsoid's grid, seen by a reference camera whose mask is the true ellipsoid's silhouette.
    field = TallField({"radius": 0.6})
    grid = field.density_grid(64).numpy()
    camera = Cameras.from_spherical(30.0, 0.0, 1.5, 49.13, 64, 64)
    mask = MeshRaycaster(_ellipsoid()).render(camera)["rgba"][0, ..., 3:]
    details = {}
    level = choose_level(grid, 0.6, camera, mask, details=details)
    assert 0 < level < grid.max() and details["silhouette_iou"] > 0.95
    v, f = marching_cubes(grid, level, 0.6)
    q = np.linalg.norm((v - np.array(CENTER)) / np.array(SEMI_AXES), axis=1)
    assert abs(np.median(q) - 1) < 0.05
    # A mask of a shrunken ellipsoid asks for a higher level (a smaller surface).
    small = _ellipsoid()
    small.apply_translation(-np.array(CENTER))
    small.apply_scale(0.9)
    small.apply_translation(CENTER)
    small_mask = MeshRaycaster(small).render(camera)["rgba"][0, ..., 3:]
    assert choose_level(grid, 0.6, camera, small_mask) > level


def test_choose_level_keeps_a_faint_shell_the_mask_asks_for():
    # A dense core (density 40, radius 0.2) in a faint shell (density 3, radius 0.35): a distilled field's
    # thin core in its haze. The field renders the core (a ray through the shell alone reaches opacity
    # 1 - exp(-3 * 0.3) ~ 0.6 at most), but when the mask is the shell's silhouette, the level keeps the shell.
    n, radius = 64, 0.6
    c = (np.arange(n) + 0.5) / n * 2 * radius - radius
    r = np.linalg.norm(np.stack(np.meshgrid(c, c, c, indexing="ij"), -1), axis=-1)
    grid = np.where(r < 0.2, 40.0, np.where(r < 0.35, 3.0, 0.0)).astype(np.float32)
    camera = Cameras.from_spherical(30.0, 0.0, 1.5, 49.13, 64, 64)

    def mask(sphere_radius):
        return MeshRaycaster(trimesh.creation.icosphere(4, sphere_radius)).render(camera)["rgba"][0, ..., 3:]

    shell = choose_level(grid, radius, camera, mask(0.35))
    core = choose_level(grid, radius, camera, mask(0.2))
    assert 0 < shell < 3 < core < 40


def test_choose_level_leaves_a_cup_open_that_its_silhouette_cannot_see_into():
    # A cup: walls and floor of density 40 around a cavity open at the top, which holds a faint haze
    # (density 1.2: a ray through it stays under opacity 1/2). Seen from the side, levels below the
    # walls' density give silhouettes within a pixel of each other; the ring's views from above see the
    # floor through the haze, so the level must leave the haze out (and the cup open).
    n, radius = 64, 0.6
    c = (np.arange(n) + 0.5) / n * 2 * radius - radius
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    r = np.hypot(x, y)
    cup = (r < 0.3) & (np.abs(z) < 0.3)
    cavity = (r < 0.22) & (z > -0.22) & (z < 0.3)
    grid = np.where(cup & ~cavity, 40.0, np.where(cavity, 1.2, 0.0)).astype(np.float32)
    side = Cameras.from_spherical(0.0, 0.0, 1.5, 49.13, 64, 64)
    mask = Rays.cast(torch.as_tensor(grid), radius, side, None, 64, 256).sigma.amax(1).reshape(64, 64) > 1.0
    details = {}
    level = choose_level(grid, radius, side, mask, ring_cameras=ring_views(radius), details=details)
    assert 1.2 < level < 40 and details["silhouette_iou"] > 0.97, (level, details)


def test_make_manifold_splits_touching_boxes():
    # Two boxes sharing one edge: after merging, that edge has four faces.
    a = trimesh.creation.box(bounds=[[0, 0, 0], [1, 1, 1]])
    b = trimesh.creation.box(bounds=[[1, 1, 0], [2, 2, 1]])
    both = trimesh.util.concatenate([a, b])
    both.merge_vertices()
    v, f = np.asarray(both.vertices), np.asarray(both.faces)
    assert manifold_stats(v, f)["non_manifold_edges"] == 1
    v2, f2, report = make_manifold(v, f)
    stats = manifold_stats(v2, f2)
    assert stats == {"non_manifold_edges": 0, "boundary_edges": 0, "components": 2, "watertight": True}
    assert report["non_manifold_vertices_split"] == 2 and len(f2) == len(f)
    assert trimesh.Trimesh(v2, f2).volume == pytest.approx(2.0)


def test_export_with_reference_view_uses_its_mask(tmp_path):
    from lift3d.data.reference import ReferenceView

    camera = Cameras.from_spherical(30.0, 0.0, 1.5, 49.13, 48, 48)
    render = MeshRaycaster(_ellipsoid()).render(camera)["rgba"][0]
    reference = ReferenceView(render, camera)
    paths = export_mesh(TallField({"radius": 0.6}), str(tmp_path),
                        {"resolution": 40, "texture_size": 128, "max_faces": 2000}, reference=reference)
    info = json.load(open(paths["info"]))
    assert info["level_method"].startswith("auto: reference")
    assert info["level_details"]["silhouette_iou"] > 0.9 and 0 < info["threshold"] <= info["level_details"]["surface_level"]


def test_reference_view_faces_gltf_front(exports):
    # The reference camera (azimuth 0) looks from world +x: in the GLB that side is glTF's front, +z, and the
    # camera's image-right (world +y) is file +x, as a viewer's default front camera shows it.
    raw = trimesh.load(exports["y"]["glb"], force="mesh", process=False)
    world = np.asarray(_ellipsoid().vertices)
    file_points = world @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]).T
    lo, hi = raw.bounds
    assert np.allclose((lo + hi) / 2, (file_points.min(0) + file_points.max(0)) / 2, atol=0.02)
    info = json.load(open(exports["y"]["info"]))
    assert info["files"]["model.glb"]["reference_view_side"] == "+z"


def test_exports_in_the_earlier_frame_still_load(tmp_path):
    # An OBJ written before the input view moved to +z: its marker lacks "front=+z"; file = world (x, z, -y).
    world = _ellipsoid()
    legacy = world.copy()
    legacy.vertices = np.asarray(world.vertices) @ np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]).T
    text = legacy.export(file_type="obj")
    path = tmp_path / "old.obj"
    path.write_text("# lift3d export frame: up_axis=y\n" + text)
    back = load_mesh(str(path))
    assert np.allclose(back.bounds, world.bounds, atol=1e-5)
