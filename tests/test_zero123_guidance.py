"""Zero123 conditioning (pose, CFG batch, concat latent, CLIP preprocessing) and the SDS / SJC
guidance plugins, on a tiny random model; each checked against an independent computation."""

import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from lift3d.cameras import Cameras
from lift3d.config import parse_config
from lift3d.data.reference import ReferenceView
from lift3d.errors import UserError
from lift3d.guidance.base import GuidanceContext
from lift3d.guidance.presets import Zero123SDS, Zero123SJC
from lift3d.guidance.sjc import SJC
from lift3d.priors import zero123 as zero123_prior
from lift3d.zero123.random_model import random_zero123

from zero123_fixtures import REF, model_dir, reference  # noqa: F401 (model_dir: a fixture)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def make(cls, model_dir, **cfg):
    guidance = cls({"pretrained_model_name_or_path": model_dir, **cfg}, path="system.guidance")
    guidance.prepare(reference(), GuidanceContext(device=torch.device("cpu")))
    return guidance


@pytest.fixture(scope="module")
def sjc(model_dir):
    return make(Zero123SJC, model_dir)


@pytest.fixture(scope="module")
def sds(model_dir):
    return make(Zero123SDS, model_dir)


VIEWS = Cameras.from_spherical([50.0, -10.0], [120.0, -60.0], [2.2, 1.8], 40.0, 8, 8)


# ----------------------------------------------------------------------------- conditioning


def test_pose_vector(sjc, model_dir):
    # polar = 90° − elevation; Δazimuth in degrees; Δradius.
    expected = torch.tensor([[math.radians((90 - e) - (90 - REF["elevation"])), math.sin(math.radians(a)),
                              math.cos(math.radians(a)), d - REF["distance"]]
                             for e, a, d in ((50, 120, 2.2), (-10, -60, 1.8))])
    assert torch.allclose(sjc.prior.poses(VIEWS), expected, atol=1e-5)
    stable = make(Zero123SJC, model_dir, pose_variant="stable")
    expected[:, 3] = math.radians(90 - REF["elevation"])
    assert torch.allclose(stable.prior.poses(VIEWS), expected, atol=1e-5)


def test_condition_latent_is_unscaled_mode(sjc):
    model, image = sjc.prior.model, reference().rgb.permute(2, 0, 1)[None]
    with torch.no_grad():
        moments = model.vae.quant_conv(model.vae.encoder(image * 2 - 1))
    assert torch.allclose(sjc.prior.condition.latent, moments[:, :4], atol=1e-5)  # the mean, not ×0.18215


def test_clip_preprocessing(sjc):
    model = sjc.prior.model
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    out = model.clip_preprocess(x)
    size = model.image_encoder.config.image_size
    assert out.shape == (1, 3, size, size)
    # align_corners=True keeps the corner pixels; then CLIP's mean/std.
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    for (i, j), (k, m) in (((0, 0), (0, 0)), ((-1, -1), (-1, -1)), ((0, -1), (0, -1))):
        assert torch.allclose(out[0, :, i, j], ((x[0, :, k, m] + 1) / 2 - mean) / std, atol=1e-5)
    embedding = model.image_encoder(pixel_values=out).image_embeds
    cond = model.encode_condition((x + 1) / 2)
    assert torch.allclose(cond.embedding[:, 0], embedding, atol=1e-5)


def test_cfg_batch_and_guided_noise(sjc):
    model, cond = sjc.prior.model, sjc.prior.condition
    noisy, pose = torch.randn(2, 4, 8, 8), sjc.prior.poses(VIEWS)
    unet_in, ctx = model.cfg_batch(noisy, cond, pose)
    # [uncond, cond]: zero token after the projection and zero concat latent, then the conditioned pair.
    W, b = model.projection.weight, model.projection.bias
    tokens = torch.cat([cond.embedding[0, 0].expand(2, -1), pose], 1) @ W.T + b
    assert torch.equal(ctx[:2], torch.zeros_like(ctx[:2]))
    assert torch.allclose(ctx[2:, 0], tokens, atol=1e-5)
    assert torch.equal(unet_in[:, :4], torch.cat([noisy, noisy]))
    assert torch.equal(unet_in[:2, 4:], torch.zeros(2, 4, 8, 8))
    assert torch.allclose(unet_in[2:, 4:], cond.latent.expand(2, -1, -1, -1))

    t, scale = torch.tensor([900, 15]), 7.5
    with torch.no_grad():
        eps = model.predict_noise(noisy, t, cond, pose, scale)
        unet = lambda x, c: model.unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
        e_u = unet(torch.cat([noisy, torch.zeros_like(noisy)], 1), torch.zeros(2, 1, 32))
        e_c = unet(torch.cat([noisy, cond.latent.expand(2, -1, -1, -1)], 1), tokens[:, None])
    assert torch.allclose(eps, e_u + scale * (e_c - e_u), atol=1e-4)


# ----------------------------------------------------------------------------- SJC / SDS


class Recorder:
    """Stands in for predict_noise: records its inputs, returns a known ε̂ = 0.3·x + 0.1."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, noisy, t, condition, pose, scale):
        self.calls.append((noisy.clone(), t.clone(), pose.clone(), scale))
        return 0.3 * noisy + 0.1


def latent_render(b=2, size=8, seed=0):
    x = torch.randn(b, size, size, 4, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    return {"comp_rgb": x}


def test_sjc_tick_range_matches_3drec(sjc):
    lo, hi = sjc.method.step_range(sjc.prior, 0)
    assert (lo, hi) == (10, 969)  # us[30:-10]
    sigma = SJC.sigmas(sjc.prior)
    assert abs(sigma[lo] - 0.0983) < 1e-3 and abs(sigma[hi] - 12.23) < 1e-2
    assert abs(sigma[0] - 0.029) < 1e-3 and abs(sigma[999] - 14.61) < 1e-2


def test_sjc_score_is_paas(sjc, monkeypatch):
    rec = Recorder(sjc.prior.model)
    monkeypatch.setattr(sjc.prior.model, "predict_noise", rec)
    noise = torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(torch, "randn_like", lambda y, **k: noise.clone())
    render = latent_render()
    out = sjc(render, VIEWS, step=0)
    out["loss_guidance"].backward()
    y = render["comp_rgb"].detach().permute(0, 3, 1, 2)
    noisy, t, pose, scale = rec.calls[0]
    a = sjc.prior.model.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert scale == 100.0 and ((t >= 10) & (t <= 969)).all()
    assert torch.allclose(pose, sjc.prior.poses(VIEWS))
    # UNet input is the DDPM-noised latent at t; the PAAS score is ε − ε̂; the render gets −score / B.
    assert torch.allclose(noisy, a.sqrt() * y + (1 - a).sqrt() * noise, atol=1e-5)
    score = noise - (0.3 * noisy + 0.1)
    assert torch.allclose(render["comp_rgb"].grad.permute(0, 3, 1, 2), -score / 2, atol=1e-4)


def test_sjc_without_var_red(model_dir, monkeypatch):
    g = make(Zero123SJC, model_dir, var_red=False)
    monkeypatch.setattr(g.prior.model, "predict_noise", Recorder(g.prior.model))
    y = torch.randn(1, 4, 8, 8)
    score, sigma, _ = g.method.score(g.prior, y, VIEWS[:1], {}, 0)
    noisy = g.prior.model.predict_noise.calls[0][0]
    assert torch.allclose(score, -(0.3 * noisy + 0.1), atol=1e-5)  # (D − z_s)/σ = −ε̂


def test_sds_gradient(sds, monkeypatch):
    rec = Recorder(sds.prior.model)
    monkeypatch.setattr(sds.prior.model, "predict_noise", rec)
    render = latent_render()
    sds(render, VIEWS, step=0)["loss_guidance"].backward()
    z = render["comp_rgb"].detach().permute(0, 3, 1, 2)
    noisy, t, _, scale = rec.calls[0]
    a = sds.prior.model.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (noisy - a.sqrt() * z) / (1 - a).sqrt()
    expected = (1 - a) * (0.3 * noisy + 0.1 - noise) / 2
    assert scale == 3.0 and ((t >= 20) & (t <= 980)).all()
    assert torch.allclose(render["comp_rgb"].grad.permute(0, 3, 1, 2), expected, atol=1e-4)


def test_sds_step_schedule_clip_and_nan_guard(model_dir, monkeypatch):
    g = make(Zero123SDS, model_dir, min_step_percent=[0, 0.4, 0.2, 200], max_step_percent=[0, 0.85, 0.5, 200],
             grad_clip=0.01)
    assert g.method.step_range(g.prior, 0) == (400, 850) and g.method.step_range(g.prior, 200) == (200, 500) and g.method.step_range(g.prior, 100) == (300, 675)
    nan_but_first_channel = lambda x, *a: torch.full_like(x, float("nan")).index_fill(1, torch.tensor([0]), 50.0)  # noqa
    monkeypatch.setattr(g.prior.model, "predict_noise", nan_but_first_channel)
    render = latent_render(1)
    g(render, VIEWS[:1], step=0)["loss_guidance"].backward()
    grad = render["comp_rgb"].grad
    assert torch.isfinite(grad).all() and grad.abs().max() <= 0.01 + 1e-7 and grad.abs().max() > 0


@pytest.mark.parametrize("cls", [Zero123SJC, Zero123SDS])
def test_rgb_renders_get_gradients(cls, model_dir):
    g = make(cls, model_dir)
    rgb = torch.rand(2, 32, 32, 3, requires_grad=True)
    out = g({"comp_rgb": rgb}, VIEWS, step=0)
    out["loss_guidance"].backward()
    assert rgb.grad.abs().sum() > 0 and torch.isfinite(rgb.grad).all()
    assert {"guidance_t", "guidance_grad_norm"} <= set(out)


def test_latent_field_decode_and_render_space(model_dir, sjc):
    feats = torch.randn(2, 8, 8, 4, requires_grad=True)
    rgb = sjc.decode_features(feats)
    assert rgb.shape == (2, 64, 64, 3)
    rgb.mean().backward()
    assert feats.grad.abs().sum() > 0
    g = make(Zero123SJC, model_dir, render_space="latent")
    assert g.render_space == "latent"
    with pytest.raises(UserError, match="render_space 'latent' needs 4-channel"):
        g({"comp_rgb": torch.rand(1, 32, 32, 3)}, VIEWS[:1], 0)


# ----------------------------------------------------------------------------- configs


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(zero123_prior, "BUNDLED_MODEL", "/nonexistent/zero123-mini")
    g = Zero123SJC({}, path="system.guidance")
    with pytest.raises(UserError, match="pretrained_model_name_or_path"):
        g.prepare(reference(), GuidanceContext(device=torch.device("cpu")))
    with pytest.raises(UserError, match="pose_variant"):
        Zero123SDS({"pose_variant": "stabel"}, path="system.guidance")


@pytest.mark.parametrize("name", ["zero123-sjc.yaml", "zero123-sds.yaml", "stable-zero123.yaml",
                                  "zero123-sjc-cpu.yaml", "dreamgaussian-zero123.yaml"])
def test_guidance_blocks_swap_between_sjc_and_sds(name):
    from lift3d.config import _load_yaml

    cfg = _load_yaml(os.path.join(CONFIGS, name))
    block = OmegaConf.to_container(cfg.system.guidance)
    assert cfg.system.guidance_type in ("zero123-sjc", "zero123-sds")
    for cls in (Zero123SJC, Zero123SDS):
        parse_config(cls.Config, block, "system.guidance")


@pytest.mark.slow
def test_full_size_model_one_guidance_step():
    """Zero123's real shapes with random weights (~5 GB RAM): one SJC step on a 32x32 latent render
    with backward, and a decode of it to 256^2."""
    g = Zero123SJC({}, path="system.guidance")
    g.prior.model = random_zero123("full")
    g.prior.set_reference(reference(256))
    assert g.prior.condition.embedding.shape == (1, 1, 768) and g.prior.condition.latent.shape == (1, 4, 32, 32)
    render = latent_render(1, 32)
    g(render, VIEWS[:1].with_size(32, 32), step=0)["loss_guidance"].backward()
    assert torch.isfinite(render["comp_rgb"].grad).all() and render["comp_rgb"].grad.abs().sum() > 0
    with torch.no_grad():
        assert g.decode_features(render["comp_rgb"]).shape == (1, 256, 256, 3)


def test_sds_timestep_range_floors_as_threestudio(model_dir):
    """threestudio: min_step = int(T * min_step_percent) at every step of the schedule."""
    from lift3d.config import C

    lo_s, hi_s = [0, 0.4, 0.2, 200], [0, 0.85, 0.5, 200]
    g = Zero123SDS({"min_step_percent": lo_s, "max_step_percent": hi_s}, path="system.guidance")

    class T1000:
        num_train_timesteps = 1000

    for step in range(0, 401):
        assert g.method.step_range(T1000, step) == (int(1000 * C(lo_s, step)), int(1000 * C(hi_s, step))), step


def test_channels_last_render_and_reference_give_the_same_latents(sds):
    rgb = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    channels_last = rgb.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    torch.manual_seed(0)
    a = sds.latents({"comp_rgb": rgb})
    torch.manual_seed(0)
    b = sds.latents({"comp_rgb": channels_last})
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    ref = reference(64)
    view = ReferenceView(ref.rgba.permute(2, 0, 1).contiguous().permute(1, 2, 0), ref.camera)  # (H,W,4) view, strided
    assert torch.equal(sds.prior.reference_image(ref), sds.prior.reference_image(view))
    assert sds.prior.reference_image(view).is_contiguous()


def test_chunked_vae_encoding_gives_the_one_pass_latents_and_gradients(model_dir):
    """encode_chunk 1 (each image's encoder graph recomputed in backward) = the whole batch at once."""
    results = []
    for chunk in (4, 1):
        g = make(Zero123SDS, model_dir, encode_chunk=chunk)
        rgb = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(5)).requires_grad_()
        torch.manual_seed(0)
        out = g({"comp_rgb": rgb}, Cameras.from_spherical([50.0, -10.0, 5.0], [120.0, -60.0, 10.0], 2.0, 40.0, 8, 8), 0)
        out["loss_guidance"].backward()
        results.append((out["loss_guidance"].detach(), rgb.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-5 * float(grad_a.abs().max()))  # round-off of B=1 vs B=3 convs


def test_unet_chunks_give_the_one_pass_noise(model_dir):
    """unet_chunk 2 (two UNet passes for three views) = the whole batch in one pass."""
    views = Cameras.from_spherical([50.0, -10.0, 5.0], [120.0, -60.0, 10.0], 2.0, 40.0, 8, 8)
    noisy = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([50, 400, 900])
    one, chunked = (make(Zero123SDS, model_dir, unet_chunk=n).prior for n in (0, 2))
    calls = []
    real = chunked.model.predict_noise
    chunked.model.predict_noise = lambda x, *a: calls.append(len(x)) or real(x, *a)
    with torch.no_grad():
        a, b = one.predict_noise(noisy, t, views, 3.0), chunked.predict_noise(noisy, t, views, 3.0)
    assert calls == [2, 1]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    assert not torch.allclose(a[0], a[1])  # the views differ: a mix-up of chunks would show
    with pytest.raises(UserError, match="unet_chunk"):
        make(Zero123SDS, model_dir, unet_chunk=-1)
