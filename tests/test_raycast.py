"""Ground-truth mesh loading and the embree ray-cast renderer, against analytic geometry."""

import json
import math
import os

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from lift3d.cameras import Cameras
from lift3d.errors import UserError
from lift3d.mesh import MeshRaycaster, geometry_only, load_mesh, normalize_mesh

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def ray_sphere(origins, dirs, centre, radius):
    """Analytic first-hit distance (inf on a miss) for unit directions."""
    oc = origins - torch.as_tensor(centre, dtype=torch.float32)
    b = (oc * dirs).sum(-1)
    disc = b ** 2 - ((oc ** 2).sum(-1) - radius ** 2)
    t = -b - disc.clamp_min(0).sqrt()
    return torch.where(disc > 0, t, torch.full_like(t, math.inf)), disc


def ray_box(origins, dirs, half):
    """Analytic slab test against the box [-half, half]^3."""
    inv = 1.0 / dirs
    t0, t1 = (-half - origins) * inv, (half - origins) * inv
    near = torch.minimum(t0, t1).amax(-1)
    far = torch.maximum(t0, t1).amin(-1)
    return torch.where((far >= near) & (far > 0), near, torch.full_like(near, math.inf))


def quadrant_plane():
    """A unit square in the x = 0 plane facing +x; u runs along +y, v along +z."""
    vertices = np.array([[0, -0.5, -0.5], [0, 0.5, -0.5], [0, 0.5, 0.5], [0, -0.5, 0.5]], float)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    return trimesh.Trimesh(vertices, faces, process=False), uv


QUADRANTS = {  # texture quadrant (rows from the top of the image file) -> colour
    "top_left": (255, 0, 0), "top_right": (0, 255, 0), "bottom_left": (0, 0, 255), "bottom_right": (255, 255, 0)}


def quadrant_texture(size=64):
    image = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    image[:h, :h], image[:h, h:] = QUADRANTS["top_left"], QUADRANTS["top_right"]
    image[h:, :h], image[h:, h:] = QUADRANTS["bottom_left"], QUADRANTS["bottom_right"]
    return Image.fromarray(image)


def front_camera(size=64, distance=2.0):
    """Camera on +x looking at the origin: image right = +y, image up = +z."""
    return Cameras.from_spherical(0.0, 0.0, distance, 40.0, size, size)


# --------------------------------------------------------------------------- geometry


def test_sphere_depth_normals_and_mask_match_the_analytic_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    cameras = Cameras.from_spherical([20.0, -35.0], [10.0, 200.0], 2.0, 45.0, 48, 48)
    out = MeshRaycaster(sphere).render(cameras)
    origins, dirs = cameras.rays()
    t, disc = ray_sphere(origins, dirs, (0, 0, 0), 0.5)
    hit_truth = torch.isfinite(t)
    assert (out["mask"] != hit_truth).float().mean() < 0.01       # only silhouette pixels may differ
    interior = hit_truth & out["mask"] & (disc > 0.01)
    assert torch.allclose(out["depth"][interior], t[interior], atol=2e-3)
    assert torch.all(out["depth"][~out["mask"]] == 0)
    assert float(out["depth"][0, 24, 24]) == pytest.approx(1.5, abs=2e-3)   # centre ray hits the front pole
    expected_normal = torch.nn.functional.normalize(out["position"][interior], dim=-1)
    assert (out["normal"][interior] * expected_normal).sum(-1).min() > 0.99


def test_box_depth_matches_the_slab_test():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cameras = Cameras.from_spherical([0.0, 35.0], [0.0, 60.0], 3.0, 40.0, 40, 40)
    out = MeshRaycaster(box).render(cameras)
    origins, dirs = cameras.rays()
    t = ray_box(origins, dirs, 0.5)
    both = torch.isfinite(t) & out["mask"]
    assert (out["mask"] != torch.isfinite(t)).float().mean() < 0.01
    assert torch.allclose(out["depth"][both], t[both], atol=1e-4)
    assert float(out["depth"][0, 20, 20]) == pytest.approx(2.5, abs=5e-4)   # near the centre: the front face


@pytest.mark.parametrize("offset,axis,sign", [((0, 0.3, 0), "col", 1), ((0, -0.3, 0), "col", -1),
                                              ((0, 0, 0.3), "row", -1)])
def test_silhouette_lines_up_with_the_pinhole_projection(offset, axis, sign):
    """A sphere moved to +y appears right of centre, to +z above it, where the intrinsics project it."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.1)
    sphere.apply_translation(offset)
    camera = front_camera(64, distance=2.0)
    mask = MeshRaycaster(sphere).render(camera)["mask"][0].float()
    rows, cols = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    centroid = {"row": float((mask * rows).sum() / mask.sum()), "col": float((mask * cols).sum() / mask.sum())}
    assert (centroid[axis] - 32) * sign > 5
    # Independent projection of the sphere centre with the camera intrinsics (x right = +y, y down = -z).
    K = camera.intrinsics()[0]
    depth = 2.0
    u = float(K[0, 0] * offset[1] / depth + K[0, 2])
    v = float(K[1, 1] * -offset[2] / depth + K[1, 2])
    assert abs(centroid["col"] - u) < 0.5 and abs(centroid["row"] - v) < 0.5


def test_supersampled_alpha_matches_the_disc_area():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    camera = Cameras.from_spherical(0.0, 0.0, 2.0, 40.0, 32, 32)
    out = MeshRaycaster(sphere).render(camera, samples_per_pixel=16)
    alpha = out["rgba"][0, ..., 3]
    radius_px = float(camera.focal[0]) * math.tan(math.asin(0.5 / 2.0))
    assert float(alpha.sum()) == pytest.approx(math.pi * radius_px ** 2, rel=0.01)
    assert ((alpha > 0.05) & (alpha < 0.95)).any()                 # antialiased edge
    assert "face_id" not in out
    with pytest.raises(ValueError, match="square"):
        MeshRaycaster(sphere).render(camera, samples_per_pixel=2)


# --------------------------------------------------------------------------- colours


def test_texture_lookup_returns_the_painted_quadrants():
    plane, uv = quadrant_plane()
    plane.visual = trimesh.visual.TextureVisuals(uv=uv, image=quadrant_texture())
    out = MeshRaycaster(plane).render(front_camera(), shading="albedo")
    rgb = (out["rgba"][0, ..., :3] * 255).round()
    # The plane spans |y|, |z| < 0.5 at distance 2 -> about +-17 px around the centre of a 64 px image.
    for name, (r, c) in {"top_left": (24, 24), "top_right": (24, 40), "bottom_left": (40, 24),
                         "bottom_right": (40, 40)}.items():
        assert tuple(rgb[r, c].tolist()) == QUADRANTS[name], name
    assert set(out["face_id"][0, 24, 24:41].tolist()) <= {0, 1}


def test_vertex_face_pbr_and_plain_colours():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    colours = np.tile([10, 20, 30, 255], (12, 1)).astype(np.uint8)
    front = np.flatnonzero(box.face_normals[:, 0] > 0.9)            # the faces facing +x
    colours[front] = [200, 100, 50, 255]
    box.visual.face_colors = colours
    caster = MeshRaycaster(box)
    rgb = caster.render(front_camera(), shading="albedo")["rgba"][0, 32, 32, :3]
    assert torch.allclose(rgb, torch.tensor([200, 100, 50]) / 255.0, atol=1e-6)

    plane, uv = quadrant_plane()
    plane.visual.vertex_colors = [[0, 128, 255, 255]] * 4
    rgb = MeshRaycaster(plane).render(front_camera(), shading="albedo")["rgba"][0, 32, 32, :3]
    assert torch.allclose(rgb, torch.tensor([0, 128, 255]) / 255.0, atol=1e-6)

    material = trimesh.visual.material.PBRMaterial(baseColorTexture=quadrant_texture(),
                                                   baseColorFactor=[255, 255, 255, 255])
    material.baseColorFactor = np.array([128, 255, 255, 255], np.uint8)
    plane.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    rgb = MeshRaycaster(plane).render(front_camera(), shading="albedo")["rgba"][0, 40, 40, :3]  # yellow quadrant
    assert torch.allclose(rgb, torch.tensor([128 / 255, 1.0, 0.0]), atol=1e-3)

    plain = MeshRaycaster(trimesh.Trimesh(plane.vertices, plane.faces))
    rgb = plain.render(front_camera(), shading="albedo")["rgba"][0, 32, 32, :3]
    assert torch.allclose(rgb, torch.full((3,), 0.7), atol=1e-6)


def test_lambert_uses_a_fixed_world_light():
    plane, _ = quadrant_plane()                                       # normal +x
    light = np.array([1.0, 0.0, 1.0]) / math.sqrt(2)
    caster = MeshRaycaster(plane, light_dir=light, ambient=0.2)
    out = caster.render(front_camera(), shading="lambert")["rgba"][0, 32, 32, :3]
    assert torch.allclose(out, torch.full((3,), 0.7 * (0.2 + 0.8 * light[0])), atol=1e-5)
    # Seen from behind, the two-sided plane turns its normal to -x: only ambient light.
    back = Cameras.from_spherical(0.0, 180.0, 2.0, 40.0, 64, 64)
    out = caster.render(back, shading="lambert")
    assert torch.allclose(out["rgba"][0, 32, 32, :3], torch.full((3,), 0.7 * 0.2), atol=1e-5)
    assert torch.allclose(out["normal"][0, 32, 32], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)


# --------------------------------------------------------------------------- loading


def write_textured_plane(obj_path, map_kd, texture_path):
    plane, uv = quadrant_plane()
    os.makedirs(os.path.dirname(obj_path), exist_ok=True)
    lines = ["mtllib model.mtl"] + [f"v {x} {y} {z}" for x, y, z in plane.vertices]
    lines += [f"vt {u} {v}" for u, v in uv] + ["usemtl material_0"]
    lines += ["f " + " ".join(f"{i + 1}/{i + 1}" for i in face) for face in plane.faces]
    with open(obj_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(os.path.dirname(obj_path), "model.mtl"), "w") as f:
        f.write(f"newmtl material_0\nKd 1 1 1\nmap_Kd {map_kd}\n")
    os.makedirs(os.path.dirname(texture_path), exist_ok=True)
    quadrant_texture().save(texture_path)


@pytest.mark.parametrize("layout", ["gso", "parent", "windows"])
def test_load_mesh_finds_textures_trimesh_misses(tmp_path, layout):
    obj = str(tmp_path / "obj" / "meshes" / "model.obj")
    if layout == "gso":            # map_Kd texture.png, but the file is in materials/textures/
        write_textured_plane(obj, "texture.png", str(tmp_path / "obj" / "materials" / "textures" / "texture.png"))
    elif layout == "parent":       # pybullet: a parent-relative path
        write_textured_plane(obj, "../../textures/t.png", str(tmp_path / "textures" / "t.png"))
    else:                          # pybullet: a Windows path from the author's machine
        write_textured_plane(obj, "E:\\develop\\data\\t.png", str(tmp_path / "obj" / "meshes" / "t.png"))
    mesh = load_mesh(obj)
    assert mesh.visual.kind == "texture" and mesh.visual.material.image is not None
    rgb = (MeshRaycaster(mesh).render(front_camera(), shading="albedo")["rgba"][0, 40, 40, :3] * 255).round()
    assert tuple(rgb.tolist()) == QUADRANTS["bottom_right"]


def test_load_mesh_merges_scenes_and_reports_bad_files(tmp_path):
    a, b = trimesh.creation.box(extents=(1, 1, 1)), trimesh.creation.icosphere(radius=0.5)
    scene = trimesh.Scene()
    scene.add_geometry(a, transform=trimesh.transformations.translation_matrix([2, 0, 0]))
    scene.add_geometry(b)
    path = str(tmp_path / "scene.glb")
    scene.export(path)
    mesh = load_mesh(path)
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) == len(a.faces) + len(b.faces)
    assert np.allclose(mesh.bounds, [[-0.5, -0.5, -0.5], [2.5, 0.5, 0.5]], atol=1e-6)
    with pytest.raises(UserError, match="not found"):
        load_mesh(str(tmp_path / "missing.obj"))
    bad = tmp_path / "bad.glb"
    bad.write_bytes(b"definitely not a mesh")
    with pytest.raises(UserError):
        load_mesh(str(bad))


def test_normalize_mesh_longest_side_one_and_centred():
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    box.apply_translation([3, 4, 5])
    out, scale, offset = normalize_mesh(box)
    assert scale == pytest.approx(0.5)
    assert np.allclose(out.bounds, [[-0.5, -0.25, -0.125], [0.5, 0.25, 0.125]])
    assert np.allclose(box.vertices * scale + offset, out.vertices)
    assert np.allclose(box.bounds[0], [2, 3.5, 4.75])              # the input is untouched


# --------------------------------------------------------------------------- bundled examples


@pytest.mark.parametrize("name", ["mug", "car", "mushroom"])
def test_bundled_example_objects(name):
    folder = os.path.join(EXAMPLES, "objects", name)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size < 1_000_000
    mesh = load_mesh(folder, normalize=True)                       # a GSO folder works as a path
    assert mesh.visual.material.image is not None
    assert geometry_only(mesh).is_watertight
    with open(os.path.join(EXAMPLES, f"{name}.json")) as f:
        meta = json.load(f)
    camera = Cameras.from_spherical(meta["elevation_deg"], meta["azimuth_deg"], meta["camera_distance"],
                                    meta["fovy_deg"], meta["height"], meta["width"])
    ours = MeshRaycaster(mesh).render(camera, shading=meta["shading"])["rgba"][0]
    saved = torch.from_numpy(np.asarray(Image.open(os.path.join(EXAMPLES, meta["image"])), np.float32) / 255)
    a, b = ours[..., 3] > 0.5, saved[..., 3] > 0.5
    assert float((a & b).sum() / (a | b).sum()) > 0.97             # the documented camera reproduces it
    assert float((ours[..., :3] - saved[..., :3])[a & b].abs().mean()) < 0.03
