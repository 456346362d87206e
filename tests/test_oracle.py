"""The multiview-oracle guidance: ground-truth renders of a mesh as the target of every view."""

import pytest
import torch
import trimesh

from lift3d.cameras import Cameras
from lift3d.errors import UserError
from lift3d.guidance.base import GuidanceContext
from lift3d.mesh import MeshRaycaster, load_mesh
from lift3d.registry import find


@pytest.fixture
def mesh_path(tmp_path):
    """A coloured box away from the origin and not unit-sized: normalisation matters."""
    box = trimesh.creation.box(extents=(0.4, 0.2, 0.2))
    box.visual.face_colors = [[200, 40, 40, 255]] * 6 + [[40, 200, 40, 255]] * 6
    box.apply_translation([1.0, 2.0, 3.0])
    path = str(tmp_path / "box.ply")
    box.export(path)
    return path


def cameras(n=2, size=24):
    return Cameras.from_spherical([20.0, -10.0][:n], [30.0, 250.0][:n], 2.0, 45.0, size, size)


def oracle(mesh_path=None, gt_mesh=None, **cfg):
    guidance = find("multiview-oracle")({"mesh_path": mesh_path or "", **cfg})
    guidance.prepare(None, GuidanceContext(device=torch.device("cpu"), gt_mesh=gt_mesh))
    return guidance


def fake_render(rgba, background):
    """What a renderer would output if its field were exactly the ground truth."""
    alpha = rgba[..., 3:4]
    bg = torch.as_tensor(background, dtype=torch.float32)
    comp = rgba[..., :3] * alpha + bg * (1 - alpha)
    return {"comp_rgb": comp.clone().requires_grad_(True), "opacity": alpha.clone(), "comp_rgb_bg": bg}


def test_loss_is_zero_for_the_ground_truth_and_positive_otherwise(mesh_path):
    g = oracle(mesh_path)
    views = cameras()
    gt = MeshRaycaster(load_mesh(mesh_path, normalize=True)).render(views)["rgba"]
    assert gt[..., 3].mean() > 0.05                                  # the normalised box is in view
    render = fake_render(gt, [1.0, 1.0, 1.0])
    out = g(render, views, step=0)
    assert float(out["loss_guidance"].detach()) < 1e-10 and float(out["oracle_psnr"]) > 60

    wrong = fake_render(gt.flip(2), [1.0, 1.0, 1.0])                    # mirrored image
    out = g(wrong, views, step=0)
    assert float(out["loss_guidance"].detach()) > 1e-3
    out["loss_guidance"].backward()
    assert wrong["comp_rgb"].grad.abs().sum() > 0


def test_target_is_composited_on_the_renders_background(mesh_path):
    g = oracle(mesh_path)
    views = cameras()
    gt = g.ground_truth(views)
    on_black = fake_render(gt, [0.0, 0.0, 0.0])
    assert float(g(on_black, views, step=0)["loss_guidance"].detach()) < 1e-10
    on_white_but_says_black = fake_render(gt, [1.0, 1.0, 1.0])
    on_white_but_says_black["comp_rgb_bg"] = torch.zeros(3)
    assert float(g(on_white_but_says_black, views, step=0)["loss_guidance"].detach()) > 1e-3
    per_pixel = fake_render(gt, [0.2, 0.5, 0.9])
    per_pixel["comp_rgb_bg"] = torch.tensor([0.2, 0.5, 0.9]).expand(2, 24, 24, 3)
    assert float(g(per_pixel, views, step=0)["loss_guidance"].detach()) < 1e-10


def test_mask_term_is_weighted(mesh_path):
    views = cameras(1)
    for weight in (1.0, 3.0):
        g = oracle(mesh_path, mask_weight=weight)
        render = fake_render(g.ground_truth(views), [1.0, 1.0, 1.0])
        render["opacity"] = torch.zeros_like(render["opacity"])      # colour right, opacity wrong
        alpha = g.ground_truth(views)[..., 3]
        out = g(render, views, step=0)
        assert float(out["loss_guidance"].detach()) == pytest.approx(weight * float((alpha ** 2).mean()), rel=1e-5)


def test_mesh_comes_from_the_context_and_is_required(mesh_path):
    g = oracle(gt_mesh=mesh_path)
    assert len(g.mesh.faces) == 12
    assert g.mesh.bounds[1].max() == pytest.approx(0.5)             # normalised: longest side 1, centred
    with pytest.raises(UserError, match="gt=PATH"):
        oracle()
    with pytest.raises(UserError, match="not found"):
        oracle(mesh_path="missing.obj")


def test_repeated_cameras_are_cached(mesh_path):
    g = oracle(mesh_path, cache_views=2)
    views = cameras()
    first = g.ground_truth(views)
    assert len(g._cache) == 2
    assert torch.equal(g.ground_truth(views), first)
    g.ground_truth(Cameras.from_spherical(50.0, 0.0, 2.0, 45.0, 24, 24))
    assert len(g._cache) == 2                                          # least recently used dropped


def test_rejects_latent_renders_and_bad_config(mesh_path):
    g = oracle(mesh_path)
    render = {"comp_rgb": torch.zeros(1, 24, 24, 4), "opacity": torch.zeros(1, 24, 24, 1)}
    with pytest.raises(UserError, match="RGB"):
        g(render, cameras(1), step=0)
    with pytest.raises(UserError, match="shading"):
        find("multiview-oracle")({"shading": "phong"})


def test_depth_term_penalises_a_filled_concavity_that_colour_cannot_see(mesh_path):
    """Same colour and mask, wrong depth: only the depth term notices, relative to the true distance."""
    views = cameras()
    g = oracle(mesh_path, depth_weight=2.0)
    gt = g.ground_truth(views)
    assert gt.shape[-1] == 5 and (gt[..., 4][gt[..., 3] > 0.5] > 0).all()
    render = fake_render(gt, [1.0, 1.0, 1.0])
    render["depth"] = gt[..., 4].clone().requires_grad_(True)
    out = g(render, views, step=0)
    assert float(out["oracle_depth_rel"]) < 1e-6
    render["depth"] = (0.9 * gt[..., 4]).requires_grad_(True)    # 10% too near everywhere
    out = g(render, views, step=0)
    assert float(out["oracle_depth_rel"]) == pytest.approx(0.1, rel=1e-4)
    assert float(out["loss_guidance"].detach()) == pytest.approx(2.0 * 0.1, rel=1e-3)
    out["loss_guidance"].backward()
    assert render["depth"].grad.abs().sum() > 0
    assert "oracle_depth_rel" not in oracle(mesh_path)(render, views, step=0)   # off by default
