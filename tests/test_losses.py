import torch

from lift3d.systems import losses


def test_depth_smoothness_of_a_plane_ramp():
    ramp = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 4, 5, 1)   # +1 per column, constant down rows
    assert torch.isclose(losses.depth_smoothness(ramp), torch.tensor(0.5))


def test_orientation_penalises_only_normals_facing_away():
    dirs = torch.tensor([0.0, 0.0, -1.0]).expand(1, 2, 2, 3)        # rays travel towards -z
    opacity = torch.ones(1, 2, 2, 1)
    towards_camera = torch.tensor([0.0, 0.0, 1.0]).expand(1, 2, 2, 3)
    assert losses.orientation(towards_camera, opacity, dirs) == 0
    away = -towards_camera * 0.5                                       # half-covered pixels facing away
    assert torch.isclose(losses.orientation(away, opacity, dirs), torch.tensor(0.25))


def test_opaque_and_sparsity_prefer_binary_and_empty():
    assert losses.opaque(torch.full((1, 2, 2, 1), 0.5)) > losses.opaque(torch.full((1, 2, 2, 1), 0.999))
    assert losses.sparsity(torch.zeros(1, 2, 2, 1)) < losses.sparsity(torch.ones(1, 2, 2, 1))


def test_near_view_is_zero_for_identical_views():
    rgb, depth = torch.rand(1, 4, 4, 3), torch.rand(1, 4, 4, 1)
    assert losses.near_view_consistency(rgb, depth, rgb, depth) == 0
    assert losses.near_view_consistency(rgb, depth, rgb + 0.1, depth) > 0.099
