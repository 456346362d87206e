"""Texture baking from views: a coloured cube baked from its own renders looks like itself again."""

import numpy as np
import pytest
import torch
import trimesh

from lift3d.cameras import Cameras, orbit_views
from lift3d.evaluation.appearance import compare_views, render_albedo
from lift3d.export.mesh import write_textured_mesh
from lift3d.export.view_bake import BakeView, bake_cameras, bake_from_views, project
from lift3d.mesh.io import load_mesh


def _coloured_cube():
    """A cube of side 0.6, subdivided, coloured smoothly by position (vertex colours)."""
    mesh = trimesh.creation.box(extents=(0.6, 0.6, 0.6)).subdivide().subdivide().subdivide()
    v = np.asarray(mesh.vertices)
    rgb = np.stack([0.5 + 0.8 * v[:, 0], 0.5 + 0.8 * v[:, 1], 0.5 + 0.8 * v[:, 2]], -1).clip(0, 1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=(rgb * 255).astype(np.uint8))
    return mesh


def test_project_lands_on_the_pixel_whose_ray_goes_there():
    camera = Cameras.from_spherical(25.0, 40.0, 1.7, 49.13, 24, 32)
    origins, dirs = camera.rays()
    point = (origins[0, 5, 9] + 1.3 * dirs[0, 5, 9]).double().numpy()[None]
    pixels, depth = project(camera, point)
    assert np.allclose(pixels[0], [9.5, 5.5], atol=1e-4) and depth[0] > 0


def test_cube_baked_from_its_renders_comes_back(tmp_path):
    cube = _coloured_cube()
    reference = Cameras.from_spherical(20.0, 0.0, 2.0, 49.13, 96, 96)
    cameras = bake_cameras(reference, 2.0, 49.13, 96)
    renders = render_albedo(cube, cameras)
    views = [BakeView(cameras[i], renders[i, ..., :3].numpy(), renders[i, ..., 3].numpy()) for i in range(len(cameras))]
    shape = trimesh.Trimesh(cube.vertices, cube.faces, process=False)
    seen = {}

    def colour(points, normals):
        out, seen["mask"] = bake_from_views(shape, points, normals, views)
        return out

    paths = write_textured_mesh(str(tmp_path), np.asarray(cube.vertices), np.asarray(cube.faces), colour,
                                texture_size=256, padding=2)
    assert seen["mask"].mean() > 0.99          # 16 views around, above and below see every texel of a cube
    baked = load_mesh(paths["glb"])
    held_out = orbit_views(6, 35.0, 2.0, 49.13, 96, 96, azimuth_start_deg=30.0)
    truth, ours = render_albedo(cube, held_out), render_albedo(baked, held_out)
    scores = [compare_views(ours[i], truth[i]) for i in range(len(held_out))]
    assert min(s["psnr"] for s in scores) > 30, [s["psnr"] for s in scores]
    assert min(s["silhouette_iou"] for s in scores) > 0.99


def test_an_occluded_point_takes_no_colour_from_the_view_that_cannot_see_it():
    # Two boxes in a row along x; the camera on +x sees only the near one. The far box's front face gets
    # nothing from that view (so the nearest seen texel's colour), the near box's front face gets red.
    near = trimesh.creation.box(extents=(0.2, 0.4, 0.4))
    near.apply_translation((0.3, 0, 0))
    far = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    far.apply_translation((-0.3, 0, 0))
    scene = trimesh.util.concatenate([near, far])
    camera = Cameras.from_spherical(0.0, 0.0, 2.0, 40.0, 64, 64)
    red = BakeView(camera, np.tile([1.0, 0.0, 0.0], (64, 64, 1)), np.ones((64, 64)))
    points = np.array([[0.4 + 1e-4, 0.0, 0.0], [-0.2 + 1e-4, 0.0, 0.0]])    # front faces of near and far box
    normals = np.array([[1.0, 0, 0], [1.0, 0, 0]])
    colours, seen = bake_from_views(scene, points, normals, [red])
    assert seen.tolist() == [True, False]
    assert np.allclose(colours[0], [1, 0, 0])


def test_compare_views_counts_holes_not_a_smaller_outline():
    target = torch.zeros(20, 20, 4)
    target[4:16, 4:16] = torch.tensor([0.2, 0.4, 0.6, 1.0])
    holed = target.clone()
    holed[9:11, 9:11, 3] = 0                      # a 2x2 hole inside the outline
    s = compare_views(holed, target)
    assert s["see_through"] == pytest.approx(4 / 144)
    assert s["silhouette_iou"] == pytest.approx(140 / 144)
    small = torch.zeros(20, 20, 4)
    small[5:15, 5:15] = target[5:15, 5:15]        # no hole, an outline one pixel too small
    s = compare_views(small, target)
    assert s["see_through"] == 0 and s["psnr"] < 10 and s["silhouette_iou"] == pytest.approx(100 / 144)
    assert compare_views(target, target)["psnr"] >= 119
