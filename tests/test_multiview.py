"""Generate-then-reconstruct (lift3d/guidance/multiview.py): the views are the ones ``lift3d nvs`` draws,
they are cached and reused, the field is fitted to them through the losses hook, and SDEdit refreshes them."""

import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from lift3d.config import load_config
from lift3d.guidance.base import GuidanceContext
from lift3d.guidance.multiview import MultiviewGuidance, ring_cameras
from lift3d.registry import find
from lift3d.runner import Experiment
from lift3d.zero123.nvs import nvs
from lift3d.zero123.random_model import random_zero123

from step_records import record_steps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mv") / "tiny")
    random_zero123("tiny", seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory, model_dir):
    size = random_zero123("tiny", seed=3).image_size
    yy, xx = np.mgrid[:size, :size]
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[(xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2] = [200, 60, 40, 255]
    path = str(tmp_path_factory.mktemp("img") / "disc.png")
    iio.imwrite(path, rgba)
    return path


def reference_of(image, size):
    data = find("single-image", "data")({"image_path": image, "reference_height": size, "reference_width": size,
                                         "foreground_ratio": None, "default_elevation_deg": 20.0})
    return data.reference_view()


def test_generated_views_are_lift3d_nvs_views(tmp_path, model_dir, image):
    size = random_zero123("tiny", seed=3).image_size
    guidance = MultiviewGuidance({"prior": {"pretrained_model_name_or_path": model_dir}, "rings": [[0, 2], [30, 1]],
                                  "sample_steps": 3, "seed": 7}, path="system.guidance")
    reference = reference_of(image, size)
    gt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "objects", "mushroom")
    guidance.prepare(reference, GuidanceContext(device=torch.device("cpu"), trial_dir=str(tmp_path / "trial"),
                                                gt_mesh=gt))
    record = __import__("json").load(open(tmp_path / "trial" / "save" / "generated" / "generated.json"))
    assert set(record["against_gt"]) == {"psnr_image", "ssim", "silhouette_iou"} and record["against_gt"]["psnr_image"] > 0
    cams = guidance.cameras.spherical
    assert torch.allclose(cams[:, 0], torch.tensor([20.0, 50.0]), atol=1e-4)      # the input's own view left out
    assert torch.allclose(cams[:, 1] % 360, torch.tensor([180.0, 0.0]), atol=1e-4)
    for i in range(len(cams)):
        out = str(tmp_path / f"nvs{i}")
        nvs(guidance.prior.model, image, round(float(cams[i, 0]) - 20.0), round(float(cams[i, 1]) % 360), out_dir=out, steps=3,
            seed=7 + i, n_samples=1)
        expected = torch.from_numpy(iio.imread(os.path.join(out, "view_00.png"))).float() / 255
        saved = torch.from_numpy(iio.imread(str(tmp_path / "trial" / "save" / "generated" / f"view_{i:02d}.png")))
        # The same PNG up to one level: the cameras' angles come back from their matrices with ~1e-6 round-off.
        assert (saved.float() / 255 - expected).abs().max() <= 1 / 255 + 1e-6
        assert (guidance.images[i].permute(1, 2, 0) - expected).abs().max() <= 1.5 / 255


TINY = """
name: mv
tag: t
use_timestamp: false
trainer: {max_steps: 3, val_every: 0, ckpt_every: 3, device: cpu}
data: {reference_height: 32, reference_width: 32, height: 16, width: 16, foreground_ratio: null, batch_size: 1,
       n_val_views: 1, n_test_views: 1, eval_height: 16, eval_width: 16}
system:
  geometry: {grid_size: 16, radius: 0.6}
  renderer: {num_samples_per_ray: 16, use_occupancy_grid: false}
  guidance_type: multiview
  guidance: {prior: {pretrained_model_name_or_path: MODEL}, rings: [[0, 2], [30, 1]], sample_steps: 2,
             views_per_step: 2}
  loss: {lambda_guidance: 1.0, lambda_rgb: 1.0, lambda_views_rgb: 10.0, lambda_views_mask: 0.0}
  export: {resolution: 16, texture_size: 32, relative_threshold: 1.0}
"""


def test_the_field_fits_the_views_and_a_resume_reuses_them(tmp_path, model_dir, image):
    path = tmp_path / "mv.yaml"
    path.write_text(TINY.replace("MODEL", model_dir))
    args = [f"image={image}", f"exp_root_dir={tmp_path / 'out'}"]
    exp = Experiment(load_config(str(path), args))
    records = record_steps(exp)
    exp.train()
    assert all(r["loss_views_rgb"] > 0 and "loss_views_mask" not in r for r in records)
    assert float(records[0]["loss_guidance"]) == 0.0                     # no distillation by default
    generated = os.path.join(exp.trial_dir, "save", "generated")
    stamp = os.path.getmtime(os.path.join(generated, "view_00.png"))
    resumed = Experiment(load_config(str(path), args + [f"resume={exp.ckpt_path}", "trainer.max_steps=4"]))
    called = []
    resumed_prior = None

    def spy_setup(*a, **k):
        nonlocal resumed_prior
        out = setup(*a, **k)
        resumed_prior = resumed.system.guidance.prior
        return out

    setup = resumed.system.setup
    resumed.system.setup = spy_setup
    from lift3d.priors.zero123 import Zero123Prior
    original = Zero123Prior.generate
    Zero123Prior.generate = lambda self, *a, **k: called.append(1) or original(self, *a, **k)
    try:
        resumed.train()
    finally:
        Zero123Prior.generate = original
    assert called == [] and os.path.getmtime(os.path.join(generated, "view_00.png")) == stamp
    assert resumed_prior is not None and resumed.step == 4


def test_sdedit_refresh_replaces_the_views(tmp_path, model_dir, image):
    path = tmp_path / "mv.yaml"
    path.write_text(TINY.replace("MODEL", model_dir).replace("views_per_step: 2}",
                                                             "views_per_step: 2, refresh_every: 2}"))
    gt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "objects", "mushroom",
                      "meshes", "model.obj")
    exp = Experiment(load_config(str(path), [f"image={image}", f"exp_root_dir={tmp_path / 'out'}", f"gt={gt}"]))
    exp.system.setup(exp.data, exp.context(), train=True)
    before = exp.system.guidance.images.clone()
    exp.optimizer = exp.system.configure_optimizer()
    exp.train()
    assert not torch.equal(before, exp.system.guidance.images)
    record = __import__("json").load(open(os.path.join(exp.trial_dir, "save", "generated", "generated.json")))
    assert record["step"] == 2
    # the refreshed views are scored against the ground truth again, the first ones' scores kept beside
    assert record["against_gt"] != record["against_gt_at_step_0"] and record["against_gt"]["psnr_image"] > 0


def test_ring_views_keep_clear_of_the_other_photos(tmp_path, model_dir, image):
    """With a second photo from behind, the ring view behind is not generated (the photo shows that side);
    the contact sheet still groups the views by ring, and a clearance that leaves no view is one clear error."""
    from lift3d.cameras import Cameras
    from lift3d.data.reference import ReferenceView
    from lift3d.errors import ConfigError

    size = random_zero123("tiny", seed=3).image_size
    front = reference_of(image, size)
    el, az, dist = (float(v) for v in front.camera.spherical[0])
    back = ReferenceView(front.rgba, Cameras.from_spherical(el, az + 180.0, dist, float(front.camera.fovy_deg[0]),
                                                            size, size))
    settings = {"prior": {"pretrained_model_name_or_path": model_dir}, "rings": [[0, 4], [30, 2]], "sample_steps": 1}
    context = GuidanceContext(device=torch.device("cpu"), trial_dir=None)
    alone = MultiviewGuidance(settings, path="system.guidance")
    alone.prepare(front, context)
    both = MultiviewGuidance(settings, path="system.guidance")
    both.prepare([front, back], context)
    assert len(alone.cameras) == 5 and len(both.cameras) == 4
    kept = {(round(float(e)), round(float(a - az)) % 360) for e, a, _ in both.cameras.spherical}
    assert kept == {(20, 90), (20, 270), (50, 0), (50, 180)}     # the view at the back photo's camera is gone
    assert [len(row) - 1 for row in both.summary_rows()] == [2, 2]
    loose = MultiviewGuidance({**settings, "photo_clearance_deg": 0.0}, path="system.guidance")
    loose.prepare([front, back], context)
    assert len(loose.cameras) == 5
    with pytest.raises(ConfigError, match="photo_clearance_deg"):
        MultiviewGuidance({**settings, "rings": [[0, 2]]}, path="system.guidance").prepare([front, back], context)
