"""The extension points of issue 12: a prior written in a few lines drives both distillation methods
through the normal config path, and a geometry whose parameter count changes trains and resumes."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lift3d.config import load_config
from lift3d.geometry.voxel_rf import VoxelRadianceField
from lift3d.priors.base import ViewConditionedPrior
from lift3d.registry import register
from lift3d.runner import Experiment, load_checkpoint


@register("toy-prior", "prior")
class ToyPrior(ViewConditionedPrior):
    """A 'diffusion model' that predicts ε̂ = 0.5·x: enough to exercise the interface."""

    @dataclass
    class Config:
        image_size: int = 16

    def prepare(self, reference, context):
        self.calls = 0

    image_size = property(lambda self: self.cfg.image_size)
    latent_factor = 4
    alphas_cumprod = property(lambda self: torch.linspace(0.999, 0.01, 100))

    def encode(self, images, noise=None):  # a deterministic encoder: no posterior noise
        x = F.avg_pool2d(images * 2 - 1, self.latent_factor)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def decode(self, latents):
        return (F.interpolate(latents[:, :3], scale_factor=self.latent_factor) + 1) / 2

    def predict_noise(self, noisy, t, cameras, guidance_scale, render):
        self.calls += 1
        return 0.5 * noisy


TINY = """
name: toy
tag: t
use_timestamp: false
trainer: {max_steps: 3, val_every: 0, ckpt_every: 0, device: cpu}
data: {reference_height: 32, reference_width: 32, height: 16, width: 16, foreground_ratio: null, batch_size: 2,
       n_val_views: 1, n_test_views: 1, eval_height: 16, eval_width: 16}
system:
  geometry: {grid_size: 16, radius: 0.6}
  renderer: {num_samples_per_ray: 16, use_occupancy_grid: false}
  guidance_type: score-distillation
  guidance: {method_type: METHOD, prior_type: toy-prior, prior: {image_size: 16}}
  loss: {lambda_guidance: 1.0, lambda_rgb: 1.0}
  export: {resolution: 16, texture_size: 32, relative_threshold: 1.0}
"""


@pytest.fixture()
def image(disc_image):
    return disc_image


@pytest.mark.parametrize("method", ["sds", "sjc"])
def test_a_toy_prior_drives_both_methods_from_yaml(tmp_path, image, method):
    path = tmp_path / "toy.yaml"
    path.write_text(TINY.replace("METHOD", method))
    exp = Experiment(load_config(str(path), [f"image={image}", f"exp_root_dir={tmp_path / 'out'}"]))
    before = exp.system.geometry.density_raw.detach().clone()
    losses = []
    real = exp.system.training_step
    exp.system.training_step = lambda views, step: losses.append(real(views, step)) or losses[-1]
    exp.train()
    guidance = exp.system.guidance
    assert guidance.prior.calls == 3 and type(guidance.method).registered_name == method
    assert all(torch.isfinite(out["loss_guidance"]) and out["loss_guidance"] > 0 for out in losses)
    assert not torch.equal(before, exp.system.geometry.density_raw)


class GrowingField(VoxelRadianceField):
    """A field with a point list that grows by one point per backward pass (as 3D Gaussians densify)."""

    resizable_parameters = ("points",)

    def __init__(self, cfg=None, path=""):
        super().__init__(cfg, path)
        self.points = torch.nn.Parameter(torch.zeros(1, 3))
        self.seen = []

    def after_backward(self, ctx):
        self.seen.append((ctx.step, self.density_raw.grad is not None, "guidance" in ctx.outputs))
        self.points = ctx.optimizer.extend(self.points, torch.ones(1, 3))


register("growing-test-field", "geometry")(GrowingField)


def test_after_backward_hook_and_checkpoints_with_another_parameter_count(tmp_path, image):
    path = tmp_path / "grow.yaml"
    path.write_text(TINY.replace("guidance_type: score-distillation", "guidance_type: null")
                    .replace("  geometry: {", "  geometry_type: growing-test-field\n  geometry: {")
                    .replace("ckpt_every: 0", "ckpt_every: 3"))
    args = [f"image={image}", f"exp_root_dir={tmp_path / 'out'}"]
    exp = Experiment(load_config(str(path), args))
    exp.train()
    assert exp.system.geometry.seen == [(0, True, True), (1, True, True), (2, True, True)]   # after backward, before the step
    ckpt = exp.ckpt_path
    assert load_checkpoint(ckpt)["system"]["geometry.points"].shape == (4, 3)
    resumed = Experiment(load_config(str(path), args + [f"resume={ckpt}", "trainer.max_steps=5"]))
    resumed.train()   # a fresh field has 1 point; the checkpoint's 4 load, and keep growing
    assert resumed.system.geometry.points.shape == (6, 3)


class CentredField(VoxelRadianceField):
    """Adding a loss: one function and its declaration, nothing else anywhere."""

    loss_defaults = {"centred": 0.0}

    def losses(self, ctx):
        # The guidance views' depth should stay near the camera distance: uses this step's renders.
        return {"centred": (ctx.outputs["guidance"]["depth"] - 1.5).abs().mean()}


register("centred-test-field", "geometry")(CentredField)


def test_a_plugin_adds_a_loss_in_one_function(tmp_path, image):
    from lift3d.errors import ConfigError

    path = tmp_path / "centred.yaml"
    path.write_text(TINY.replace("guidance_type: score-distillation", "guidance_type: null")
                    .replace("  geometry: {", "  geometry_type: centred-test-field\n  geometry: {"))
    args = [f"image={image}", f"exp_root_dir={tmp_path / 'out'}"]
    exp = Experiment(load_config(str(path), args + ["system.loss.lambda_centred=[0,2.0,4.0,10]"]))
    exp.system.setup(exp.data, exp.context(), train=True)
    torch.manual_seed(0)
    out = exp.system.training_step(exp.data.sample_views(), step=5)     # the schedule's weight at step 5: 3
    without = out["loss"] - 3.0 * out["loss_centred"]
    assert out["loss_centred"] > 0 and torch.isclose(without, 1.0 * out["loss_rgb"] + 0.0, rtol=1e-5)
    off = Experiment(load_config(str(path), args))        # declared default 0: not computed at all
    off.system.setup(off.data, off.context(), train=True)
    assert "loss_centred" not in off.system.training_step(off.data.sample_views(), step=0)
    with pytest.raises(ConfigError, match="lambda_centered.*did you mean lambda_centred"):
        Experiment(load_config(str(path), args + ["system.loss.lambda_centered=1"]))


from lift3d.guidance.distillation import ScoreDistillation  # noqa: E402


class GuidanceWithState(ScoreDistillation):
    """A guidance that trains a module of its own (as VSD trains a LoRA) and adds a loss on it."""

    loss_defaults = {"state_decay": 1.0}

    def prepare(self, reference, context):
        super().prepare(reference, context)
        self.state = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(self.state.weight, 1.0)

    def trainable_state(self):
        return self.state

    def losses(self, ctx):
        return {"state_decay": (self.state.weight ** 2).sum()}


register("state-test-guidance", "guidance")(GuidanceWithState)


def test_trainable_guidance_state_is_optimised_checkpointed_and_resumed(tmp_path, image):
    path = tmp_path / "state.yaml"
    path.write_text(TINY.replace("METHOD", "sds").replace("guidance_type: score-distillation",
                                                          "guidance_type: state-test-guidance")
                    .replace("ckpt_every: 0", "ckpt_every: 3"))
    args = [f"image={image}", f"exp_root_dir={tmp_path / 'out'}"]
    exp = Experiment(load_config(str(path), args))
    exp.train()
    weight = exp.system.guidance.state.weight
    assert any(p is weight for g in exp.optimizer.param_groups for p in g["params"])
    assert (weight < 1.0).all()                       # the loss on it was minimised
    saved = load_checkpoint(exp.ckpt_path)
    assert torch.equal(saved["system"]["guidance_state.weight"], weight.detach())
    resumed = Experiment(load_config(str(path), args + [f"resume={exp.ckpt_path}", "trainer.max_steps=4"]))
    resumed.train()
    assert resumed.step == 4 and (resumed.system.guidance.state.weight < weight).all()   # restored, then trained on
    test_only = Experiment(load_config(str(path), args + [f"resume={exp.ckpt_path}"]))
    test_only.restore(exp.ckpt_path)                  # --test and --export: no guidance, its state is skipped
    assert test_only.system.guidance is None
