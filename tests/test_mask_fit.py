"""The grid fitted to the input's mask: a tunnel the input camera sees through is closed, a floater outside the
silhouette is carved, an enclosed cavity is filled; the exported surface then matches the mask from that camera."""

import numpy as np
import torch
import trimesh

from lift3d.cameras import Cameras
from lift3d.evaluation.appearance import compare_views
from lift3d.export.isosurface import marching_cubes
from lift3d.export.mask_fit import fit_to_mask
from lift3d.mesh.raycast import MeshRaycaster

N, RADIUS, LEVEL = 48, 0.6, 10.0


def _grid():
    c = (np.arange(N) + 0.5) / N * 2 * RADIUS - RADIUS
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    ball = r < 0.35
    tunnel = (np.hypot(y, z - 0.05) < 0.07)           # along x: the camera on +x looks straight through it
    cavity = (r < 0.15) & ~tunnel & (np.abs(y) > 0.09)
    floater = (np.abs(x) < 0.05) & (np.abs(y - 0.5) < 0.04) & (np.abs(z) < 0.04)
    solid = (~tunnel & ~cavity) | floater
    ball_density = 20.0 / (1 + np.exp((r - 0.35) / 0.01))     # the level (10) lies on the sphere of radius 0.35
    return np.where(solid, ball_density, 0.0).astype(np.float32) + np.where(floater, 20.0, 0.0), ball


def _render(grid, camera):
    v, f = marching_cubes(grid, LEVEL, RADIUS)
    return MeshRaycaster(trimesh.Trimesh(v, f, process=False)).render(camera, shading="albedo")["rgba"][0]


def test_fit_closes_the_tunnel_carves_the_floater_fills_the_cavity():
    grid, ball = _grid()
    camera = Cameras.from_spherical(0.0, 0.0, 1.5, 49.13, 64, 64)
    mask = MeshRaycaster(trimesh.creation.icosphere(4, 0.35)).render(camera)["rgba"][0, ..., 3:]
    target = torch.cat([torch.ones(64, 64, 3), mask], -1)
    before = compare_views(_render(grid, camera), target)
    assert before["see_through"] > 0.02           # the tunnel shows
    fitted, report = fit_to_mask(grid, RADIUS, LEVEL, camera, mask)
    after = compare_views(_render(fitted, camera), target)
    assert after["see_through"] == 0 and after["silhouette_iou"] > 0.97, (after, report)
    assert report["see_through_rays"] > 0 and report["closed_cells"] > 0
    assert report["carved_cells"] > 0             # the floater beside the ball, outside the mask
    assert report["filled_cells"] > 0             # the cavity around the centre
    c = (np.arange(N) + 0.5) / N * 2 * RADIUS - RADIUS
    centre = np.argmin(np.abs(c - 0.0))
    assert fitted[centre, np.argmin(np.abs(c - 0.12)), centre] > LEVEL      # inside the former cavity: solid
    r = np.linalg.norm(np.stack(np.meshgrid(c, c, c, indexing="ij"), -1), axis=-1)
    assert (fitted[r > 0.35 + 2 * (2 * RADIUS / N)] <= LEVEL).all()   # nothing beyond the ball's outline survives


def test_a_field_that_matches_its_mask_is_left_alone():
    grid, ball = _grid()
    c = (np.arange(N) + 0.5) / N * 2 * RADIUS - RADIUS
    r = np.linalg.norm(np.stack(np.meshgrid(c, c, c, indexing="ij"), -1), axis=-1)
    solid = (20.0 / (1 + np.exp((r - 0.35) / 0.01))).astype(np.float32)
    camera = Cameras.from_spherical(20.0, 30.0, 1.5, 49.13, 64, 64)
    mask = MeshRaycaster(trimesh.creation.icosphere(4, 0.35)).render(camera)["rgba"][0, ..., 3:]
    fitted, report = fit_to_mask(solid, RADIUS, LEVEL, camera, mask)
    # The carve trims the rim cells whose centres project outside the mask; a few outline rays then miss and are
    # plugged. Nothing else changes, and the silhouette stays the mask's.
    assert report["see_through_rays"] <= 0.01 * report["mask_rays"] and report["filled_cells"] == 0
    assert report["carved_cells"] <= 0.01 * ball.sum()   # at most a rim of cells the mask's pixels cut
    assert report["floater_cells"] == 0 and report["bridged_cells"] == 0
    target = torch.cat([torch.ones(64, 64, 3), mask], -1)
    assert compare_views(_render(fitted, camera), target)["silhouette_iou"] >= \
        compare_views(_render(solid, camera), target)["silhouette_iou"] - 0.005


def test_a_piece_in_front_of_the_body_is_bridged_to_it_along_the_camera_rays():
    # A ball and, 3 cells in front of it towards the camera on +x, a disc: what the input camera sees as one
    # surface (a patch the field made in front of a pit). The gap between them becomes solid. A piece seen beside
    # the ball, with no body behind it, is joined the shortest way when it is within bridge_cells, else left alone.
    c = (np.arange(N) + 0.5) / N * 2 * RADIUS - RADIUS
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    cell = 2 * RADIUS / N
    ball = r < 0.3
    disc = (np.abs(x - (0.3 + 3 * cell)) < cell) & (np.hypot(y, z) < 0.1)
    side = (np.abs(x) < 0.05) & (np.abs(y) < 0.04) & (np.abs(z - 0.5) < 0.04)   # 7 cells above the ball
    grid = np.where(ball | disc | side, 20.0, 0.0).astype(np.float32)
    camera = Cameras.from_spherical(0.0, 0.0, 1.5, 49.13, 64, 64)
    mask = _render(grid, camera)[..., 3:]           # the mask matches: only the bridge is under test
    from scipy.ndimage import label

    fitted, report = fit_to_mask(grid, RADIUS, LEVEL, camera, mask, bridge_cells=5)
    assert report["bridged_cells"] > 0
    gap = (x > 0.3 + cell) & (x < 0.3 + 2 * cell) & (np.hypot(y, z) < 0.08)
    assert (fitted[gap] > LEVEL).all()              # the disc now sits on the ball
    assert label(fitted > LEVEL)[1] == 2            # ball + disc joined; the side piece, 7 cells off, stays apart
    assert (fitted[(np.abs(z - 0.4) < 0.02) & (np.abs(x) < 0.05) & (np.abs(y) < 0.04)] <= LEVEL).all()

    fitted, _ = fit_to_mask(grid, RADIUS, LEVEL, camera, mask, bridge_cells=10)
    assert label(fitted > LEVEL)[1] == 1            # now joined too, by a column down to the ball
    assert (fitted[(np.abs(z - 0.4) < 0.02) & (np.abs(x) < 0.02) & (np.abs(y) < 0.02)] > LEVEL).all()
