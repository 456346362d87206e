"""The ``eschernet`` prior (issue 25, item 2): ε at parity with kxhit/EscherNet's reference code for both
CaPE variants, any number of reference and target views, the published folder layout and its one-line
errors, the camera mapping, and SDS / generate-then-reconstruct runs to an exported mesh.

How the recorded outputs (tests/data/eschernet_reference_{4dof,6dof}.safetensors) were made: the tiny
random folder ``write_random_folder(DIR, "tiny", seed=0)`` (lift3d/eschernet/random_model.py: the weights
depend only on the seed and each tensor's name and shape) was run through the reference pipeline of
kxhit/EscherNet at commit 569240f (``4DoF/`` and ``6DoF/``: their pipeline_zero1to3.py, CN_encoder.py,
unet_2d_condition.py and vendored, patched diffusers 0.18.2 with CaPE in XFormersAttnProcessor) in a
separate Python 3.11 venv under /tmp (torch 2.13 CPU, transformers 4.30.2, huggingface_hub 0.16.4,
einops 0.3.0, torchvision 0.28 for its transforms), as eval_eschernet.py sets it up:
``DDIMScheduler.from_pretrained`` / ``CN_encoder.from_pretrained`` / ``Zero1to3StableDiffusionPipeline
.from_pretrained(DIR, image_encoder=None, ...)`` in float32, then ``pipeline(input_imgs=x, prompt_imgs=x,
poses=..., T_in=2, T_out=2, guidance_scale=3, num_inference_steps=2, latents=noisy)`` with
``scheduler.step`` replaced by a recorder of its ``model_output`` (the guided ε at t = 501, the first of
the two DDIM steps). Three stand-ins, none in the maths: ``xformers.ops.memory_efficient_attention`` (CUDA
only) by plain softmax attention, set on the UNet with ``set_attn_processor(XFormersAttnProcessor())``
(``enable_xformers_memory_efficient_attention`` refuses without CUDA); torchvision's tensor Resize given
``antialias=False``, the behaviour of the pinned torchvision 0.15; an empty ``kornia`` module (imported for
an unused CLIP preprocessing). Poses were built by the reference's own code: eval_eschernet.py's
``look_at`` → inverse → third row negated (its MVDream/Text2Img branch) for 6-DoF, and 4DoF/dataset.py's
``get_pose`` of that world-to-camera matrix for 4-DoF. Reference images are R random 64 px images
(the encoder resizes them to 224), noisy latents T x (4, 8, 8), cameras as stored in the files: R = T = 2
in ``eschernet_reference_{4dof,6dof}``, R = 3, T = 1 in ``..._4dof_r3t1`` and R = 1, T = 3 in
``..._6dof_r1t3`` (so that a mix-up of the reference and target view counts cannot pass).
"""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from lift3d.cameras import Cameras
from lift3d.data.reference import ReferenceView
from lift3d.errors import UserError
from lift3d.eschernet import cape
from lift3d.eschernet.model import EscherNetModel
from lift3d.eschernet.random_model import write_random_folder
from lift3d.guidance.base import GuidanceContext
from lift3d.priors.eschernet import EscherNetPrior, escher_poses

from step_records import record_steps

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOL = 2e-5      # float32 round-off through the tiny UNet (observed: 6e-6 of a max |ε| of 3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_folder(str(tmp_path_factory.mktemp("escher") / "tiny"), "tiny", seed=0)


def recorded(variant, case=""):
    return load_file(os.path.join(DATA, f"eschernet_reference_{variant}{case}.safetensors"))


def cameras(c):
    return Cameras.from_spherical(c[:, 0], c[:, 1], c[:, 2], torch.full((len(c),), 49.1), 64, 64)


def lift3d_eps(folder, variant, r):
    model = EscherNetModel.from_pretrained(folder, variant=variant)
    context = model.encode_references(r["images"])
    return model.predict_noise(r["noisy"], r["t"], context, escher_poses(cameras(r["target_cameras"]), variant, 1.0),
                               escher_poses(cameras(r["reference_cameras"]), variant, 1.0),
                               float(r["guidance_scale"]))


@pytest.mark.parametrize("variant,case", [("4dof", ""), ("6dof", ""), ("4dof", "_r3t1"), ("6dof", "_r1t3")])
def test_noise_equals_the_reference_code(tiny, variant, case):
    r = recorded(variant, case)
    # lift3d's cameras map onto the poses the reference code built from the same angles
    for key in ("reference", "target"):
        ours = escher_poses(cameras(r[f"{key}_cameras"]), variant, 1.0).float()
        assert (ours - r[f"{key}_poses"]).abs().max() < 1e-6
    eps = lift3d_eps(tiny, variant, r)
    assert eps.shape == r["eps"].shape and r["eps"].abs().max() > 1
    assert (eps - r["eps"]).abs().max() < TOL


@pytest.mark.parametrize("variant", ["4dof", "6dof"])
def test_the_prior_gives_the_same_noise_from_reference_views(tiny, variant):
    r = recorded(variant)
    prior = EscherNetPrior({"pretrained_model_name_or_path": tiny, "variant": variant, "reference_radius": 0})
    views = [ReferenceView(torch.cat([img.permute(1, 2, 0), torch.ones(64, 64, 1)], -1), cameras(c[None]))
             for img, c in zip(r["images"], r["reference_cameras"])]
    prior.prepare(views, GuidanceContext(device=torch.device("cpu")))
    eps = prior.predict_noise(r["noisy"], r["t"], cameras(r["target_cameras"]), float(r["guidance_scale"]))
    assert (eps - r["eps"]).abs().max() < TOL
    # Views in separate passes do not attend each other: not the joint ε.
    prior.cfg.views_per_pass = 1
    split = prior.predict_noise(r["noisy"], r["t"], cameras(r["target_cameras"]), float(r["guidance_scale"]))
    assert (split - r["eps"]).abs().max() > 100 * TOL


@pytest.mark.parametrize("variant,broken", [
    ("4dof", "rotation the other way"), ("4dof", "reference tokens keyed by the target poses"),
    ("6dof", "query multiplied by P instead of P^-T"), ("6dof", "key multiplied by P^-T")])
def test_a_wrong_cape_detail_fails_parity(tiny, variant, broken, monkeypatch):
    r = recorded(variant)
    real = cape.ViewPoses.encode

    def encode(self, tokens, views, poses, query):
        if broken == "rotation the other way":
            poses = -poses
        elif broken == "reference tokens keyed by the target poses" and not query:
            poses = self.target           # R = T = 2 here, so the shapes fit
        elif broken == "query multiplied by P instead of P^-T" and query:
            saved, self.target_query = self.target_query, self.target
            try:
                return real(self, tokens, views, poses, query)
            finally:
                self.target_query = saved
        elif broken == "key multiplied by P^-T" and not query:
            poses = torch.linalg.inv(poses.double()).transpose(-1, -2)
        return real(self, tokens, views, poses, query)

    monkeypatch.setattr(cape.ViewPoses, "encode", encode)
    assert (lift3d_eps(tiny, variant, r) - r["eps"]).abs().max() > 100 * TOL


def test_cape_sees_relative_poses_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2 * 5, 32), torch.randn(1, 3 * 5, 32)
    # 4-DoF: adding the same vector to every pose keeps q·k
    p_t, p_r, shift = torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.randn(1, 1, 4)
    a = cape.ViewPoses("4dof", p_t, p_r).encode_query_key(q, k, False)
    b = cape.ViewPoses("4dof", p_t + shift, p_r + shift).encode_query_key(q, k, False)
    assert torch.allclose(a[0] @ a[1].transpose(1, 2), b[0] @ b[1].transpose(1, 2), atol=1e-4)
    # 6-DoF: moving the world (every world-to-camera P -> P D) keeps q·k
    cams = Cameras.from_spherical(torch.tensor([10., 30., 0, 45, -5]), torch.tensor([0., 90., 200, 10, 300]),
                                  torch.tensor([1.6, 2., 1.8, 1.5, 2.2]), torch.full((5,), 40.), 8, 8)
    P = escher_poses(cams, "6dof", 1.0)[None]
    other = Cameras.from_spherical(torch.tensor([33.]), torch.tensor([12.]), torch.tensor([3.]), torch.tensor([40.]),
                                   8, 8)
    D = torch.linalg.inv(escher_poses(other, "6dof", 1.0))
    a = cape.ViewPoses("6dof", P[:, :2], P[:, 2:]).encode_query_key(q.double(), k.double(), False)
    b = cape.ViewPoses("6dof", P[:, :2] @ D, P[:, 2:] @ D).encode_query_key(q.double(), k.double(), False)
    assert torch.allclose(a[0] @ a[1].transpose(1, 2), b[0] @ b[1].transpose(1, 2), atol=1e-8)


def test_camera_mapping():
    cams = Cameras.from_spherical(torch.tensor([30.0]), torch.tensor([-120.0]), torch.tensor([3.0]),
                                  torch.tensor([40.0]), 8, 8)
    theta, phi, rho, zero = escher_poses(cams, "4dof", 0.6)[0]          # distance 3 -> 1.8
    assert torch.allclose(torch.stack([theta, phi, zero]).float(), torch.tensor([1.0471976, -2.0943951, 0.0]))
    assert abs(float(rho) - math.pi * math.log(1.8 / 1.5) / math.log(2.2 / 1.5)) < 1e-5
    P = escher_poses(cams, "6dof", 0.6)[0]
    assert torch.allclose(P[:3, 3].norm(), torch.tensor(1.8, dtype=torch.float64))    # camera 1.8 from the object
    assert torch.allclose((P @ torch.tensor([0., 0, 0, 1], dtype=torch.float64))[:3],       # the origin straight ahead
                          torch.tensor([0, 0, -1.8], dtype=torch.float64), atol=1e-6)


def test_any_number_of_references_and_targets(tiny):
    prior = EscherNetPrior({"pretrained_model_name_or_path": tiny, "variant": "6dof"})
    g = torch.Generator().manual_seed(0)
    view = lambda e, a: ReferenceView(torch.rand(48, 48, 4, generator=g),  # noqa: E731
                                      Cameras.from_spherical(torch.tensor([e]), torch.tensor([a]), torch.tensor([3.0]),
                                                             torch.tensor([30.0]), 48, 48))
    primary = view(15.0, 0.0)
    prior.prepare(primary, GuidanceContext(device=torch.device("cpu")))
    assert prior.image_size == 64 and prior.latent_factor == 8 and prior.condition.shape[1] == 49
    assert abs(prior.scale - 0.5) < 1e-6 and prior.reference_poses.shape == (1, 4, 4)
    targets = Cameras.from_spherical(torch.tensor([0., 20, 40]), torch.tensor([90., 180, 270]), torch.full((3,), 3.0),
                                     torch.full((3,), 30.0), 16, 16)
    noisy = torch.randn(3, 4, 8, 8, generator=g)
    one = prior.predict_noise(noisy, torch.tensor([100, 500, 900]), targets, 3.0)
    prior.set_reference([primary, view(30.0, 120.0), view(-5.0, 240.0)])
    assert prior.condition.shape[1] == 3 * 49 and prior.reference_poses.shape == (3, 4, 4)
    three = prior.predict_noise(noisy, torch.tensor([100, 500, 900]), targets, 3.0)
    assert one.shape == three.shape == (3, 4, 8, 8) and torch.isfinite(three).all()
    assert (one - three).abs().max() > 1e-3
    images = prior.generate(targets[:2], [0, 1], steps=2)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_pickled_weights_load_like_safetensors(tiny, tmp_path):
    """The reference's save_pretrained (diffusers 0.19, transformers 4.30) writes .bin files by default."""
    import shutil

    folder = tmp_path / "eschernet-6dof-bin"
    shutil.copytree(tiny, folder)
    for sub, stem, out in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                           ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                           ("image_encoder", "model", "pytorch_model")):
        torch.save(load_file(str(folder / sub / f"{stem}.safetensors")), str(folder / sub / f"{out}.bin"))
        os.remove(folder / sub / f"{stem}.safetensors")
    r = recorded("6dof")
    assert (lift3d_eps(str(folder), "auto", r) - r["eps"]).abs().max() < TOL


def test_incomplete_folder_and_unknown_variant_say_what(tiny, tmp_path):
    import shutil

    broken = tmp_path / "eschernet-4dof"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "image_encoder")
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(UserError) as e:
        EscherNetModel.from_pretrained(str(broken))
    assert str(e.value).count("\n") == 0 and "image_encoder/, scheduler/" in str(e.value)
    with pytest.raises(UserError, match="4-DoF or the 6-DoF"):
        EscherNetModel.from_pretrained(tiny)                               # "tiny": no 4dof/6dof in the name
    named = tmp_path / "eschernet-4dof-copy"
    shutil.copytree(tiny, named)
    assert EscherNetModel.from_pretrained(str(named)).variant == "4dof"
    os.remove(named / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="no weights in .*unet"):
        EscherNetModel.from_pretrained(str(named))
    with pytest.raises(UserError, match="pretrained_model_name_or_path"):
        EscherNetPrior({}).prepare(None, GuidanceContext(device=torch.device("cpu")))


TINY_RUN = """
name: escher
tag: t
use_timestamp: false
trainer: {max_steps: 3, val_every: 0, ckpt_every: 3, device: cpu}
data: {reference_height: 32, reference_width: 32, height: 16, width: 16, foreground_ratio: null, batch_size: 2,
       n_val_views: 1, n_test_views: 1, eval_height: 16, eval_width: 16, default_camera_distance: 2.0,
       camera_distance_range: [2.0, 2.0]}
system:
  geometry: {grid_size: 16, radius: 0.6}
  renderer: {num_samples_per_ray: 16, use_occupancy_grid: false}
  guidance_type: GUIDANCE
  loss: {lambda_guidance: 1.0, lambda_rgb: 1.0}
  export: {resolution: 16, texture_size: 32, relative_threshold: 1.0}
"""
SDS = """{method_type: sds, method: {guidance_scale: 3.0}, prior_type: eschernet, render_space: rgb,
             prior: {pretrained_model_name_or_path: MODEL, variant: 4dof}}"""
VSD = SDS.replace("method_type: sds, method: {guidance_scale: 3.0}", "method_type: vsd, method: {guidance_scale: 3.0}")
SJC = SDS.replace("method_type: sds, method: {guidance_scale: 3.0}", "method_type: sjc, method: {guidance_scale: 10.0}")
GENERATE = """{prior_type: eschernet, prior: {pretrained_model_name_or_path: MODEL, variant: 6dof},
             rings: [[0, 2], [30, 1]], sample_steps: 2, views_per_step: 2}"""


@pytest.mark.parametrize("guidance,guidance_type", [(SDS, "score-distillation"), (SJC, "score-distillation"),
                                                     (VSD, "score-distillation"), (GENERATE, "multiview")])
def test_a_run_reaches_an_exported_mesh(tmp_path, tiny, disc_image, guidance, guidance_type):
    from lift3d.config import load_config
    from lift3d.runner import Experiment

    path = tmp_path / "escher.yaml"
    path.write_text(TINY_RUN.replace("guidance_type: GUIDANCE", f"guidance_type: {guidance_type}\n  guidance: "
                                     + guidance.replace("MODEL", tiny)))
    exp = Experiment(load_config(str(path), [f"image={disc_image}", f"exp_root_dir={tmp_path / 'out'}"]))
    records = record_steps(exp)
    exp.train()
    exp.export()
    assert len(records) == 3 and all(torch.isfinite(torch.as_tensor(r["loss"])) for r in records)
    if guidance_type == "score-distillation":
        assert all(float(r["loss_guidance"]) > 0 for r in records)
    else:
        assert all(float(r["loss_views_rgb"]) > 0 for r in records)
    assert exp.system.guidance.prior.model.variant == guidance.split("variant: ")[1][:4]
    export = os.path.join(exp.trial_dir, "export")
    assert {"model.obj", "model.mtl", "model.glb"} <= set(os.listdir(export))


@pytest.mark.parametrize("guidance,guidance_type", [(SDS, "score-distillation"), (GENERATE, "multiview")])
def test_two_photos_condition_it_together(tmp_path, tiny, disc_image, guidance, guidance_type):
    """images=[a,b] with their cameras: both photos (and cameras) are EscherNet's references."""
    import imageio.v3 as iio

    from lift3d.config import load_config
    from lift3d.runner import Experiment

    side = iio.imread(disc_image).copy()
    side[:, :8] = 0                                     # another view of the object: a narrower silhouette
    second = str(tmp_path / "side.png")
    iio.imwrite(second, side)
    path = tmp_path / "escher.yaml"
    path.write_text(TINY_RUN.replace("guidance_type: GUIDANCE", f"guidance_type: {guidance_type}\n  guidance: "
                                     + guidance.replace("MODEL", tiny)))
    exp = Experiment(load_config(str(path), [f"images=[{disc_image},{second}]",
                                             "data.reference_cameras=[[20,0],[20,90]]",
                                             f"exp_root_dir={tmp_path / 'out'}", "trainer.max_steps=2"]))
    exp.train()
    exp.export()
    prior = exp.system.guidance.prior
    assert prior.condition.shape[1] == 2 * 49 and len(prior.reference_poses) == 2
    azimuths = prior.reference_cameras.azimuth_deg
    assert torch.allclose(azimuths % 360, torch.tensor([0.0, 90.0]), atol=1e-3)
    assert os.path.isfile(os.path.join(exp.trial_dir, "export", "model.obj"))


def test_published_config_falls_back_without_weights_and_uses_them_when_found(tmp_path, monkeypatch, caplog):
    from lift3d.config import load_config

    monkeypatch.setenv("LIFT3D_MODELS", str(tmp_path / "models"))
    cfg = load_config("eschernet-sds", ["data.default_elevation_deg=10"])
    assert cfg.applied.recipe == "recipes/zero123-mini.yaml" and cfg.name == "eschernet-sds"
    lines = [r.getMessage() for r in caplog.records if "no published weights" in r.getMessage()]
    assert len(lines) == 1 and "system.guidance.prior.pretrained_model_name_or_path=PATH" in lines[0]
    (tmp_path / "models" / "eschernet-6dof").mkdir(parents=True)
    cfg = load_config("eschernet-sds", ["data.default_elevation_deg=10"])
    assert cfg.system.guidance.prior_type == "eschernet" and cfg.trainer.max_steps == 600
    assert cfg.system.guidance.prior.pretrained_model_name_or_path == str(tmp_path / "models" / "eschernet-6dof")


def test_memory_estimate_without_loading(tiny):
    from lift3d.plugin import MemoryPlan

    plan = MemoryPlan(stages=[[("guidance", 12, 64, 64)], [("guidance", 4, 128, 128)]])
    small = EscherNetPrior({"pretrained_model_name_or_path": tiny, "views_per_pass": 4}).memory_estimate(plan)
    assert small["model"][0] > 0 and small["unet"][0] > 0 and "views_per_pass (now 4)" in small["unet"][1]
    published = EscherNetPrior({"pretrained_model_name_or_path": "kxic/eschernet-6dof", "views_per_pass": 4})
    est = published.memory_estimate(plan)
    assert est["model"][0] == 0 and 0.5 < est["unet"][0] < 3     # 4 views of 32x32 latents, both CFG halves
    assert published.memory_estimate(plan)["unet"][0] < EscherNetPrior(
        {"pretrained_model_name_or_path": "kxic/eschernet-6dof"}).memory_estimate(plan)["unet"][0]


def test_conditional_branch_for_vsd(tiny):
    """method vsd: the UNet to adapt, and ε_c alone; CFG of ε_c and the dropped (unconditional) branch is ε."""
    r = recorded("6dof")
    prior = EscherNetPrior({"pretrained_model_name_or_path": tiny, "variant": "6dof", "reference_radius": 0})
    views = [ReferenceView(torch.cat([img.permute(1, 2, 0), torch.ones(64, 64, 1)], -1), cameras(c[None]))
             for img, c in zip(r["images"], r["reference_cameras"])]
    prior.prepare(views, GuidanceContext(device=torch.device("cpu")))
    assert prior.denoiser is prior.model.unet
    targets, t, s = cameras(r["target_cameras"]), r["t"], float(r["guidance_scale"])
    cond = prior.conditional_noise(r["noisy"], t, targets)
    free = prior.conditional_noise(r["noisy"], t, targets, drop_pose=torch.ones(2, dtype=torch.bool))
    assert (free + s * (cond - free) - r["eps"]).abs().max() < TOL
    mixed = prior.conditional_noise(r["noisy"], t, targets, drop_pose=torch.tensor([False, True]))
    assert mixed.shape == cond.shape and torch.isfinite(mixed).all()
