"""benchmarks/check_in_viewers.py without the viewers: the pixel comparison, and the camera it gives
the viewers (in the file's frame) against the one lift3d renders from (in the world frame)."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import trimesh

from lift3d.cameras import Cameras
from lift3d.export.frame import file_from_world
from lift3d.mesh.raycast import MeshRaycaster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("check_in_viewers",
                                               os.path.join(ROOT, "benchmarks", "check_in_viewers.py"))
civ = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(civ)

# File-from-world rotations whose up (file +y) is world +z: lift3d's, that of earlier exports (the
# input view on file +x), and one with the input view on file -z.
Y_UP_FRAMES = {"lift3d": file_from_world("y"),
               "earlier": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
               "back": np.array([[0, -1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])}


def _disc(size, centre, radius, colour):
    i, j = np.mgrid[:size, :size]
    image = np.zeros((size, size, 4))
    inside = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 <= radius ** 2
    image[inside] = [*colour, 1.0]
    return image


def test_compare_pixels_on_a_synthetic_pair():
    a = _disc(64, (32, 32), 16, (1.0, 0.0, 0.0))
    assert civ.compare_pixels(a, a) == {"silhouette_iou": 1.0, "mean_colour_difference": 0.0,
                                        "viewer_pixels": int((a[..., 3] > 0).sum()),
                                        "lift3d_pixels": int((a[..., 3] > 0).sum())}
    b = _disc(64, (32, 40), 16, (0.8, 0.2, 0.0))       # moved 8 px right, a different red
    score = civ.compare_pixels(a, b)
    masks = a[..., 3] > 0, b[..., 3] > 0
    assert score["silhouette_iou"] == pytest.approx((masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum())
    assert 0.5 < score["silhouette_iou"] < 0.8
    assert score["mean_colour_difference"] == pytest.approx((0.2 + 0.2 + 0.0) / 3)   # where both are opaque
    half = a.copy()
    half[..., 3] *= 0.4                                 # alpha below 0.5 is background
    assert civ.compare_pixels(half, a)["silhouette_iou"] == 0.0
    with pytest.raises(ValueError, match="size"):
        civ.compare_pixels(a, a[:32])


def _object():
    """An asymmetric, coloured object in lift3d's world (z up): a wide base and a post off-centre."""
    base = trimesh.creation.box((0.8, 0.5, 0.2))
    post = trimesh.creation.box((0.2, 0.2, 0.5), transform=trimesh.transformations.translation_matrix((0.25, 0.1, 0.3)))
    base.visual.face_colors, post.visual.face_colors = (200, 60, 30, 255), (30, 90, 220, 255)
    return trimesh.util.concatenate([base, post])


def _viewer_render(file_mesh, view):
    """What a viewer does: look from the file-frame camera with the viewer's up, file +y."""
    eye, target = np.asarray(view["eye"]), np.asarray(view["target"])
    back = (eye - target) / np.linalg.norm(eye - target)
    right = np.cross([0.0, 1.0, 0.0], back)
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, np.cross(back, right), back, eye
    cameras = Cameras(torch.tensor(c2w, dtype=torch.float32)[None], torch.tensor([view["fovy_deg"]]),
                      view["size"], view["size"])
    return MeshRaycaster(file_mesh).render(cameras, shading="albedo", samples_per_pixel=4)["rgba"][0].numpy()


def _file_copy(world_mesh, file_from_world_3x3):
    file_mesh = world_mesh.copy()
    to_file = np.eye(4)
    to_file[:3, :3] = file_from_world_3x3
    file_mesh.apply_transform(to_file)
    to_world = np.eye(4)
    to_world[:3, :3] = file_from_world_3x3.T
    return file_mesh, to_world


@pytest.mark.parametrize("frame", sorted(Y_UP_FRAMES))
def test_the_viewers_camera_and_lift3d_camera_see_the_same_picture_in_any_upright_frame(frame):
    world = _object()
    file_mesh, to_world = _file_copy(world, Y_UP_FRAMES[frame])
    view = dict(civ.viewer_camera(np.asarray(world.vertices), to_world), size=64)
    score = civ.compare_pixels(_viewer_render(file_mesh, view), civ.lift3d_render(world, view))
    assert score["silhouette_iou"] > 0.99 and score["mean_colour_difference"] < 0.01
    assert score["lift3d_pixels"] > 0.1 * 64 * 64
    # The box a viewer shows is the file's; its up is the world's.
    three = civ.expected_view(np.asarray(world.vertices), to_world, civ.THREE_FROM_FILE, civ.VIEWER_UP["three.js"])
    assert np.allclose(three["min"], file_mesh.bounds[0]) and np.allclose(three["max"], file_mesh.bounds[1])
    assert three["up_is_world_up"] and civ.upright({"min": three["min"], "max": three["max"]}, three)
    blender = civ.expected_view(np.asarray(world.vertices), to_world, civ.BLENDER_FROM_FILE, civ.VIEWER_UP["blender"])
    assert blender["up_is_world_up"] and np.allclose(blender["min"][2], world.bounds[0][2])


def test_a_file_lying_down_fails_both_checks():
    world = _object()
    file_mesh, to_world = _file_copy(world, np.eye(3))      # z up in the file: a y-up viewer lays it down
    view = dict(civ.viewer_camera(np.asarray(world.vertices), to_world), size=64)
    assert civ.compare_pixels(_viewer_render(file_mesh, view), civ.lift3d_render(world, view))["silhouette_iou"] < 0.9
    three = civ.expected_view(np.asarray(world.vertices), to_world, civ.THREE_FROM_FILE, civ.VIEWER_UP["three.js"])
    assert not three["up_is_world_up"] and not civ.upright({"min": three["min"], "max": three["max"]}, three)


@pytest.mark.parametrize("frame", sorted(Y_UP_FRAMES))
def test_the_printed_azimuth_is_where_gltf_front_is_in_the_world(frame):
    world = _object()
    _, to_world = _file_copy(world, Y_UP_FRAMES[frame])
    azimuth, elevation = civ.azimuth_elevation(civ.viewer_camera(np.asarray(world.vertices), to_world))
    front = to_world[:3, :3] @ [0.0, 0.0, 1.0]             # glTF's front, +z, in the world
    off = (azimuth - np.degrees(np.arctan2(front[1], front[0]))) % 360
    assert min(off, 360 - off) < 25 and 10 < elevation < 30      # a little right of the front, and above
