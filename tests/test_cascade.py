"""Cascade-Zero123: pose tokens, the multi-token context and its CFG half, self-prompt caching, and
the ``cascade-zero123`` guidance on tiny random models."""

import os

import pytest
import torch

from lift3d.cameras import Cameras, zero123_pose
from lift3d.config import load_config, parse_config
from lift3d.data.reference import ReferenceView
from lift3d.errors import UserError
from lift3d.guidance.base import GuidanceContext
from lift3d.guidance.presets import CascadeZero123
from lift3d.zero123 import cascade
from lift3d.cameras import zero123_pose_vectors as pose_vectors
from lift3d.zero123.cascade import CascadeLayout, refiner_contexts
from lift3d.zero123.random_model import random_zero123

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    base, refiner = str(root / "base"), str(root / "refiner")
    random_zero123("tiny", seed=1).save_pretrained(base)
    random_zero123("tiny", seed=2).save_pretrained(refiner)
    CascadeLayout(nearby=[[0, 45, 0], [0, -45, 0], [30, 0, 0]], base_model=base).save(refiner)
    return base, refiner


def reference(size=64, seed=0):
    rgba = torch.rand(size, size, 4, generator=torch.Generator().manual_seed(seed))
    return ReferenceView(rgba, Cameras.from_spherical(20.0, 10.0, 2.0, 40.0, size, size))


def make(models, tmp_path, trial="trial", **cfg):
    base, refiner = models
    cfg = {"pretrained_model_name_or_path": base, "refiner_name_or_path": refiner, "prompt_steps": 3,
           "prompt_cache_dir": str(tmp_path / "cache"), **cfg}
    g = CascadeZero123(cfg, path="system.guidance")
    g.prepare(reference(), GuidanceContext(device=torch.device("cpu"), trial_dir=str(tmp_path / trial), seed=0))
    return g


VIEWS = Cameras.from_spherical([50.0, -10.0], [120.0, -60.0], [2.2, 1.8], 40.0, 8, 8)


def test_pose_vectors_agree_with_camera_poses():
    target = Cameras.from_spherical([50.0, -10.0], [120.0, -60.0], [2.2, 1.8], 40.0, 8, 8)
    source = Cameras.from_spherical(20.0, 10.0, 2.0, 40.0, 8, 8)
    assert torch.allclose(target.spherical, torch.tensor([[50.0, 120.0, 2.2], [-10.0, -60.0, 1.8]]), atol=1e-4)

    def polar_azimuth_radius(p):  # independently, from the camera positions
        r = p.norm(dim=-1)
        return torch.acos(p[:, 2] / r), torch.atan2(p[:, 1], p[:, 0]), r

    (tt, pt, rt), (tc, pc, rc) = polar_azimuth_radius(target.position), polar_azimuth_radius(source.position)
    expected = torch.stack([tt - tc, torch.sin(pt - pc), torch.cos(pt - pc), rt - rc], -1)
    assert torch.allclose(pose_vectors(target.spherical, source.spherical), expected, atol=1e-5)
    assert torch.allclose(zero123_pose(target, source), expected, atol=1e-5)
    stable = zero123_pose(target, source, stable=True)
    assert torch.allclose(stable[:, 3], tc.expand(2), atol=1e-5) and torch.allclose(stable[:, :3], expected[:, :3])


def test_context_tokens_and_their_unconditional_half(models):
    refiner = random_zero123("tiny", seed=2)
    d = refiner.projection.in_features - 4
    cond = cascade.CascadeCondition(torch.randn(1, 1, d), torch.randn(1, 4, 8, 8), torch.tensor([20.0, 10.0, 2.0]),
                                    torch.randn(3, d), torch.tensor([[20.0, 55.0, 2.0], [20.0, -35.0, 2.0], [50.0, 10.0, 2.0]]))
    targets = torch.tensor([[50.0, 120.0, 2.2], [-10.0, -60.0, 1.8]])
    coarse = torch.randn(2, d)
    ctx, uncond = refiner_contexts(refiner, cond, targets, coarse)
    assert ctx.shape == (2, 5, refiner.projection.out_features)
    proj = refiner.projection
    # token 0: the input with its pose to the target; token 1: the coarse estimate with a zero pose;
    # tokens 2..: each self-prompt with its own pose to the target
    assert torch.allclose(ctx[1, 0], proj(torch.cat([cond.embedding[0, 0], pose_vectors(targets[1], cond.view)])), atol=1e-5)
    assert torch.allclose(ctx[0, 1], proj(torch.cat([coarse[0], torch.zeros(4)])), atol=1e-5)
    assert torch.allclose(ctx[0, 4], proj(torch.cat([cond.prompt_embeddings[2], pose_vectors(targets[0], cond.prompt_views[2])])), atol=1e-5)
    # CFG: input and coarse embeddings zeroed before the projection (poses kept), prompts unchanged
    assert torch.allclose(uncond[1, 0], proj(torch.cat([torch.zeros(d), pose_vectors(targets[1], cond.view)])), atol=1e-5)
    assert torch.allclose(uncond[0, 1], proj(torch.zeros(d + 4)), atol=1e-5)
    assert torch.allclose(uncond[:, 2:], ctx[:, 2:])
    no_coarse, _ = refiner_contexts(refiner, cond, targets, None)
    assert torch.allclose(no_coarse[:, 1], uncond[:, 1])


def test_refiner_noise_concatenates_only_the_input_latent(models, monkeypatch):
    refiner = random_zero123("tiny", seed=2)
    d = refiner.projection.in_features - 4
    cond = cascade.CascadeCondition(torch.randn(1, 1, d), torch.randn(1, 4, 8, 8), torch.tensor([20.0, 10.0, 2.0]),
                                    torch.randn(2, d), torch.tensor([[20.0, 55.0, 2.0], [20.0, -35.0, 2.0]]))
    seen = {}
    real = refiner.unet.forward

    def spy(x, t, encoder_hidden_states):
        seen.update(x=x, ctx=encoder_hidden_states)
        return real(x, t, encoder_hidden_states=encoder_hidden_states)

    monkeypatch.setattr(refiner.unet, "forward", spy)
    noisy = torch.randn(2, 4, 8, 8)
    eps = cascade.refiner_noise(refiner, noisy, torch.tensor(500), cond, torch.tensor([[50.0, 120.0, 2.2]] * 2), 3.0)
    assert eps.shape == noisy.shape and torch.isfinite(eps).all()
    assert seen["x"].shape == (4, 8, 8, 8) and seen["ctx"].shape == (4, 4, refiner.projection.out_features)
    assert torch.equal(seen["x"][2:, 4:], cond.latent.expand(2, -1, -1, -1))   # cond half: the input latent
    assert torch.equal(seen["x"][:2, 4:], torch.zeros(2, 4, 8, 8))           # uncond half: zero latent


def test_layout_defaults_to_the_paper_and_round_trips(tmp_path):
    assert CascadeLayout.load(str(tmp_path)).nearby == [[0.0, 45.0, 0.0], [0.0, -45.0, 0.0], [30.0, 0.0, 0.0]]
    CascadeLayout(nearby=[[0, 90, 0]], base_model="b").save(str(tmp_path))
    assert CascadeLayout.load(str(tmp_path)).nearby == [[0, 90, 0]]


def test_self_prompts_are_saved_and_cached(models, tmp_path, monkeypatch):
    calls = []
    real = cascade.generate_prompts
    monkeypatch.setattr(cascade, "generate_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = make(models, tmp_path)
    assert len(calls) == 1
    folder = tmp_path / "trial" / "save" / "self_prompts"
    assert sorted(os.listdir(folder)) == ["prompt_00.png", "prompt_01.png", "prompt_02.png", "prompts.json", "prompts.png"]
    assert g.prior.prompt_images.shape == (3, 3, 64, 64)
    assert torch.allclose(g.prior.prompt_views, torch.tensor([[20.0, 55.0, 2.0], [20.0, -35.0, 2.0], [50.0, 10.0, 2.0]]), atol=1e-3)
    # a resume (same trial) and a re-run (new trial, shared cache) reuse them, bit for bit
    again = make(models, tmp_path)
    rerun = make(models, tmp_path, trial="other")
    assert len(calls) == 1
    assert torch.equal(again.prior.prompt_images, g.prior.prompt_images) and torch.equal(rerun.prior.prompt_images, g.prior.prompt_images)
    assert (tmp_path / "other" / "save" / "self_prompts" / "prompts.json").is_file()
    # another seed or other offsets are another key
    make(models, tmp_path, trial="third", nearby_views=[[0, 90, 0]])
    assert len(calls) == 2
    assert len(g.validation_images()) == 3 and g.validation_images()[0].shape == (64, 64, 3)


@pytest.mark.parametrize("method,coarse", [("sjc", "none"), ("sds", "render"), ("sjc", "estimate")])
def test_guidance_gives_gradients(models, tmp_path, method, coarse):
    g = make(models, tmp_path, method=method, coarse_token=coarse, guidance_scale=3.0)
    assert (g.prior.base is not None) == (coarse == "estimate")
    render = {"comp_rgb": torch.rand(2, 16, 16, 3, requires_grad=True)}
    out = g(render, VIEWS, step=0)
    out["loss_guidance"].backward()
    assert torch.isfinite(render["comp_rgb"].grad).all() and render["comp_rgb"].grad.abs().sum() > 0


def test_refiner_unet_chunks_give_the_one_pass_noise(models, tmp_path):
    """The refiner's noise (with the render as coarse token) is the same in chunks of one view."""
    one, chunked = (make(models, tmp_path, unet_chunk=n, coarse_token="render").prior for n in (0, 1))
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    render = {"comp_rgb": torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        a, b = (p.predict_noise(noisy, torch.tensor([100, 700]), VIEWS, 3.0, render) for p in (one, chunked))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_swapping_from_zero123_sjc_is_one_line():
    cfg = load_config(os.path.join(CONFIGS, "zero123-sjc.yaml"), ["system.guidance_type=cascade-zero123",
                                                                  "system.guidance.pretrained_model_name_or_path=/w/b"])
    parsed = parse_config(CascadeZero123.Config, cfg.system.guidance, "system.guidance")
    assert parsed.method == "sjc" and parsed.guidance_scale == 100.0


def test_bad_settings_are_one_line_errors(models, tmp_path):
    with pytest.raises(UserError, match="coarse_token"):
        CascadeZero123({"coarse_token": "maybe"})
    with pytest.raises(UserError, match="refiner_name_or_path"):
        make((models[0], ""), tmp_path)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_data64(tmp_path_factory):
    from lift3d.training.data import generate_dataset

    root = str(tmp_path_factory.mktemp("mv64") / "data")
    generate_dataset(root, n_procedural=2, n_urdf=0, n_views=3, size=64, examples_dir=None,
                     n_heldout_procedural=1, n_heldout_urdf=0, pybullet_meshes=False, log=lambda *_: None)
    return root


def _unet_params(path):
    from lift3d.zero123 import Zero123Model

    return {k: v.clone() for k, v in Zero123Model.from_pretrained(path).unet.state_dict().items()}


def test_train_cascade_prompts_resume_and_self_distillation(models, tiny_data64, tmp_path):
    from lift3d.training.train_cascade import train_cascade

    base, _ = models
    out = str(tmp_path / "run")
    common = ["--base", base, "--data", tiny_data64, "--out", out, "--sources", "1", "--prompt-steps", "2",
              "--batch-size", "4", "--ckpt-every", "1", "--threads", "1", "--coarse-prob", "0.5",
              "--model-out", str(tmp_path / "refiner"), "--base-out", str(tmp_path / "distilled")]
    assert train_cascade(common + ["--steps", "2", "--momentum", "0", "--ema-decay", "0"]) == 0
    prompts = torch.load(os.path.join(out, "prompts.pt"), weights_only=True)
    assert prompts["done"] == 2 and prompts["images"].shape == (2, 1, 3, 3, 64, 64)
    coarse = torch.load(os.path.join(out, "coarse.pt"), weights_only=True)  # the base's view of each of the 3 views
    assert coarse["done"] == 2 and coarse["images"].shape == (2, 1, 3, 3, 64, 64)
    assert not torch.equal(coarse["images"][:, :, 1], coarse["images"][:, :, 2])
    assert CascadeLayout.load(str(tmp_path / "refiner")).nearby == [[0.0, 45.0, 0.0], [0.0, -45.0, 0.0], [30.0, 0.0, 0.0]]
    # momentum 0: the base becomes the refiner (EMA decay 0 saves the live refiner weights)
    refiner = _unet_params(str(tmp_path / "refiner"))
    distilled = _unet_params(str(tmp_path / "distilled"))
    original = _unet_params(base)
    assert all(torch.equal(refiner[k], distilled[k]) for k in refiner)
    assert any(not torch.equal(refiner[k], original[k]) for k in refiner)
    ckpt = torch.load(os.path.join(out, "ckpts", "last.ckpt"), weights_only=True)
    assert ckpt["step"] == 2

    # resume: the prompts are not regenerated, the step count continues; momentum 1 freezes the base
    mtimes = [os.path.getmtime(os.path.join(out, f)) for f in ("prompts.pt", "coarse.pt")]
    assert train_cascade(common + ["--steps", "3", "--resume", "--momentum", "1"]) == 0
    assert [os.path.getmtime(os.path.join(out, f)) for f in ("prompts.pt", "coarse.pt")] == mtimes
    ckpt = torch.load(os.path.join(out, "ckpts", "last.ckpt"), weights_only=True)
    assert ckpt["step"] == 3 and [s for s, _ in ckpt["losses"]] == [1, 2, 3]
    again = _unet_params(str(tmp_path / "distilled"))
    assert all(torch.equal(again[k], distilled[k]) for k in again)


def test_train_cascade_bad_offsets():
    from lift3d.training.train_cascade import parse_args

    with pytest.raises(UserError, match="--nearby"):
        parse_args(["--data", "d", "--out", "o", "--nearby", "0,45"])


def test_nvs_with_a_refiner_writes_prompts_base_and_refined_views(models, tmp_path):
    import numpy as np
    from PIL import Image

    from lift3d.zero123.nvs import nvs

    base, refiner = models
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[20:60, 25:55] = [200, 40, 30, 255]
    Image.fromarray(rgba).save(tmp_path / "in.png")
    paths = nvs(base, str(tmp_path / "in.png"), 10.0, 90.0, out_dir=str(tmp_path / "out"), steps=2, n_samples=2,
                device="cpu", refiner=refiner)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["base_view_00.png", "base_view_01.png", "grid.png", "nvs.json", "prompt_00.png", "prompt_01.png",
                     "prompt_02.png", "view_00.png", "view_01.png"]
    assert Image.open(tmp_path / "out" / "grid.png").size == (64 * 8, 64)
    with pytest.raises(UserError, match="zero123 pose"):
        nvs(base, str(tmp_path / "in.png"), 0.0, 90.0, out_dir=str(tmp_path / "o2"), steps=1, device="cpu",
            refiner=refiner, pose_variant="stable")


def test_hull_consistency_scores_agreeing_views_high_and_contradicting_views_low():
    from lift3d.mesh import MeshRaycaster
    import trimesh
    from lift3d.training.nvs_eval import hull_consistency, silhouettes

    box = trimesh.creation.box(extents=(0.6, 0.3, 0.4))
    cams = Cameras.from_spherical([30.0] * 8, [45.0 * k for k in range(8)], 1.8, 49.13, 64, 64)
    rgba = MeshRaycaster(box).render(cams)["rgba"]
    images = (rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:]).permute(0, 3, 1, 2)
    masks = silhouettes(images)
    good = hull_consistency(masks, cams)
    assert good.shape == (7,) and good.min() > 0.75      # view 0 (the input) is not scored
    wrong = masks.clone()
    wrong[2] = torch.roll(wrong[2], 8, dims=1)            # one view's object drawn in the wrong place
    bad = hull_consistency(wrong, cams)
    assert bad[1] < good[1] - 0.3 and bad.mean() < good.mean() - 0.05


def test_a_cascade_run_writes_self_prompts_and_a_resume_reuses_them(models, tmp_path, monkeypatch):
    import imageio.v3 as iio
    import numpy as np

    from lift3d.runner import Experiment

    base, refiner = models
    yy, xx = np.mgrid[:64, :64]
    img = np.zeros((64, 64, 4), np.uint8)
    img[(xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 18 ** 2] = [220, 40, 30, 255]
    iio.imwrite(tmp_path / "disc.png", img)
    overrides = [f"image={tmp_path / 'disc.png'}", f"exp_root_dir={tmp_path / 'out'}", "use_timestamp=false",
                 "trainer.max_steps=2", "trainer.val_every=2", "trainer.ckpt_every=1", "trainer.device=cpu",
                 "data.reference_height=32", "data.reference_width=32", "data.height=16", "data.width=16",
                 "data.n_val_views=1", "data.n_test_views=2", "data.eval_height=16", "data.eval_width=16",
                 "data.batch_size=1", "system.geometry.grid_size=16", "system.renderer.num_samples_per_ray=16",
                 f"system.guidance.pretrained_model_name_or_path={base}",
                 f"system.guidance.refiner_name_or_path={refiner}", "system.guidance.prompt_steps=2",
                 f"system.guidance.prompt_cache_dir={tmp_path / 'cache'}"]
    config = os.path.join(CONFIGS, "cascade-zero123.yaml")
    calls = []
    real = cascade.generate_prompts
    monkeypatch.setattr(cascade, "generate_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    exp = Experiment(load_config(config, overrides))
    exp.train()
    trial = exp.trial_dir
    assert os.path.isfile(os.path.join(trial, "save", "self_prompts", "prompts.json"))
    val = imageio_read(os.path.join(trial, "save", "it2-val.png"))
    assert val.shape[1] == 32 * (2 + 1 + 3)     # input, reference render, 1 view, then the 3 self-prompts
    resumed = Experiment(load_config(config, overrides + [f"resume={os.path.join(trial, 'ckpts', 'last.ckpt')}",
                                                          "trainer.max_steps=3"]))
    resumed.train()
    assert resumed.step == 3 and len(calls) == 1


def imageio_read(path):
    import imageio.v3 as iio

    return iio.imread(path)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml")))
def test_every_shipped_config_loads_and_validates(name):
    cfg = load_config(os.path.join(CONFIGS, name), [])       # validates the whole tree, plugins included
    assert cfg.system.guidance_type


def test_train_cascade_can_train_the_image_encoder(models, tiny_data64, tmp_path):
    from lift3d.training.train_cascade import train_cascade
    from lift3d.zero123 import Zero123Model

    base, _ = models
    args = ["--base", base, "--data", tiny_data64, "--out", str(tmp_path / "run"), "--sources", "1",
            "--prompt-steps", "2", "--batch-size", "4", "--threads", "1", "--coarse-prob", "1", "--steps", "2",
            "--ema-decay", "0", "--lr", "1e-3", "--model-out", str(tmp_path / "refiner")]
    assert train_cascade(args + ["--train-image-encoder"]) == 0
    trained = Zero123Model.from_pretrained(str(tmp_path / "refiner")).image_encoder.state_dict()
    original = Zero123Model.from_pretrained(base).image_encoder.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained)
    # without the flag the encoder stays (and the online one-step coarse estimate works too)
    assert train_cascade(args + ["--model-out", str(tmp_path / "frozen"), "--coarse-source", "estimate"]) == 0
    frozen = Zero123Model.from_pretrained(str(tmp_path / "frozen")).image_encoder.state_dict()
    assert all(torch.equal(frozen[k], original[k]) for k in frozen)
