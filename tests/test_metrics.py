"""Metric code against hand-computable cases and against independent slow computations."""

import json
import os

import numpy as np
import pytest
import torch
import trimesh

from lift3d.errors import UserError
from lift3d.evaluation.inside import inside_mask
from lift3d.evaluation.metrics import chamfer_and_fscore, evaluate, grid_centres, volume_iou
from lift3d.evaluation.protocols import eval_cameras, visible_points, voxel_downsample

FAST = {"n_points": 20000}


def _box(shift=(0.0, 0.0, 0.0)):
    box = trimesh.creation.box((1.0, 1.0, 1.0))
    box.apply_translation(shift)
    return box


def test_cube_vs_shifted_cube_iou_is_exact():
    # Unit cube [-0.5, 0.5]^3 vs the same shifted by 0.25 along x: overlap 0.75, union 1.25 -> 0.6.
    # The faces fall on grid cell boundaries (32^3 and 64^3 over [-1, 1]^3), so the grid IoU is exact.
    result = evaluate(_box((0.25, 0, 0)), _box(), "surface", **FAST, iou_resolutions=(64, 32))
    assert result["volume_iou_by_resolution"] == {"64": pytest.approx(0.6, abs=1e-12),
                                                  "32": pytest.approx(0.6, abs=1e-12)}
    assert result["volume_iou"] == pytest.approx(0.6) and result["grid_resolution"] == 64
    # Every point of the shifted cube lies within 0.25 of the cube: the Chamfer is below that,
    # and above 0 (the side faces x = +-0.5 are 0.25 apart).
    assert 0.02 < result["chamfer_distance"] < 0.25
    assert result["f_score"]["0.5"] == 1.0


def test_sphere_vs_scaled_sphere():
    # Concentric spheres of radius 0.5 and 0.4: every point is 0.1 from the other surface.
    gt, pred = trimesh.creation.icosphere(4, 0.5), trimesh.creation.icosphere(4, 0.4)
    result = evaluate(pred, gt, "surface", n_points=50000, iou_resolutions=(64,))
    assert result["chamfer_distance"] == pytest.approx(0.1, abs=1.5e-3)
    assert result["chamfer_pred_to_gt"] == pytest.approx(0.1, abs=1.5e-3)
    assert result["volume_iou"] == pytest.approx(0.8 ** 3, abs=0.015)
    assert result["f_score"]["0.05"] == 0.0 and result["f_score"]["0.2"] == 1.0
    # The visible-points protocol sees the same 0.1 gap (its Chamfer is on camera-visible points).
    sd = evaluate(pred, gt, "syncdreamer")
    assert sd["chamfer_distance"] == pytest.approx(0.1, abs=2e-3)
    assert sd["grid_resolution"] == 64


def test_visible_points_match_analytic_ray_sphere_hits():
    sphere = trimesh.creation.icosphere(6, 0.5)
    cameras = eval_cameras()[::4].with_size(32, 32)
    points = visible_points(sphere, cameras)
    # Independent computation: closed-form first intersection of each pixel ray with the sphere.
    o, d = (x.reshape(-1, 3).double().numpy() for x in cameras.rays())
    b = np.einsum("ij,ij->i", o, d)
    disc = b ** 2 - (np.einsum("ij,ij->i", o, o) - 0.25)
    hit = disc > 0
    analytic = o[hit] + (-b[hit] - np.sqrt(disc[hit]))[:, None] * d[hit]
    assert abs(len(points) - hit.sum()) <= 0.03 * hit.sum()      # silhouette pixels may differ (facets)
    dist = np.linalg.norm(points[:, None] - analytic[None], axis=-1).min(1)
    assert np.all(np.abs(np.linalg.norm(points, axis=1) - 0.5) < 2e-3)
    assert np.median(dist) < 1e-3


def test_chamfer_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(700, 3)), rng.normal(size=(500, 3)) + 0.3
    out = chamfer_and_fscore(a, b, (0.1, 0.5))
    d = torch.cdist(torch.from_numpy(a), torch.from_numpy(b))
    ab, ba = d.min(1).values.numpy(), d.min(0).values.numpy()
    assert out["chamfer_distance"] == pytest.approx((ab.mean() + ba.mean()) / 2, rel=1e-9)
    p, r = (ab < 0.5).mean(), (ba < 0.5).mean()
    assert out["f_score"]["0.5"] == pytest.approx(2 * p * r / (p + r))


def _duck():
    pybullet_data = pytest.importorskip("pybullet_data")
    from lift3d.mesh.io import load_mesh, normalize_mesh

    mesh, _, _ = normalize_mesh(load_mesh(os.path.join(pybullet_data.getDataPath(), "duck.obj")))
    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)


def test_inside_test_on_non_watertight_real_mesh_agrees_with_winding_numbers():
    duck = _duck().simplify_quadric_decimation(face_count=1200)
    # Cut an open bottom (5% of the faces), as scanned meshes often have.
    c = duck.triangles_center[:, 1]
    holed = duck.copy()
    holed.update_faces(c > np.quantile(c, 0.05))
    holed.remove_unreferenced_vertices()
    assert not holed.is_watertight
    points = grid_centres(20, 0.55)
    ray = inside_mask(holed, points, "ray-vote")
    slow = inside_mask(holed, points, "winding")          # independent: brute-force solid angles
    closed = inside_mask(duck, points, "winding")
    assert closed.sum() > 300
    assert volume_iou(ray, slow) > 0.97
    assert volume_iou(ray, closed) > 0.97
    # Plain ray parity (trimesh.contains) is what breaks on such meshes.
    assert volume_iou(holed.contains(points), closed) < volume_iou(ray, closed)


def test_real_mesh_pair_against_slow_reference():
    from lift3d.mesh.io import normalize_mesh

    duck, _, _ = normalize_mesh(_duck().simplify_quadric_decimation(face_count=1500))   # as evaluate does
    moved = duck.copy()
    moved.apply_transform(trimesh.transformations.rotation_matrix(np.radians(15), [0, 0, 1]))
    moved.apply_translation([0.04, -0.02, 0.0])
    result = evaluate(moved, duck, "surface", n_points=4000, iou_resolutions=(24,))
    # Slow reference: winding-number occupancy on the same grid, brute-force nearest neighbours
    # on the same samples (GT seed 0, prediction seed 1).
    points = grid_centres(24, 1.0)
    iou = volume_iou(inside_mask(moved, points, "winding"), inside_mask(duck, points, "winding"))
    assert result["volume_iou"] == pytest.approx(iou, abs=0.01)
    gt_pts, _ = trimesh.sample.sample_surface(duck, 4000, seed=0)
    pr_pts, _ = trimesh.sample.sample_surface(moved, 4000, seed=1)
    d = torch.cdist(torch.from_numpy(pr_pts), torch.from_numpy(gt_pts))
    assert result["chamfer_distance"] == pytest.approx(
        float(d.min(1).values.mean() + d.min(0).values.mean()) / 2, rel=1e-6)


def test_icp_undoes_a_rigid_motion():
    from lift3d.mesh.io import normalize_mesh

    duck, _, _ = normalize_mesh(_duck().simplify_quadric_decimation(face_count=1500))
    motion = trimesh.transformations.rotation_matrix(np.radians(8), [0.3, 0.2, 1.0])
    motion[:3, 3] = [0.05, 0.0, -0.03]
    moved = duck.copy()
    moved.apply_transform(motion)
    plain = evaluate(moved, duck, "surface", **FAST, iou_resolutions=(32,))
    aligned = evaluate(moved, duck, "surface", **FAST, iou_resolutions=(32,), icp=True)
    assert np.allclose(np.asarray(aligned["icp_transform"]) @ motion, np.eye(4), atol=3e-3)
    floor = evaluate(duck, duck, "surface", **FAST, iou_resolutions=(32,))["chamfer_distance"]  # sampling noise
    assert aligned["chamfer_distance"] < floor + 1e-3 < plain["chamfer_distance"]
    assert aligned["volume_iou"] > 0.99 > plain["volume_iou"]
    assert "ICP" in aligned["protocol"]["alignment"]
    # surface-icp also normalises the prediction, as the LRM-family protocols do.
    assert evaluate(moved, duck, "surface-icp", **FAST, iou_resolutions=(32,))["chamfer_distance"] < \
        plain["chamfer_distance"]


def test_metrics_json_keys_and_protocol_description(tmp_path):
    path = str(tmp_path / "cube.obj")
    _box().export(path)
    result = evaluate(path, path, "surface", **FAST, iou_resolutions=(32,))
    for key in ("chamfer_distance", "volume_iou", "f_score", "protocol", "n_points", "grid_resolution"):
        assert key in result
    assert result["volume_iou"] == 1.0 and result["chamfer_distance"] < 0.01
    assert result["protocol"]["name"] == "surface"
    assert {"normalization", "alignment", "points", "chamfer", "volume_grid", "inside_test"} <= set(result["protocol"])
    json.dumps(result, allow_nan=False)


def test_gt_is_normalised_but_prediction_is_not():
    # A GT at 10x scale is normalised to longest side 1; a prediction already in that frame matches.
    big = _box()
    big.apply_scale(10.0)
    big.apply_translation([3.0, 2.0, 1.0])
    assert evaluate(_box(), big, "surface", **FAST, iou_resolutions=(32,))["volume_iou"] == 1.0


def test_user_errors():
    with pytest.raises(UserError, match="protocol"):
        evaluate(_box(), _box(), "nope")
    with pytest.raises(UserError, match="not found"):
        evaluate("/nonexistent.obj", _box())
    with pytest.raises(UserError, match="option"):
        evaluate(_box(), _box(), "surface", bogus=1)
    far = _box((0, 0, 5.0))     # above every evaluation camera's field of view
    with pytest.raises(UserError, match="visible"):
        evaluate(far, _box(), "syncdreamer")


def test_voxel_downsample_averages_per_voxel():
    pts = np.array([[0.0, 0, 0], [0.004, 0, 0], [0.5, 0.5, 0.5]])
    out = voxel_downsample(pts, 0.01)
    assert len(out) == 2
    assert np.allclose(sorted(out[:, 0]), [0.002, 0.5])


def _ell():
    """An L-shaped solid: no rotation about z but the identity maps it onto itself."""
    return trimesh.util.concatenate([trimesh.creation.box((1.0, 0.3, 0.4), transform=trimesh.transformations.
                                                          translation_matrix((0.0, -0.2, 0.0))),
                                     trimesh.creation.box((0.3, 0.4, 0.4), transform=trimesh.transformations.
                                                          translation_matrix((0.35, 0.15, 0.0)))])


def test_syncdreamer_gt_rotation_sign_and_table():
    from lift3d.evaluation.protocols import SYNCDREAMER_GT_ANGLE_DEG, gt_rotation, syncdreamer_gt_angle

    # eval_mesh.py: vertices @ R.T with R = euler2mat(-radians(angle), 0, 0, 'szyx'): sofa's -90 turns +x to +y.
    assert np.allclose(gt_rotation(-90.0) @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)
    assert np.allclose(gt_rotation(270.0), gt_rotation(-90.0), atol=1e-12)      # the same turn, as in its code
    assert len(SYNCDREAMER_GT_ANGLE_DEG) == 30
    assert [syncdreamer_gt_angle(n) for n in ("sofa", "lion", "elephant", "turtle", "sorter", "teapot")] == \
        [-90.0, 270.0, 180.0, 225.0, 112.5, 0.0]
    with pytest.raises(UserError, match="unknown SyncDreamer object 'sofaa'.*sofa"):
        syncdreamer_gt_angle("sofaa")


@pytest.mark.parametrize("angle", [270.0, 112.5])
def test_a_mesh_and_its_turned_copy_score_perfectly_only_with_the_right_rotation(angle):
    from lift3d.evaluation.protocols import gt_rotation
    from lift3d.mesh.io import normalize_mesh

    gt = _ell()
    pred, _, _ = normalize_mesh(gt.copy())      # what a reconstruction from SyncDreamer's renders would give
    turn = np.eye(4)
    turn[:3, :3] = gt_rotation(angle)
    pred.apply_transform(turn)
    scores = {a: evaluate(pred, gt, "syncdreamer", gt_rotation_deg=a) for a in (angle, 0.0, -angle)}
    right = scores[angle]
    assert right["chamfer_distance"] < 2e-3 and right["volume_iou"] > 0.97
    assert right["gt_rotation"]["syncdreamer_angle_deg"] == angle
    assert np.allclose(right["gt_rotation"]["matrix"], turn[:3, :3])
    assert f"angle {angle:g} deg" in right["protocol"]["alignment"]
    for wrong in (0.0, -angle):
        assert scores[wrong]["chamfer_distance"] > 10 * right["chamfer_distance"]
        assert scores[wrong]["volume_iou"] < 0.8
    assert scores[0.0]["protocol"]["alignment"].startswith("none")


def test_eval_command_applies_a_syncdreamer_object_rotation(tmp_path, capsys):
    from lift3d.cli import main
    from lift3d.evaluation.protocols import gt_rotation
    from lift3d.mesh.io import normalize_mesh

    gt, pred = str(tmp_path / "gt.obj"), str(tmp_path / "pred.obj")
    _ell().export(gt)
    turned, _, _ = normalize_mesh(_ell())
    turned.vertices = turned.vertices @ gt_rotation(-90.0).T      # sofa
    turned.export(pred)
    assert main(["eval", "--pred", pred, "--gt", gt, "--protocol", "syncdreamer", "--syncdreamer-object", "sofa"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chamfer_distance"] < 2e-3
    assert result["gt_rotation"]["syncdreamer_object"] == "sofa"
    assert result["gt_rotation"]["syncdreamer_angle_deg"] == -90.0
    assert main(["eval", "--pred", pred, "--gt", gt, "--gt-rotation-deg", "-90", "--protocol", "surface"]) == 0
    assert json.loads(capsys.readouterr().out)["volume_iou"] > 0.97
    assert main(["eval", "--pred", pred, "--gt", gt, "--syncdreamer-object", "nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown SyncDreamer object 'nope'" in err
