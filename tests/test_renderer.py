"""The volume renderer, its occupancy grid and the backgrounds."""

import math

import pytest
import torch
import torch.nn.functional as F

from lift3d.backgrounds.learned import LearnedBackground
from lift3d.backgrounds.solid import SolidColorBackground
from lift3d.cameras import Cameras
from lift3d.errors import ConfigError
from lift3d.geometry.base import BaseGeometry
from lift3d.geometry.hashgrid_nerf import HashGridNeRF
from lift3d.geometry.voxel_rf import VoxelRadianceField
from lift3d.registry import find
from lift3d.renderers.volume import VolumeRenderer, composite_weights, ray_aabb


class GaussianBlob(BaseGeometry):
    """sigma(x) = a exp(-|x|^2 / (2 s^2)); constant colour. Its optical depth along a line at
    distance b from the origin is a s sqrt(2 pi) exp(-b^2 / (2 s^2))."""

    def __init__(self, a=20.0, s=0.15, color=(0.2, 0.4, 0.6)):
        super().__init__({"radius": 1.0})
        self.a, self.s = a, s
        self.n_feature_dims = len(color)
        self.albedo = torch.nn.Parameter(torch.tensor(color))

    def density(self, points):
        return self.a * torch.exp(-(points ** 2).sum(-1) / (2 * self.s ** 2))

    def forward(self, points):
        return {"density": self.density(points), "features": self.albedo.expand(len(points), -1)}


class Ball(GaussianBlob):
    """Constant density ``a`` inside radius ``s``."""

    def density(self, points):
        return self.a * (points.norm(dim=-1) < self.s).float()


def renderer(geometry, background=None, **cfg):
    background = background or SolidColorBackground({"color": [1.0] * geometry.n_feature_dims})
    return VolumeRenderer(cfg, geometry=geometry, background=background)


def front_camera(size=5, distance=3.0, fovy=40.0):
    return Cameras.from_spherical(0.0, 0.0, distance, fovy, size, size)   # on +x, looking at the origin


def test_ray_aabb_and_weights():
    o = torch.tensor([[3.0, 0.0, 0.0], [3.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    t_near, t_far, hit = ray_aabb(o, d, 1.0)
    assert hit.tolist() == [True, False, True]
    assert t_near.tolist() == [2.0, t_near[1].item(), 0.0] and t_far[0] == 4.0 and t_far[2] == 1.0
    assert t_far[1] == t_near[1]
    sigma = torch.full((1, 50), 0.7)
    w = composite_weights(sigma, torch.full((1, 1), 0.04))
    assert w.sum().item() == pytest.approx(1 - math.exp(-0.7 * 2.0), rel=1e-5)


def test_opacity_of_gaussian_blob_matches_closed_form():
    blob = GaussianBlob(a=20.0, s=0.15)
    r = renderer(blob, num_samples_per_ray=256, use_occupancy_grid=False).eval()
    cams = Cameras.from_spherical(25.0, 40.0, 3.0, 20.0, 9, 9)
    out = r(cams)
    origins, dirs = cams.rays()
    b2 = torch.cross(origins, dirs, dim=-1).pow(2).sum(-1, keepdim=True)   # squared distance of the line to 0
    expected = 1 - torch.exp(-20.0 * 0.15 * math.sqrt(2 * math.pi) * torch.exp(-b2 / (2 * 0.15 ** 2)))
    assert torch.allclose(out["opacity"], expected, atol=2e-3)
    assert expected.max() > 0.99 and expected.min() < 0.1       # the image spans opaque to clear
    # Composite over the white background.
    assert torch.allclose(out["comp_rgb"], out["comp_rgb_fg"] + (1 - out["opacity"]) * 1.0)
    assert torch.allclose(out["comp_rgb_fg"], out["opacity"] * torch.tensor([0.2, 0.4, 0.6]), atol=1e-5)


def test_ball_centre_ray_transmittance_and_depth():
    c = 2   # with an odd image size the centre pixel's ray passes through the origin
    faint = renderer(Ball(a=2.0, s=0.5), num_samples_per_ray=400, use_occupancy_grid=False).eval()
    out = faint(front_camera())
    assert out["opacity"][0, c, c, 0].item() == pytest.approx(1 - math.exp(-2.0 * 2 * 0.5), abs=0.01)
    opaque = renderer(Ball(a=50.0, s=0.5), num_samples_per_ray=400, use_occupancy_grid=False).eval()
    out = opaque(front_camera(fovy=60.0))
    # Exponential absorption from the surface at distance 2.5: mean depth 2.5 + 1 / sigma.
    assert out["depth"][0, c, c, 0].item() == pytest.approx(2.5 + 1 / 50.0, abs=0.01)
    # A corner ray misses the ball entirely: empty, and at the background depth.
    assert out["opacity"][0, 0, 0, 0].item() == 0.0
    assert out["depth"][0, 0, 0, 0].item() == pytest.approx(10.0)


def test_normals_face_the_camera_and_are_differentiable():
    blob = GaussianBlob(a=200.0, s=0.25)
    r = renderer(blob, num_samples_per_ray=128, use_occupancy_grid=False).train()
    out = r(front_camera(), normals=True)
    n = out["comp_normal"] * 2 - 1
    assert 0.95 < n[0, 2, 2, 0].item() <= 1.0 + 1e-4           # camera on +x: normal +x
    assert out["comp_normal"].min() >= 0 and out["comp_normal"].max() <= 1
    # Empty pixels show the neutral 0.5.
    far = r(front_camera(fovy=90.0), normals=True)["comp_normal"]
    assert torch.allclose(far[0, 0, 0], torch.full((3,), 0.5), atol=1e-3)
    voxel = VoxelRadianceField({"grid_size": 16})
    with torch.no_grad():
        voxel.density_raw.normal_()
    out = renderer(voxel, num_samples_per_ray=32, use_occupancy_grid=False).train()(front_camera(), normals=True)
    ((out["comp_normal"][:, 1:] - out["comp_normal"][:, :-1]) ** 2).mean().backward()
    assert voxel.density_raw.grad.abs().sum() > 0


def test_occupancy_skipping_matches_full_evaluation():
    torch.manual_seed(0)
    blob = GaussianBlob(a=30.0, s=0.12)
    r = renderer(blob, num_samples_per_ray=128, occ_resolution=32, occ_warmup_steps=4, occ_update_every=8).eval()
    cams = Cameras.from_spherical([10.0, 60.0], [30.0, 200.0], 2.5, 40.0, 24, 24)
    full = r(cams)
    assert r.stats["evaluated_fraction"] > 0.9
    r.update_step(0)
    assert not r.skipping                      # still warming up
    r.update_step(4)
    assert r.skipping and r.occupancy.occupied_fraction < 0.1
    skipped = r(cams)
    assert r.stats["evaluated_fraction"] < 0.2
    for key in ("comp_rgb", "opacity"):
        assert (skipped[key] - full[key]).abs().max() < 0.01, key
        assert (skipped[key] - full[key]).abs().mean() < 1e-3, key
    # The grid is renderer state: a fresh renderer restores it from the state dict.
    other = renderer(blob, num_samples_per_ray=128, occ_resolution=32)
    other.load_state_dict(r.state_dict())
    assert other.skipping and torch.equal(other.occupancy.binary, r.occupancy.binary)


def test_occupancy_grid_follows_a_moving_field():
    torch.manual_seed(0)
    blob = GaussianBlob(a=30.0, s=0.12)
    r = renderer(blob, num_samples_per_ray=64, occ_resolution=16, occ_warmup_steps=0)
    r.update_occupancy()
    centre = torch.tensor([[0.0, 0.0, 0.0]])
    moved = torch.tensor([[0.0, 0.6, 0.0]])
    assert r.occupancy.occupied(centre).item() and not r.occupancy.occupied(moved).item()
    blob.density = lambda p: 30.0 * torch.exp(-((p - moved) ** 2).sum(-1) / (2 * 0.12 ** 2))
    for _ in range(40):   # refreshes visit occupied cells and a random eighth of the rest
        r.update_occupancy()
    assert r.occupancy.occupied(moved).item()
    assert r.occupancy.occupied(centre).item()   # stale cells fade slowly (EMA), never abruptly


def test_chunked_eval_equals_single_pass():
    torch.manual_seed(0)
    voxel = VoxelRadianceField({"grid_size": 12, "n_feature_dims": 4})
    with torch.no_grad():
        voxel.density_raw.normal_()
    bg = SolidColorBackground({"color": [0.1, 0.2, 0.3, 0.4]})
    cams = Cameras.from_spherical([20.0, 50.0], [0.0, 120.0], 2.5, 40.0, 8, 8)
    one = renderer(voxel, bg, num_samples_per_ray=24, eval_chunk_rays=10 ** 6).eval()(cams, normals=True)
    many = renderer(voxel, bg, num_samples_per_ray=24, eval_chunk_rays=7).eval()(cams, normals=True)
    assert one["comp_rgb"].shape == (2, 8, 8, 4)
    for key in one:
        assert torch.allclose(one[key], many[key], atol=1e-5), key


def test_gradients_reach_field_and_background_parameters():
    torch.manual_seed(0)
    cams = Cameras.from_spherical(20.0, 30.0, 2.5, 40.0, 8, 8)
    voxel = VoxelRadianceField({"grid_size": 10})
    with torch.no_grad():
        voxel.density_raw.normal_()
    bg = LearnedBackground({"kind": "envmap"})
    out = renderer(voxel, bg, num_samples_per_ray=16).train()(cams)
    (out["comp_rgb"].sum() + out["depth"].mean()).backward()
    for p in [voxel.density_raw, voxel.features_raw, voxel.d_scale, bg.texture]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    nerf = HashGridNeRF({"n_levels": 3, "log2_hashmap_size": 10, "base_resolution": 4, "mlp_neurons": 8})
    out = renderer(nerf, num_samples_per_ray=16).train()(cams, bg_color=torch.tensor([0.0, 0.0, 0.0]))
    out["comp_rgb"].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nerf.parameters())


@pytest.mark.parametrize("normals", [False, True])
def test_checkpointed_training_chunks_give_the_unchunked_gradients(normals):
    """Above train_chunk_samples the graph is kept for one chunk at a time; gradients are the same
    (jittered samples included: the recomputation replays the RNG)."""
    torch.manual_seed(0)
    nerf = HashGridNeRF({"n_levels": 3, "log2_hashmap_size": 10, "base_resolution": 4, "mlp_neurons": 8,
                         "density_bias": "blob_magic3d", "radius": 1.0})
    cams = Cameras.from_spherical([20.0, -30.0], [0.0, 100.0], 2.5, 40.0, 12, 12)
    grads, images = [], []
    for budget in (0, 16 * 37):          # whole render at once; 37-ray chunks, each recomputed in backward
        r = renderer(nerf, num_samples_per_ray=16, train_chunk_samples=budget).train()
        nerf.zero_grad()
        torch.manual_seed(1)
        out = r(cams, normals=normals)
        loss = (out["comp_rgb"] ** 2).sum() + out["depth"].mean() + (out["comp_normal"].sum() if normals else 0)
        loss.backward()
        grads.append([p.grad.clone() for p in nerf.parameters()])
        images.append(out["comp_rgb"].detach())
    assert torch.allclose(images[0], images[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bg_color_override_and_channel_checks():
    blob = GaussianBlob(color=(0.1, 0.2, 0.3, 0.4))
    r = renderer(blob, num_samples_per_ray=16).eval()
    out = r(front_camera(fovy=90.0), bg_color=torch.tensor([1.0, -1.0, 2.0, 0.5]))
    assert torch.allclose(out["comp_rgb"][0, 0, 0], torch.tensor([1.0, -1.0, 2.0, 0.5]), atol=1e-4)
    assert torch.allclose(out["comp_rgb_bg"][0, 4, 4], torch.tensor([1.0, -1.0, 2.0, 0.5]))
    with pytest.raises(ConfigError, match="4 values"):
        renderer(blob, SolidColorBackground({}))
    with pytest.raises(ValueError):
        r(front_camera(), bg_color=torch.ones(3))


def test_learned_backgrounds():
    torch.manual_seed(0)
    env = find("learned")({"kind": "envmap", "envmap_size": [4, 6], "lr": 1e-4})
    assert env.param_groups(0.05)[0]["lr"] == 1e-4
    assert LearnedBackground({}).param_groups(0.05)[0]["lr"] == 0.05
    dirs = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1).view(1, 1, 2, 3)
    assert torch.allclose(env(dirs), torch.full((1, 1, 2, 3), 0.5))   # grey at init
    with torch.no_grad():
        env.texture.normal_()
    eps = 1e-3   # azimuth +-(180 - eps): the two sides of the seam read the same texels
    seam = torch.tensor([[math.cos(math.pi - eps), math.sin(math.pi - eps), 0.0],
                         [math.cos(math.pi - eps), -math.sin(math.pi - eps), 0.0]]).view(1, 1, 2, 3)
    a, b = env(seam)[0, 0]
    assert torch.allclose(a, b, atol=1e-2)
    # 4 rows x 6 columns: texel [0, 0] is centred at elevation 67.5, azimuth -150 degrees.
    e, a = math.radians(67.5), math.radians(-150.0)
    texel = torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]).view(1, 1, 1, 3)
    assert torch.allclose(env(texel)[0, 0, 0], torch.sigmoid(env.texture[0, :, 0, 0]), atol=1e-5)
    mlp = LearnedBackground({"kind": "mlp", "n_channels": 4, "init": [1.0, 2.0, 3.0, 4.0]})
    out = mlp(torch.randn(2, 3, 3, 3))
    assert out.shape == (2, 3, 3, 4) and torch.allclose(out, torch.tensor([1.0, 2.0, 3.0, 4.0]).expand_as(out))
    with pytest.raises(ConfigError):
        LearnedBackground({"kind": "cubemap"})


def test_fresh_uniform_voxel_field_is_fully_occupied():
    """A new voxel grid is a uniform faint fog: the first occupancy refresh must keep every cell,
    or the field is never evaluated and never trains."""
    from lift3d.registry import find

    for grid_size in (8, 100):
        geometry = find("voxel-rf")({"grid_size": grid_size, "n_feature_dims": 4})
        background = find("solid-color")({"color": [0.0, 0.0, 0.0, 0.0]})
        renderer = find("volume-renderer")({"occ_warmup_steps": 0}, geometry=geometry, background=background)
        renderer.update_step(0)
        assert renderer.occupancy.binary.all(), grid_size
