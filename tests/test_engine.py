"""End-to-end checks of the engine on a tiny field: trial folder, resume, Ctrl-C, NaN, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from faultcases import TINY  # the tiny config, shared with the fault cases
from lift3d.config import load_config
from lift3d.errors import UserError
from lift3d.runner import Experiment, Interrupted, load_checkpoint, run_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def disc_png(tmp_path_factory):
    """A red disc on transparent background, 64x64."""
    import imageio.v3 as iio

    yy, xx = np.mgrid[:64, :64]
    inside = (xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 18 ** 2
    img = np.zeros((64, 64, 4), np.uint8)
    img[inside] = [220, 40, 30, 255]
    path = tmp_path_factory.mktemp("img") / "disc_rgba.png"
    iio.imwrite(path, img)
    return str(path)


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def overrides(tmp_path, image, *extra):
    return [f"image={image}", f"exp_root_dir={tmp_path / 'out'}", *extra]


def test_train_writes_trial_folder_and_resume_continues(tmp_path, tiny_config, disc_png, capsys):
    import csv

    import imageio.v2 as imageio
    import imageio.v3 as iio

    trial = run_experiment(tiny_config, overrides(tmp_path, disc_png))
    assert trial == str(tmp_path / "out" / "tiny" / "t")
    for rel in ("configs/parsed.yaml", "ckpts/last.ckpt", "save/it2-val.png", "save/it4-test.mp4", "export/model.obj",
                "save/summary.png", "save/losses.csv", "save/losses.png"):
        assert os.path.isfile(os.path.join(trial, rel)), rel
    # The end of the run says where the results are.
    printed = capsys.readouterr().out
    for line_start, rel in [("mesh:", "export/model.obj"), ("turntable:", "save/it4-test.mp4"),
                            ("summary:", "save/summary.png"), ("losses:", "save/losses.csv")]:
        assert any(line.startswith(line_start) and os.path.join(trial, rel) in line
                   for line in printed.splitlines()), (line_start, printed)
    # The turntable: field RGB | mesh textured | mesh shaded | field normal | field opacity at the eval size
    # (16 px), 3 frames lasting 3 s.
    video = imageio.get_reader(os.path.join(trial, "save", "it4-test.mp4"))
    frames = [frame for frame in video]
    assert frames[0].shape == (16, 5 * 16, 3)
    assert len(frames) / video.get_meta_data()["fps"] >= 3
    # The labelled validation strip keeps its width: input, reference render, 2 views.
    assert iio.imread(os.path.join(trial, "save", "it2-val.png")).shape[1] == 4 * 32
    # One loss row per step (log_every 1).
    with open(os.path.join(trial, "save", "losses.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "loss_rgb", "loss_mask", "loss_sparsity"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r[k])) for r in rows for k in r)

    ckpt = os.path.join(trial, "ckpts", "last.ckpt")
    assert load_checkpoint(ckpt)["step"] == 4
    before = load_checkpoint(ckpt)["system"]["geometry.density_raw"].clone()
    run_experiment(tiny_config, overrides(tmp_path, disc_png, f"resume={ckpt}", "trainer.max_steps=6"))
    after = load_checkpoint(ckpt)
    assert after["step"] == 6
    assert not torch.equal(before, after["system"]["geometry.density_raw"])
    with open(os.path.join(trial, "save", "losses.csv"), newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]     # the resume continued it


def test_training_reduces_reference_loss(tmp_path, tiny_config, disc_png):
    cfg = load_config(tiny_config, overrides(tmp_path, disc_png, "trainer.max_steps=40", "trainer.val_every=0"))
    exp = Experiment(cfg)
    ref = exp.data.reference_view()
    exp.system.eval()

    def ref_error():
        with torch.no_grad():
            out = exp.system.render(ref.camera, bg_color=torch.ones(3))
        return torch.nn.functional.mse_loss(out["comp_rgb"][0], ref.rgb).item()

    start = ref_error()
    exp.train()
    exp.system.eval()
    assert ref_error() < 0.5 * start


def test_every_regulariser_gives_finite_gradients(tmp_path, tiny_config, disc_png):
    names = ["depth_smooth_ref", "depth_smooth", "near_view", "normal_smooth", "orient", "sparsity", "opaque"]
    exp = Experiment(load_config(tiny_config, overrides(tmp_path, disc_png,
                                                        *[f"system.loss.lambda_{n}=0.1" for n in names])))
    exp.system.setup(exp.data, exp.context(), train=False)
    exp.system.train()
    out = exp.system.training_step(exp.data.sample_views(exp.generator), 0)
    for n in names:
        assert torch.isfinite(out[f"loss_{n}"]), n
    out["loss"].backward()
    grad = exp.system.geometry.density_raw.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_ctrl_c_saves_checkpoint_that_resumes(tmp_path, tiny_config, disc_png, monkeypatch):
    import signal

    cfg = load_config(tiny_config, overrides(tmp_path, disc_png, "trainer.ckpt_every=0", "trainer.max_steps=6"))
    exp = Experiment(cfg)
    real_step = exp.system.training_step

    def ctrl_c_in_step_3(views, step):      # a real SIGINT mid-step: the step finishes, then the run stops
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(views, step)

    monkeypatch.setattr(exp.system, "training_step", ctrl_c_in_step_3)
    with pytest.raises(Interrupted) as e:
        exp.train()
    assert load_checkpoint(e.value.ckpt_path)["step"] == 4 and e.value.exit_code == 130
    assert "resume=" in str(e.value)


def test_keyboard_interrupt_inside_a_step_saves_no_half_step(tmp_path, tiny_config, disc_png, monkeypatch):
    cfg = load_config(tiny_config, overrides(tmp_path, disc_png, "trainer.ckpt_every=2", "trainer.max_steps=6"))
    exp = Experiment(cfg)
    real_step = exp.system.training_step

    def interrupt_at_3(views, step):        # what a second Ctrl-C does: stop at once
        if step == 3:
            raise KeyboardInterrupt
        return real_step(views, step)

    monkeypatch.setattr(exp.system, "training_step", interrupt_at_3)
    with pytest.raises(Interrupted, match="step 4: stopped there, unsaved; the previous checkpoint \\(step 2\\)") as e:
        exp.train()
    assert load_checkpoint(e.value.ckpt_path)["step"] == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_config, disc_png, monkeypatch):
    cfg = load_config(tiny_config, overrides(tmp_path, disc_png, "trainer.ckpt_every=1"))
    exp = Experiment(cfg)
    real_step = exp.system.training_step

    def nan_at_2(views, step):
        out = real_step(views, step)
        if step == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(exp.system, "training_step", nan_at_2)
    with pytest.raises(UserError, match="not finite at step 2") as e:
        exp.train()
    assert "last good checkpoint" in str(e.value)
    ckpt = load_checkpoint(exp.ckpt_path)
    assert ckpt["step"] == 2 and torch.isfinite(ckpt["system"]["geometry.density_raw"]).all()


def test_bad_learning_rate_is_a_user_error(tmp_path, tiny_config, disc_png):
    with pytest.raises(UserError, match="system.optimizer.lr"):      # when the config loads (its domain: > 0)
        load_config(tiny_config, overrides(tmp_path, disc_png, "system.optimizer.lr=-1"))


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "LIFT3D_NO_PROGRESS": "1"})


@pytest.mark.parametrize("extra, message", [
    (["image=/no/such.png"], "not found"),
    (["system.loss.lamda_rgb=1"], "system.loss.lamda_rgb"),
    (["system.geometry_type=voxel-rff"], "voxel-rf"),
    (["trainer.max_steps=many"], "trainer.max_steps"),
    (["resume=/no/such.ckpt"], "checkpoint not found"),
    (["system.reference_stride=3"], "reference_stride"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, tiny_config, disc_png, extra, message):
    base = [f"image={disc_png}", f"exp_root_dir={tmp_path}"]
    r = cli("--config", tiny_config, *base, *extra)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_config, disc_png):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint")
    r = cli("--config", tiny_config, f"image={disc_png}", f"resume={bad}", "--export")
    assert r.returncode != 0 and "cannot read checkpoint" in r.stderr and "Traceback" not in r.stderr
