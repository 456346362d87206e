"""The PyTorch 3D Gaussian rasterizer (lift3d/renderers/gaussian_raster.py) against closed forms,
hand-written projection maths and a brute-force all-pairs compositor written here."""

import math

import pytest
import torch

from lift3d.cameras import Cameras
from lift3d.renderers import gaussian_raster as gr


def pixel_grid(H, W, dtype=torch.float64):
    i, j = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
    return j + 0.5, i + 0.5                                     # pixel centres (x, y)


def closed_form_alpha(H, W, centre, var, opacity):
    """alpha of an isotropic 2D Gaussian of variance ``var`` (the low-pass included), gsplat's clamps."""
    x, y = pixel_grid(H, W)
    alpha = (opacity * torch.exp(-0.5 * ((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / var)).clamp(max=0.999)
    return torch.where(alpha >= 1 / 255, alpha, 0.0)


def ray_length(cam, H, W):
    x, y = pixel_grid(H, W)
    (sx, sy), f = cam.pixel_shift, cam.focal.double()
    return torch.sqrt(1 + ((x + sx - W / 2) / f) ** 2 + ((y + sy - H / 2) / f) ** 2)


def isotropic(centres, sigma, opacity, colors):
    n = len(centres)
    return (torch.tensor(centres, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)[:, None].expand(n, 3),
            torch.tensor([[1.0, 0, 0, 0]] * n, dtype=torch.float64), torch.tensor(opacity, dtype=torch.float64),
            torch.tensor(colors, dtype=torch.float64))


def test_one_isotropic_gaussian_is_the_closed_form_2d_gaussian():
    H = W = 64
    cam = Cameras.from_spherical(0.0, 0.0, 2.0, 49.1, H, W)          # on +x, looking at the origin
    s, o, color, bg = 0.08, 0.8, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0])
    out = gr.rasterize(*isotropic([[0.0, 0.0, 0.0]], [s], [o], [color.tolist()]), cam, bg, background_depth=7.0)
    f = cam.focal.double().item()
    var = (f * s / 2.0) ** 2 + 0.3                                   # (f s / z)^2 + gsplat's eps2d
    alpha = closed_form_alpha(H, W, (32.0, 32.0), var, o)
    expect = alpha[..., None] * color + (1 - alpha[..., None]) * bg.double()
    assert torch.allclose(out["comp_rgb"][0], expect, atol=1e-6)
    assert torch.allclose(out["opacity"][0, ..., 0], alpha, atol=1e-6)
    # depth: distance along the unit ray, as the volume renderer's, over background_depth
    assert torch.allclose(out["depth"][0, ..., 0], alpha * 2.0 * ray_length(cam, H, W) + (1 - alpha) * 7.0, atol=1e-6)
    assert torch.allclose(out["means2d"][0, 0], torch.tensor([32.0, 32.0], dtype=torch.float64))
    assert out["radii"][0, 0] == math.ceil(3 * math.sqrt(var + 0.1))  # b + sqrt(max(0.01, b^2 - det))
    assert alpha[32, 32] > 0.7 and alpha[0, 0] == 0


def test_two_overlapping_gaussians_composite_front_to_back():
    H = W = 32
    # Given back one first: the sort has to put the front one first.
    gauss = isotropic([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [0.15, 0.1], [0.7, 0.9], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for azimuth, front, back in [(0.0, 1, 0), (180.0, 0, 1)]:
        cam = Cameras.from_spherical(0.0, azimuth, 4.0, 40.0, H, W)
        out = gr.rasterize(*gauss, cam, None)
        f, z = cam.focal.double().item(), {front: 3.0, back: 5.0}
        a = {k: closed_form_alpha(H, W, (16.0, 16.0), (f * gauss[1][k, 0].item() / z[k]) ** 2 + 0.3, gauss[3][k].item())
             for k in (0, 1)}
        c = gauss[4]
        expect = a[front][..., None] * c[front] + ((1 - a[front]) * a[back])[..., None] * c[back]
        assert torch.allclose(out["comp_rgb"][0], expect, atol=1e-6)
        assert torch.allclose(out["opacity"][0, ..., 0], 1 - (1 - a[front]) * (1 - a[back]), atol=1e-6)
        depth = (a[front] * z[front] + (1 - a[front]) * a[back] * z[back]) * ray_length(cam, H, W)
        assert torch.allclose(out["depth"][0, ..., 0], depth, atol=1e-6)
        channel = {0: 1, 1: 0}                                          # Gaussian 0 is green, 1 red
        centre = out["comp_rgb"][0, 16, 16]
        assert centre[channel[front]] > 2 * centre[channel[back]]       # the front colour dominates


def test_a_gaussian_on_a_pixels_ray_lands_on_that_pixel_centre():
    cams = Cameras.cat([Cameras.from_spherical(e, a, d, fov, 96, 160)
                        for e, a, d, fov in [(20, 30, 2.0, 49.1), (-40, 200, 3.0, 35.0)]]).strided(2, 1, 0)
    origins, dirs = cams.rays()
    H, W = cams.height, cams.width
    for b, (i, j) in enumerate([(5, 70), (40, 3)]):
        point = (origins[b, i, j] + 1.7 * dirs[b, i, j]).double()[None]
        means2d = gr.project(point, torch.full((1, 3), 0.01, dtype=torch.float64),
                             torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64), cams)["means2d"]
        assert torch.allclose(means2d[b, 0], torch.tensor([j + 0.5, i + 0.5], dtype=torch.float64), atol=1e-3)
        out = gr.rasterize(point, torch.full((1, 3), 0.005, dtype=torch.float64),
                           torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64),
                           torch.ones(1, 1, dtype=torch.float64), cams[b])
        opacity = out["opacity"][0, ..., 0]
        assert divmod(int(opacity.argmax()), W) == (i, j)
        assert abs(out["depth"][0, i, j, 0] / opacity[i, j] - 1.7) < 1e-4   # ray distance to the mean


def rotation_from_axis_angle(q):
    """R from a unit quaternion via Rodrigues' formula (another route than the module's)."""
    q = q / q.norm()
    angle = 2 * torch.atan2(q[1:].norm(), q[0])
    k = q[1:] / q[1:].norm()
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=q.dtype)
    return torch.eye(3, dtype=q.dtype) + torch.sin(angle) * K + (1 - torch.cos(angle)) * K @ K


def test_2d_covariance_is_j_w_sigma_wt_jt_plus_lowpass():
    g = torch.Generator().manual_seed(3)
    cam = Cameras.from_spherical(25.0, 140.0, 2.5, 45.0, 72, 100)
    mean = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 0.6
    scale = torch.tensor([0.3, 0.05, 0.12], dtype=torch.float64)
    quat = torch.randn(4, generator=g, dtype=torch.float64) * 3           # unnormalised on purpose
    p = gr.project(mean[None], scale[None], quat[None], cam)

    c2w_cv = cam.c2w[0].double() @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    w2c = torch.linalg.inv(c2w_cv)                                       # OpenGL c2w -> OpenCV w2c
    Wm = w2c[:3, :3]
    x, y, z = Wm @ mean + w2c[:3, 3]
    f = cam.focal.double().item()
    J = torch.tensor([[f / z, 0, -f * x / z ** 2], [0, f / z, -f * y / z ** 2]], dtype=torch.float64)
    R = rotation_from_axis_angle(quat)
    Sigma = R @ torch.diag(scale ** 2) @ R.T
    cov2d = J @ Wm @ Sigma @ Wm.T @ J.T + 0.3 * torch.eye(2, dtype=torch.float64)
    assert torch.allclose(p["cov2d"][0, 0], cov2d, atol=1e-5, rtol=0)
    inv = torch.linalg.inv(cov2d)
    assert torch.allclose(p["conics"][0, 0], torch.stack([inv[0, 0], inv[0, 1], inv[1, 1]]), atol=1e-8)
    assert torch.allclose(p["means2d"][0, 0], torch.stack([f * x / z + 50, f * y / z + 36]), atol=1e-8)
    assert p["depths"][0, 0] == pytest.approx(z.item())


def brute_force(means, scales, quats, opacities, colors, cams, bg, tile=16):
    """Every Gaussian at every pixel, one Gaussian at a time in depth order, as gsplat's kernel loop:
    skip alpha < 1/255, stop a pixel before the Gaussian that would take T to <= 1e-4. A Gaussian
    reaches the pixels of the tiles its radius touches. Returns rgb, opacity, sum w z and stop count."""
    p = gr.project(means, scales, quats, cams)
    B, N = p["radii"].shape
    H, W = cams.height, cams.width
    x, y = pixel_grid(H, W, means.dtype)
    feats = torch.cat([colors, torch.zeros(N, 1, dtype=means.dtype)], -1)
    out, T, done = torch.zeros(B, H, W, feats.shape[1], dtype=means.dtype), torch.ones(B, H, W, dtype=means.dtype), 0
    for b in range(B):
        stopped = torch.zeros(H, W, dtype=torch.bool)
        for n in torch.argsort(p["depths"][b], stable=True).tolist():
            r = p["radii"][b, n].item()
            if r == 0:
                continue
            (u, v), (a, bb, c) = p["means2d"][b, n], p["conics"][b, n]
            lo_x, hi_x = math.floor((u - r) / tile) * tile, math.ceil((u + r) / tile) * tile
            lo_y, hi_y = math.floor((v - r) / tile) * tile, math.ceil((v + r) / tile) * tile
            in_box = (x >= lo_x) & (x < hi_x) & (y >= lo_y) & (y < hi_y)
            dx, dy = u - x, v - y
            sigma = 0.5 * (a * dx * dx + c * dy * dy) + bb * dx * dy
            alpha = (opacities[n] * torch.exp(-sigma)).clamp(max=0.999)
            use = in_box & ~stopped & (sigma >= 0) & (alpha >= 1 / 255)
            next_T = T[b] * (1 - alpha)
            stop = use & (next_T <= 1e-4)
            stopped |= stop
            use &= ~stop
            feats[n, -1] = p["depths"][b, n]
            out[b] += torch.where(use, alpha * T[b], 0.0)[..., None] * feats[n]
            T[b] = torch.where(use, next_T, T[b])
        done += int(stopped.sum())
    return out[..., :-1] + T[..., None] * bg, 1 - T, out[..., -1], done


def random_scene(n=120, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * 0.25
    means[:5] = torch.tensor([2.5, 0.0, 0.3], dtype=dtype)                # behind / at the first camera: culled
    means[5:10] *= 8                                                      # mostly off-screen
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.12 + 0.005
    scales[10:20] *= 0.05                                                 # sub-pixel ones
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    opacities = torch.rand(n, generator=g, dtype=dtype) * 0.15 + 0.85     # dense enough to saturate pixels
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, scales, quats, opacities, colors


def scene_cameras():
    return Cameras.from_spherical([0.0, 35.0], [0.0, 120.0], [2.0, 2.4], [49.1, 40.0], 80, 112).strided(2, 0, 1)


def test_tiles_equal_a_brute_force_all_pairs_render():
    cams, scene = scene_cameras(), random_scene()
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    rgb, opacity, depth_z, stopped = brute_force(*scene, cams, bg)
    assert stopped > 100 and (opacity > 0).float().mean() > 0.3          # the early stop and culling are exercised
    ray = torch.stack([ray_length(cams[b], cams.height, cams.width) for b in range(len(cams))])
    for chunk in (2 ** 22, 4096):                                         # one chunk per view / one tile per chunk
        out = gr.rasterize(*scene, cams, bg, chunk_elements=chunk)
        assert (out["radii"][0, :5] == 0).all()
        assert torch.allclose(out["comp_rgb"], rgb, atol=1e-5, rtol=0)
        assert torch.allclose(out["opacity"][..., 0], opacity, atol=1e-5, rtol=0)
        assert torch.allclose(out["depth"][..., 0], depth_z * ray, atol=1e-5, rtol=0)


def test_float32_gradients_reach_every_input_and_recomputation_changes_nothing():
    scene = [t.float().requires_grad_() for t in random_scene(seed=1)]
    cams = scene_cameras()
    grads = []
    for recompute in (False, True):
        out = gr.rasterize(*scene, cams, torch.ones(3), normals=True, chunk_elements=8192, use_checkpoint=recompute)
        out["means2d"].retain_grad()
        w = torch.linspace(0, 1, out["comp_rgb"].numel()).view_as(out["comp_rgb"])
        ((out["comp_rgb"] * w).sum() + out["depth"].mean() + out["comp_normal"].sum()).backward()
        grads.append([t.grad.clone() for t in scene] + [out["means2d"].grad])
        for t in scene:
            t.grad = None
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    view_grad = grads[0][-1]
    assert (view_grad.norm(dim=-1) > 0).sum() > 50                       # densification's view-space gradients


def test_gradcheck_float64_tiny():
    cam = Cameras.from_spherical(20.0, 30.0, 2.0, 49.1, 20, 24)
    g = torch.Generator().manual_seed(5)
    means = (torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.15).requires_grad_()
    scales = (torch.rand(3, 3, generator=g, dtype=torch.float64) * 0.1 + 0.08).requires_grad_()
    quats = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    opacities = torch.tensor([0.6, 0.7, 0.5], dtype=torch.float64, requires_grad=True)
    colors = torch.rand(3, 3, generator=g, dtype=torch.float64).requires_grad_()

    for recompute in (False, True):                                       # plain autograd; graph rebuilt in backward
        def render(*args):
            out = gr.rasterize(*args, cam, torch.tensor([0.1, 0.2, 0.3]), normals=True, chunk_elements=512,
                               use_checkpoint=recompute)
            return torch.cat([out["comp_rgb"], out["depth"], out["comp_normal"]], -1)

        # fast_mode: Jacobian-vector products along random directions (the full Jacobian takes minutes)
        assert torch.autograd.gradcheck(render, (means, scales, quats, opacities, colors), eps=1e-6, atol=1e-5,
                                        fast_mode=True)


def test_normals_face_the_camera_and_antialiasing_dims_small_gaussians():
    flat = (torch.zeros(1, 3), torch.tensor([[0.2, 0.2, 0.002]]), torch.tensor([[1.0, 0, 0, 0]]),
            torch.tensor([0.9]), torch.ones(1, 1))
    for elevation, nz in [(60.0, 1.0), (-60.0, -1.0)]:
        out = gr.rasterize(*flat, Cameras.from_spherical(elevation, 10.0, 2.0, 49.1, 32, 32), None, normals=True)
        a = out["opacity"][0, 16, 16, 0]
        assert torch.allclose(out["comp_normal"][0, 16, 16], (a * torch.tensor([0.0, 0.0, nz]) + 1) / 2, atol=1e-5)
    tiny = (torch.zeros(1, 3), torch.full((1, 3), 1e-4), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0.9]), torch.ones(1, 1))
    cam = Cameras.from_spherical(0.0, 0.0, 2.0, 49.1, 32, 32)
    plain, aa = (gr.rasterize(*tiny, cam, antialiased=m)["opacity"].sum() for m in (False, True))
    assert aa < 0.05 * plain                          # compensation sqrt(det / det_blurred) << 1


def test_nothing_visible_gives_the_background():
    cam = Cameras.from_spherical(0.0, 0.0, 2.0, 49.1, 24, 40)
    out = gr.rasterize(torch.tensor([[5.0, 0, 0]]), torch.full((1, 3), 0.1), torch.tensor([[1.0, 0, 0, 0]]),
                       torch.tensor([0.9]), torch.ones(1, 3), cam, torch.tensor([0.5, 0.5, 0.5]), background_depth=10.0)
    assert (out["comp_rgb"] == 0.5).all() and (out["opacity"] == 0).all() and (out["depth"] == 10).all()
    assert out["radii"].tolist() == [[0]]


@pytest.mark.skipif(not gr.gsplat_available(), reason="needs gsplat and CUDA")
def test_gsplat_backend_matches_the_torch_path():
    if tuple(int(v) for v in gr._gsplat().__version__.split(".")[:2]) >= (1, 5):
        pytest.skip("gsplat >= 1.5 changed MAX_ALPHA (0.99) and the radii (3.33 sigma per axis)")
    scene = [t.float().cuda() for t in random_scene(seed=2)]
    cams = scene_cameras().to("cuda")
    a = gr.rasterize(*scene, cams, None, normals=True, backend="torch")
    b = gr.rasterize(*scene, cams, None, normals=True, backend="gsplat")
    for key in ("comp_rgb", "opacity", "depth", "comp_normal"):
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    assert (a["radii"] != b["radii"]).float().mean() < 0.01       # float32 rounding at ceil()
