import math

import pytest
import torch

from lift3d.cameras import Cameras, orbit_views, sample_views, zero123_pose


def test_pose_placement_and_orthonormal_frame():
    cams = Cameras.from_spherical([30, 0, -20], [0, 90, 200], [2.0, 1.5, 3.0], 49.1, 8, 8)
    assert torch.allclose(cams.elevation_deg, torch.tensor([30.0, 0.0, -20.0]), atol=1e-4)
    assert torch.allclose(cams.azimuth_deg, torch.tensor([0.0, 90.0, -160.0]), atol=1e-4)
    assert torch.allclose(cams.distance, torch.tensor([2.0, 1.5, 3.0]))
    R = cams.c2w[:, :3, :3]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(3, 3, 3), atol=1e-5)
    # Azimuth 0, elevation 30: camera on +x side, above the xy-plane.
    p = cams.position[0]
    assert p[0] == pytest.approx(2 * math.cos(math.radians(30)), abs=1e-5) and p[2] == pytest.approx(1.0, abs=1e-5)


def test_rays_point_at_origin_and_image_up_is_world_up():
    cams = Cameras.from_spherical(0, 0, 2.0, 60, 64, 64)
    o, d = cams.rays()
    centre = (d[0, 31, 31] + d[0, 32, 32]) / 2
    assert torch.allclose(centre / centre.norm(), torch.tensor([-1.0, 0, 0]), atol=1e-3)
    # Top rows look up (+z), left columns look towards -y (camera at +x looking at -x: right is +y).
    assert d[0, 0, 32, 2] > 0 and d[0, 63, 32, 2] < 0
    assert d[0, 32, 0, 1] < 0 and d[0, 32, 63, 1] > 0
    # Corner ray makes half the fov with the axis vertically (pixel centre 0.5 px in).
    f = 32 / math.tan(math.radians(30))
    assert torch.allclose(d[0, 0, 32, 2], torch.tensor(31.5 / math.sqrt(f ** 2 + 31.5 ** 2 + 0.5 ** 2)), atol=1e-4)


def test_zero123_pose_matches_independent_formula():
    target = Cameras.from_spherical([10, 40], [30, -120], [2.0, 2.5], 49.1, 4, 4)
    cond = Cameras.from_spherical(20, 0, 2.0, 49.1, 4, 4)
    T = zero123_pose(target, cond)
    for k, (e, a, r) in enumerate([(10, 30, 2.0), (40, -120, 2.5)]):
        d_polar = math.radians((90 - e) - (90 - 20))
        d_az = math.radians(a - 0)
        expected = [d_polar, math.sin(d_az), math.cos(d_az), r - 2.0]
        assert T[k].tolist() == pytest.approx(expected, abs=1e-4)
    stable = zero123_pose(target, cond, stable=True)
    assert stable[:, 3].tolist() == pytest.approx([math.radians(70)] * 2, abs=1e-5)


def test_sampling_ranges_and_orbits():
    g = torch.Generator().manual_seed(0)
    cams = sample_views(256, [-10, 80], [-180, 180], [1.8, 2.2], [40, 60], 8, 8, generator=g)
    assert cams.elevation_deg.min() >= -10 - 1e-3 and cams.elevation_deg.max() <= 80 + 1e-3
    assert cams.distance.min() >= 1.8 - 1e-5 and cams.distance.max() <= 2.2 + 1e-5
    assert cams.fovy_deg.min() >= 40 and cams.fovy_deg.max() <= 60
    ring = orbit_views(16, 30, 1.5, 49.1, 8, 8)
    assert torch.allclose(ring.azimuth_deg[:4], torch.tensor([0.0, 22.5, 45.0, 67.5]), atol=1e-4)
    assert len(ring[3]) == 1 and ring[2:5].c2w.shape == (3, 4, 4)


def test_strided_cameras_are_that_subset_of_the_rays():
    # The reference view's reference_stride renders these: a 2x2 (or 4x4) subset of a full image's rays.
    cams = Cameras.from_spherical([30, -5], [40, 200], 1.5, 49.13, 16, 12)
    _, dirs = cams.rays()
    for row in range(2):
        for col in range(2):
            sub = cams.strided(2, row, col)
            assert (sub.height, sub.width) == (8, 6)
            assert torch.equal(sub.rays()[1], dirs[:, row::2, col::2])
    nested = cams.strided(2, 1, 0).strided(2, 1, 1)          # rows 1 + 2 * (1 + 2i), cols 0 + 2 * (1 + 2j)
    assert torch.allclose(nested.rays()[1], dirs[:, 3::4, 2::4], atol=1e-7)
    # The principal point moves with the shift: K maps a sub-pixel centre to the full image's ray.
    K = cams.strided(2, 1, 1).intrinsics()[0]
    assert K[0, 2].item() == pytest.approx(6 / 2 - (1 + 0.5 - 1) / 2)
    with pytest.raises(ValueError):
        cams.strided(5, 0, 0)                 # 16 x 12 has no 5th-pixel grid
