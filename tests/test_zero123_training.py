"""Zero123 training: the dataset layout, a tiny end-to-end training run with resume, the training
conditioning (pose, CFG dropout, identity projection) and the image metrics."""

import json
import math
import os

import numpy as np
import pytest
import torch

from lift3d.training.data import MultiViewSet, generate_dataset, read_object
from lift3d.evaluation.image_metrics import psnr, ssim


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mv") / "data")
    generate_dataset(root, n_procedural=3, n_urdf=0, n_views=3, size=32, examples_dir=None,
                     n_heldout_procedural=1, n_heldout_urdf=0, pybullet_meshes=False, log=lambda *_: None)
    return root


def test_dataset_layout(tiny_data):
    split = json.load(open(os.path.join(tiny_data, "split.json")))
    assert split == {"train": ["proc-000000", "proc-000001", "proc-000002"], "heldout": ["proc-100000"]}
    rgba, meta = read_object(os.path.join(tiny_data, "proc-000001"))
    assert rgba.shape == (3, 32, 32, 4) and rgba.dtype == np.uint8
    assert 0 < (rgba[..., 3] > 127).mean() < 0.9          # an object in front of an empty background
    for v in meta["views"]:
        assert os.path.isfile(os.path.join(tiny_data, "proc-000001", v["file"]))
        e, a, r = math.radians(v["elevation_deg"]), math.radians(v["azimuth_deg"]), v["distance"]
        expected = [r * math.cos(e) * math.cos(a), r * math.cos(e) * math.sin(a), r * math.sin(e)]
        np.testing.assert_allclose(np.array(v["c2w"])[:3, 3], expected, atol=1e-4)
    # Held-out objects carry the benchmark views (input, +90°, +180° at the same elevation).
    _, held = read_object(os.path.join(tiny_data, "proc-100000"))
    b = held["bench"]
    az = [held["views"][i]["azimuth_deg"] for i in (b["input"], b["offsets"]["90"], b["offsets"]["180"])]
    assert (az[1] - az[0]) % 360 == pytest.approx(90, abs=1e-3) and (az[2] - az[0]) % 360 == pytest.approx(180, abs=1e-3)
    data = MultiViewSet(tiny_data, "train")
    assert data.images.shape == (3, 3, 3, 32, 32) and data.positions.shape == (3, 3, 3)
    assert data.images[..., 0, 0].min() == 255           # composited on white


def test_train_save_load_resume(tiny_data, tmp_path):
    from lift3d.training.train_zero123 import train_zero123
    from lift3d.zero123 import Zero123Model

    out = str(tmp_path / "run")
    common = ["--data", tiny_data, "--out", out, "--size", "tiny", "--vae-steps", "2", "--batch-size", "4",
              "--vae-batch-size", "4", "--sample-every", "0", "--ckpt-every", "1", "--threads", "1"]
    assert train_zero123(common + ["--steps", "3"]) == 0
    ckpt = torch.load(os.path.join(out, "ckpts", "last.ckpt"), weights_only=True)
    assert (ckpt["vae_step"], ckpt["step"], ckpt["stage"]) == (2, 3, "diffusion")

    model = Zero123Model.from_pretrained(os.path.join(out, "model"))
    assert model.image_size == 32 and model.latent_scale == pytest.approx(ckpt["scaling_factor"])
    cond = model.encode_condition(torch.rand(2, 3, 32, 32))
    eps = model.predict_noise(torch.randn(2, 4, 4, 4), torch.tensor(500), cond, torch.randn(2, 4), 3.0)
    assert eps.shape == (2, 4, 4, 4) and torch.isfinite(eps).all()

    assert train_zero123(common + ["--steps", "5", "--resume", "--decoder-steps", "2"]) == 0
    ckpt = torch.load(os.path.join(out, "ckpts", "last.ckpt"), weights_only=True)
    assert (ckpt["vae_step"], ckpt["step"]) == (2, 5)      # the VAE stage is not redone
    assert [s for s, _ in ckpt["losses"]] == [1, 2, 3, 4, 5]
    assert torch.load(os.path.join(out, "ckpts", "decoder.ckpt"), weights_only=True)["step"] == 2

    # --export-only rebuilds the final (EMA) model from the checkpoint alone.
    assert train_zero123(["--out", out, "--export-only", "--model-out", str(tmp_path / "exported")]) == 0
    final = Zero123Model.from_pretrained(os.path.join(out, "model"))
    exported = Zero123Model.from_pretrained(str(tmp_path / "exported"))
    x, pose = torch.randn(2, 4, 4, 4), torch.randn(2, 4)
    images = torch.rand(2, 3, 32, 32)
    a = final.predict_noise(x, torch.tensor(300), final.encode_condition(images), pose, 2.0)
    b = exported.predict_noise(x, torch.tensor(300), exported.encode_condition(images), pose, 2.0)
    torch.testing.assert_close(a, b)


def test_conditioning_matches_independent_computation():
    from lift3d.training.arch import build_model
    from lift3d.training.train_zero123 import conditioning, pair_poses

    model = build_model("tiny")
    d = model.projection.out_features
    # Zero123's init: identity on the CLIP columns, zero on the pose columns and the bias.
    assert torch.equal(model.projection.weight[:, :d], torch.eye(d)) and not model.projection.weight[:, d:].any()
    with torch.no_grad():
        model.projection.weight.normal_()
        model.projection.bias.normal_()

    # Poses from camera positions, against spherical coordinates by hand.
    el = torch.tensor([[10.0, 40.0], [-5.0, 60.0]])
    az = torch.tensor([[30.0, 300.0], [0.0, 90.0]])
    r = torch.tensor([[1.5, 2.0], [2.2, 1.8]])
    e, a = torch.deg2rad(el), torch.deg2rad(az)
    positions = torch.stack([r * e.cos() * a.cos(), r * e.cos() * a.sin(), r * e.sin()], -1)
    pose = pair_poses(positions, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1, 1]))
    polar = math.pi / 2 - e
    expected = torch.stack([polar[:, 1] - polar[:, 0], torch.sin(a[:, 1] - a[:, 0]), torch.cos(a[:, 1] - a[:, 0]),
                            r[:, 1] - r[:, 0]], -1)
    torch.testing.assert_close(pose, expected, atol=1e-5, rtol=0)

    images, latent = torch.rand(4, 3, 32, 32), torch.randn(4, 4, 4, 4)
    pose = torch.randn(4, 4)
    r = torch.tensor([0.02, 0.07, 0.12, 0.5])   # embedding only / both / latent only / nothing
    with torch.no_grad():
        context, concat = conditioning(model, images, latent, pose, r)
        clip_in = model.clip_preprocess(images * 2 - 1)
        emb = model.image_encoder(pixel_values=clip_in).image_embeds
    W, b = model.projection.weight, model.projection.bias
    for i, (drop_emb, drop_lat) in enumerate([(True, False), (True, True), (False, True), (False, False)]):
        e_i = torch.zeros(d) if drop_emb else emb[i]
        torch.testing.assert_close(context[i, 0], W @ torch.cat([e_i, pose[i]]) + b, atol=1e-5, rtol=1e-5)
        assert torch.equal(concat[i], torch.zeros_like(latent[i]) if drop_lat else latent[i])


def test_psnr_and_ssim_hand_checked():
    a = torch.full((1, 3, 16, 16), 0.5)
    b = torch.full((1, 3, 16, 16), 0.25)
    assert psnr(a, b).item() == pytest.approx(-10 * math.log10(0.0625))
    # Flat images: variances and covariance are 0, so SSIM = (2 μa μb + C1) / (μa² + μb² + C1).
    c1 = 0.01 ** 2
    # (pytorch-msssim normalises its window in float32: the flat image's variance is ~1e-8, not 0)
    assert ssim(a, b).item() == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1), rel=1e-5)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert (ssim(x, x.flip(-1)) < 0.5).all()
    # Against scipy's Gaussian filter (the same 11-tap window, σ 1.5), valid region only.
    from scipy.ndimage import gaussian_filter

    u, v = x[0, 0].double().numpy(), x[1, 0].double().numpy()
    f = lambda z: gaussian_filter(z, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]  # noqa: E731
    mu_u, mu_v = f(u), f(v)
    s = ((2 * mu_u * mu_v + c1) * (2 * (f(u * v) - mu_u * mu_v) + 0.03 ** 2)) / (
        (mu_u ** 2 + mu_v ** 2 + c1) * (f(u * u) - mu_u ** 2 + f(v * v) - mu_v ** 2 + 0.03 ** 2))
    assert ssim(x[0:1, 0:1], x[1:2, 0:1]).item() == pytest.approx(s.mean(), abs=1e-6)


def test_ema_is_the_warm_up_average_and_resumes():
    """diffusers' EMAModel as the loop uses it: update n copies the weights at n = 1, then averages with
    decay min(decay, n / (9 + n)); restoring the shadow and update count continues identically."""
    from lift3d.training.loop import EMA

    values = torch.randn(30, generator=torch.Generator().manual_seed(0)).tolist()
    p = torch.nn.Parameter(torch.zeros(()))
    ema = EMA({"p": p}, decay=0.8)
    expected = 0.0
    for n, value in enumerate(values, start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
        d = 0.0 if n == 1 else min(0.8, n / (9 + n))
        expected = d * expected + (1 - d) * value
        assert ema.shadow["p"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        if n == 15:  # resume from a saved state
            saved = {k: v.clone() for k, v in ema.shadow.items()}
            ema = EMA({"p": p}, decay=0.8)
            ema.load(saved, n)
    ema.swap()
    assert p.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
