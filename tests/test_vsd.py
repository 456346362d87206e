"""Issue 24, VSD: one step's gradient and the LoRA's loss against a hand computation on a tiny random
Zero123 (the LoRA merged into a fresh copy of the weights, the frozen prior a second fresh copy); the LoRA
is trained, checkpointed with its Adam state and resumed bit for bit after a kill; the configs parse and
fall back to the mini recipes without published weights."""

import logging
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lift3d.cameras import Cameras
from lift3d.config import PACKAGE_DIR, load_config
from lift3d.errors import ConfigError, UserError
from lift3d.guidance.base import GuidanceContext
from lift3d.guidance.distillation import ScoreDistillation
from lift3d.guidance.vsd import VSD
from lift3d.plugin import MemoryPlan
from lift3d.zero123.model import Zero123Model

from zero123_fixtures import REF, model_dir, reference  # noqa: F401 (model_dir: a fixture)

MINI = os.path.join(PACKAGE_DIR, "assets", "zero123-mini")
VIEWS = Cameras.from_spherical([50.0, -10.0], [120.0, -60.0], [2.2, 1.8], 40.0, 8, 8)


def vsd_guidance(model_dir, method=None, **prior):
    g = ScoreDistillation({"method_type": "vsd", "method": method or {}, "prior_type": "zero123",
                           "prior": {"pretrained_model_name_or_path": model_dir, **prior}}, path="system.guidance")
    g.prepare(reference(), GuidanceContext(device=torch.device("cpu")))
    return g


def perturb_lora(g, seed=3, scale=0.05):
    """Non-zero LoRA weights (B starts at zero), so that the LoRA model differs from the prior."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.trainable_state().parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def merged_model(g, model_dir):
    """A fresh copy of the prior's weights with the LoRA folded in: W + (alpha / r) B A on every adapted layer."""
    model = Zero123Model.from_pretrained(model_dir)
    scale = g.method.cfg.lora_rank / g.method.cfg.lora_rank       # lora_alpha = rank
    weights = dict(model.unet.named_parameters())
    lora = {n.replace("-", "."): p for n, p in g.trainable_state().weights.items()}
    merged = 0
    with torch.no_grad():
        for name, a in lora.items():
            if ".lora_A." not in name:
                continue
            layer = name.split(".lora_A.")[0]
            b = lora[name.replace(".lora_A.", ".lora_B.")]
            weights[f"{layer}.weight"].add_(scale * b @ a)
            merged += 1
    assert merged == len(lora) // 2 > 0
    return model


def hand_noise(model, noisy, t, condition, pose, scale=None):
    """ε of a plain Zero123 model from its UNet: CFG [zero token, zero concat | token, concat latent] when
    ``scale`` is given, else the conditional branch alone."""
    token = torch.cat([condition.embedding[:, 0].expand(len(pose), -1), pose], 1) @ model.projection.weight.T \
        + model.projection.bias
    concat = condition.latent.expand(len(noisy), -1, -1, -1)
    with torch.no_grad():
        e_c = model.unet(torch.cat([noisy, concat], 1), t, encoder_hidden_states=token[:, None]).sample
        if scale is None:
            return e_c
        e_u = model.unet(torch.cat([noisy, torch.zeros_like(concat)], 1), t,
                         encoder_hidden_states=torch.zeros_like(token[:, None])).sample
    return e_u + scale * (e_c - e_u)


# ----------------------------------------------------------------------------- the gradient


@pytest.mark.parametrize("pose_variant", ["zero123", "stable"])
def test_one_vsd_step_equals_the_hand_computation(model_dir, pose_variant):
    g = vsd_guidance(model_dir, {"guidance_scale": 4.0}, pose_variant=pose_variant)
    perturb_lora(g)
    z = torch.randn(2, 8, 8, 4, generator=torch.Generator().manual_seed(5)).requires_grad_()   # a latent render
    torch.manual_seed(11)
    out = g({"comp_rgb": z}, VIEWS, step=0)
    out["loss_guidance"].backward()

    torch.manual_seed(11)                     # the same draws: t per view in [t_min, t_max], then ε
    t_min, t_max = g.method.step_range(g.prior, 0)
    t = torch.randint(t_min, t_max + 1, (2,))
    noise = torch.randn(2, 4, 8, 8)
    latents = z.detach().permute(0, 3, 1, 2)
    prior, lora = Zero123Model.from_pretrained(model_dir), merged_model(g, model_dir)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    condition = prior.encode_condition(g.prior.reference_image(reference()))
    pose = g.prior.poses(VIEWS)
    if pose_variant == "stable":              # Stable-Zero123: the condition's polar angle in the last slot
        assert torch.allclose(pose[:, 3], torch.full((2,), math.radians(90 - REF["elevation"])), atol=1e-6)
    eps_prior = hand_noise(prior, noisy, t, condition, pose, scale=4.0)
    eps_lora = hand_noise(lora, noisy, t, condition, pose)
    expected = (1 - a) * (eps_prior - eps_lora) / 2          # w(t) (ε_prior − ε_lora), over B views
    assert (eps_prior - eps_lora).abs().mean() > 1e-3         # the LoRA model is not the prior here
    assert torch.allclose(z.grad.permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-4)
    assert float(out["guidance_t"]) == float(t.float().mean())


def test_with_the_adapter_off_the_prior_is_exactly_the_prior(model_dir):
    g = vsd_guidance(model_dir)
    perturb_lora(g)
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([900, 15])
    fresh = Zero123Model.from_pretrained(model_dir)
    with torch.no_grad():
        ours = g.prior.predict_noise(noisy, t, VIEWS, 3.0)
        theirs = fresh.predict_noise(noisy, t, g.prior.condition, g.prior.poses(VIEWS), 3.0)
        with g.method.lora():
            changed = g.prior.predict_noise(noisy, t, VIEWS, 3.0)
    assert torch.equal(ours, theirs)                          # bit for bit: no LoRA term at all
    assert not torch.allclose(changed, ours, atol=1e-4)
    assert all(p.requires_grad for p in g.trainable_state().parameters())   # off, still trainable


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_lora_loss_is_the_diffusion_loss_on_the_detached_renders(model_dir, prediction):
    g = vsd_guidance(model_dir, {"lora_camera_dropout": 0.5, "lora_timesteps": 2, "lora_prediction": prediction})
    perturb_lora(g)
    z = torch.randn(2, 8, 8, 4, generator=torch.Generator().manual_seed(5)).requires_grad_()
    g({"comp_rgb": z}, VIEWS, step=0)
    torch.manual_seed(1)
    loss = g.losses(None)["lora"]
    assert g.losses(None) == {}                               # once per guidance call
    loss.backward()
    assert z.grad is None                                     # the field gets nothing from it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g.trainable_state().parameters())

    torch.manual_seed(1)                      # fresh t over all T, ε, then each view's camera dropout
    latents = z.detach().permute(0, 3, 1, 2).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (4,))
    noise = torch.randn(4, 4, 8, 8)
    drop = torch.rand(4) < 0.5
    assert drop.any() and not drop.all()                     # both kinds of view in this draw
    lora = merged_model(g, model_dir)
    a = lora.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pose = g.prior.poses(Cameras.cat([VIEWS, VIEWS])).masked_fill(drop[:, None], 0.0)
    condition = lora.encode_condition(g.prior.reference_image(reference()))
    pred = hand_noise(lora, noisy, t, condition, pose)
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(loss.detach(), F.mse_loss(pred, target), rtol=1e-5, atol=1e-7)


def test_lora_guidance_scale_and_v_prediction_in_the_gradient(model_dir, monkeypatch):
    """ε_lora = ε(no camera) + s (ε(camera) − ε(no camera)); a v-prediction LoRA's output turned into ε."""
    g = vsd_guidance(model_dir, {"lora_guidance_scale": 2.5, "lora_prediction": "v_prediction"})
    calls = []

    def fake(noisy, t, cameras, drop_pose=None):
        calls.append(drop_pose)
        return torch.full_like(noisy, 1.0 if drop_pose is None else 0.2)

    monkeypatch.setattr(g.prior, "conditional_noise", fake)
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    a = g.prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = 0.2 + 2.5 * (1.0 - 0.2)
    assert torch.allclose(g.method.lora_noise(g.prior, noisy, t, VIEWS), (1 - a).sqrt() * noisy + a.sqrt() * v)
    assert calls[0] is None and calls[1].all()


# ----------------------------------------------------------------------------- training through the runner

VSD_TINY = """
name: vsd
tag: t
use_timestamp: false
trainer: {max_steps: 6, val_every: 0, ckpt_every: 0, log_every: 1, device: cpu}
data: {reference_height: 32, reference_width: 32, height: 16, width: 16, foreground_ratio: null, batch_size: 2,
       n_val_views: 1, n_test_views: 1, eval_height: 16, eval_width: 16}
system:
  geometry_type: voxel-rf
  geometry: {grid_size: 16, radius: 0.6}
  renderer: {num_samples_per_ray: 16, use_occupancy_grid: false}
  guidance_type: score-distillation
  guidance:
    method_type: vsd
    method: {lora_lr: 0.01}
    prior_type: zero123
    prior: {pretrained_model_name_or_path: MODEL}
  loss: {lambda_guidance: 1.0, lambda_rgb: 1.0, lambda_mask: 1.0}
  optimizer: {name: adam, lr: 0.1}
  export: {resolution: 16, texture_size: 32, relative_threshold: 1.0}
"""
KILL_IN_STEP_3 = """
import os, signal
from lift3d.systems.image_to_3d import ImageTo3D
from lift3d.runner import Experiment
Experiment.export = Experiment.test = lambda self: None
_step = ImageTo3D.training_step
def _killed(self, views, step):
    if step == 3 and os.environ.get("KILL_AT_3"):
        os.kill(os.getpid(), signal.SIGTERM)
    return _step(self, views, step)
ImageTo3D.training_step = _killed
"""


def _equal(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_lora_trains_is_checkpointed_and_resumes_bit_exact_after_a_kill(tmp_path, model_dir, disc_image,
                                                                        monkeypatch):
    from faultcases import run_cli

    (tmp_path / "vsd.yaml").write_text(VSD_TINY.replace("MODEL", model_dir))
    args = ["launch", "--config", str(tmp_path / "vsd.yaml"), f"image={disc_image}"]
    whole = run_cli(args + [f"exp_root_dir={tmp_path / 'whole'}"], cwd=str(tmp_path), prelude=KILL_IN_STEP_3)
    assert whole.returncode == 0, whole.stderr
    monkeypatch.setenv("KILL_AT_3", "1")
    killed = run_cli(args + [f"exp_root_dir={tmp_path / 'killed'}"], cwd=str(tmp_path), prelude=KILL_IN_STEP_3)
    assert killed.returncode == 128 + signal.SIGTERM and "Traceback" not in killed.stderr, killed.stderr
    trial = tmp_path / "killed" / "vsd" / "t"
    load = lambda t: torch.load(t / "ckpts" / "last.ckpt", map_location="cpu", weights_only=True)  # noqa: E731
    at_kill = load(trial)
    assert at_kill["step"] == 4                               # the step under way finished, then stopped
    monkeypatch.delenv("KILL_AT_3")
    resumed = run_cli(args + [f"exp_root_dir={tmp_path / 'killed'}", f"resume={trial / 'ckpts' / 'last.ckpt'}"],
                      cwd=str(tmp_path), prelude=KILL_IN_STEP_3)
    assert resumed.returncode == 0, resumed.stderr

    got, want = load(trial), load(tmp_path / "whole" / "vsd" / "t")
    lora = {k: v for k, v in want["system"].items() if k.startswith("guidance_state.weights.")}
    assert len(lora) == 176 and all(".lora_" in k.replace("-", ".") for k in lora)
    # Trained: B starts at zero and A at its seeded draw; after 6 steps both moved, and kept moving after the kill.
    b = [k for k in lora if "lora_B" in k]
    assert all(lora[k].abs().max() > 0 for k in b)
    assert any(not torch.equal(lora[k], at_kill["system"][k]) for k in b)
    # Its Adam state is in the optimiser's checkpoint: a group at lora_lr holding one state per LoRA tensor.
    group = [g for g in want["optimizer"]["param_groups"] if g["lr"] == 0.01]
    assert len(group) == 1 and len(group[0]["params"]) == len(lora)
    assert all("exp_avg_sq" in want["optimizer"]["state"][i] for i in group[0]["params"])
    # Killed in step 3 and resumed: weights, LoRA, Adam state, random states and loss log as if never stopped.
    for key in ("step", "system", "optimizer", "torch_rng", "view_rng"):
        _equal(got[key], want[key], key)
    logged = (tmp_path / "whole" / "vsd" / "t" / "save" / "losses.csv").read_text()
    assert "loss_lora" in logged.splitlines()[0]
    assert (trial / "save" / "losses.csv").read_text() == logged


# ----------------------------------------------------------------------------- errors, memory, configs


def test_bad_settings_and_priors_fail_in_one_line(model_dir):
    with pytest.raises(ConfigError, match="lora_prediction"):
        VSD({"lora_prediction": "x0"})
    with pytest.raises(ConfigError, match="lora_rank"):
        VSD({"lora_rank": 0})
    with pytest.raises(UserError, match="lora_targets"):
        vsd_guidance(model_dir, {"lora_targets": ["no_such_layer"]})
    g = ScoreDistillation({"method_type": "vsd", "prior_type": "cascade-zero123"}, path="system.guidance")
    with pytest.raises(UserError, match="single-condition prior"):
        g.method.prepare(g.prior, GuidanceContext(device=torch.device("cpu")))


def test_memory_estimate_counts_the_lora_training_pass():
    from lift3d.preflight import UNET_GRAD_GIB_PER_VIEW

    def estimate(**method):
        g = ScoreDistillation({"method_type": "vsd", "method": method, "prior": {"pretrained_model_name_or_path": MINI}},
                              path="system.guidance")
        return g.memory_estimate(MemoryPlan(stages=[[("guidance", 4, 64, 64)], [("guidance", 2, 64, 64)]]))

    parts = estimate()
    gib, setting = parts["lora"]
    assert gib > 0 and setting == "system.guidance.method.lora_views (now all)"
    assert estimate(lora_views=1)["lora"][0] == pytest.approx(gib / 4)
    assert estimate(lora_timesteps=2)["lora"][0] == pytest.approx(2 * gib)
    sds = ScoreDistillation({"prior": {"pretrained_model_name_or_path": MINI}}, path="system.guidance")
    assert "lora" not in sds.memory_estimate(MemoryPlan(stages=[[("guidance", 4, 64, 64)]]))
    assert UNET_GRAD_GIB_PER_VIEW > 0


@pytest.fixture()
def no_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def test_vsd_cpu_config_is_the_main_job_with_vsd():
    cfg = load_config("zero123-vsd-cpu")
    main = load_config("zero123-sjc-cpu")
    assert cfg.system.guidance_type == "score-distillation" and cfg.system.guidance.method_type == "vsd"
    assert cfg.system.guidance.prior.pretrained_model_name_or_path in ("", MINI)
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(main.data)
    assert cfg.system.loss.lambda_lora > 0 and cfg.system.guidance.method.lora_lr > 0


@pytest.mark.parametrize("name,recipe,method", [("zero123-vsd", "zero123-vsd-cpu.yaml", "vsd"),
                                                ("zero123-mv", "zero123-mv-cpu.yaml", None)])
def test_published_configs_fall_back_without_weights_and_use_them_when_found(name, recipe, method, no_models,
                                                                             caplog):
    image = os.path.join(PACKAGE_DIR, "examples", "car_rgba.png")
    caplog.set_level(logging.WARNING)
    cfg = load_config(name, [f"image={image}", "data.default_elevation_deg=10"])
    assert cfg.name == name and cfg.applied.recipe == recipe
    assert cfg.system.guidance.method_type == method and cfg.trainer.device == "cpu"
    assert any(f"running {recipe} instead of {name}" in r.getMessage() and
               "system.guidance.prior.pretrained_model_name_or_path=PATH" in r.getMessage() for r in caplog.records)
    (no_models / "zero123-xl").mkdir(parents=True)
    found = load_config(name, [f"image={image}"])
    assert found.system.guidance.prior.pretrained_model_name_or_path == str(no_models / "zero123-xl")
    assert "recipe" not in (found.get("applied") or {}) and found.system.guidance.method_type == method
    given = load_config(name, [f"image={image}", "system.guidance.prior.pretrained_model_name_or_path=/w/xl"])
    assert given.applied.weights == "given" and given.system.guidance.prior.pretrained_model_name_or_path == "/w/xl"
    assert given.trainer.max_steps == found.trainer.max_steps > 400


def test_multiview_with_vsd_beside_the_generated_views(model_dir, tmp_path):
    """Generate-then-reconstruct with VSD on the random views: the LoRA is the guidance's state and its loss
    joins the views' (``system.loss.lambda_lora``)."""
    from lift3d.guidance.multiview import MultiviewGuidance
    from lift3d.plugin import StepContext

    cfg = {"method_type": "vsd", "prior": {"pretrained_model_name_or_path": model_dir}, "rings": [[0, 2]],
           "sample_steps": 2, "views_per_step": 1}
    assert MultiviewGuidance.declared_losses(cfg) == {"views_rgb": 100.0, "views_mask": 100.0, "lora": 1.0}
    g = MultiviewGuidance(cfg, path="system.guidance")
    g.prepare(reference(), GuidanceContext(device=torch.device("cpu")))
    assert g.trainable_state() is g.method.state and g.param_groups(0.1)[0]["lr"] == 1e-3
    z = torch.randn(2, 8, 8, 4, requires_grad=True)
    g({"comp_rgb": z}, VIEWS, step=0)["loss_guidance"].backward()
    assert z.grad.abs().sum() > 0
    render = lambda cams, bg_color=None: {"comp_rgb": torch.rand(len(cams), cams.height, cams.width, 3),  # noqa: E731
                                          "opacity": torch.rand(len(cams), cams.height, cams.width, 1)}
    terms = g.losses(StepContext(step=1, render=render))
    assert set(terms) == {"views_rgb", "views_mask", "lora"} and terms["lora"].requires_grad


def test_lambda_lora_is_a_loss_weight_with_vsd_only(tmp_path, model_dir, disc_image):
    from lift3d.runner import Experiment

    path = tmp_path / "vsd.yaml"
    path.write_text(VSD_TINY.replace("MODEL", model_dir))
    args = [f"image={disc_image}", f"exp_root_dir={tmp_path / 'out'}", "system.loss.lambda_lora=0.5"]
    assert Experiment(load_config(str(path), args)).system.loss_weights["lora"] == 0.5
    with pytest.raises(ConfigError, match="lambda_lora"):      # SDS trains nothing: no such loss
        Experiment(load_config(str(path), args + ["system.guidance.method_type=sds"]))
