"""Run pictures and the loss log: labelled grids, colour maps, the loss CSV across kills and resumes."""

import csv

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from lift3d.runner import turntable_fps
from lift3d.utils import figures
from lift3d.utils.losslog import LossLog


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_labelled_grid_layout():
    a, b = np.zeros((20, 30, 3), np.float32), torch.ones(20, 10, 1)
    strip = figures.labelled_grid([[("a", a), ("b", b), a]])
    assert strip.shape == (figures.LABEL_BAND + 20, 70, 3) and strip.dtype == np.uint8
    assert (strip[: figures.LABEL_BAND, :30] < 128).any()          # the label "a" is drawn in its band
    assert (strip[figures.LABEL_BAND:, 30:40] == 255).all()         # the 1-channel image became grey (white)
    grid = figures.labelled_grid([[("x", a), ("y", a)], [("row", None), ("", np.zeros((10, 30, 3)))]], title="t")
    assert grid.shape == (figures.TITLE_BAND + 2 * figures.LABEL_BAND + 30, 60, 3)
    assert (grid[-10:, :30] == 255).all()                           # the blank cell is as wide as the one above
    title = "run/tag  step 400  |  input view: elevation 5 azimuth 0  |  chamfer 0.0445 volume IoU 0.457"
    wrapped = figures.labelled_grid([[("x", np.zeros((20, 120, 3)))]], title=title)
    assert wrapped.shape[1] == 120 and wrapped.shape[0] > 3 * figures.TITLE_BAND   # wrapped, not widened
    assert (wrapped[2 * figures.TITLE_BAND:3 * figures.TITLE_BAND] < 128).any()     # the third line is drawn


def test_colour_maps():
    opacity = torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 3, 1)
    normal = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(1, 1, 3, 3)
    img = figures.normal_image((normal * opacity + 1) / 2, opacity)
    assert torch.allclose(img[0, 0, 0], torch.tensor([0.5, 0.5, 1.0])) and (img[0, 0, 1] == 1).all()
    depth = torch.tensor([1.0, 10.0, 2.0]).view(1, 1, 3, 1)                       # 10: the background's depth
    shade = figures.depth_image(depth, opacity, background_depth=10.0)[0, 0, :, 0]
    assert shade[0] > shade[2] > 0 and shade[1] == 0                               # near bright, far dark, empty black
    assert figures.opacity_image(opacity).shape == (1, 1, 3, 3)


def test_loss_log_survives_a_kill_and_continues_on_resume(tmp_path):
    path = str(tmp_path / "save" / "losses.csv")
    log = LossLog(path)
    for step in (1, 2, 3):
        log.append(step, {"loss": step, "loss_rgb": 0.5})
    log.append(4, {"loss": 4, "loss_rgb": 0.5, "loss_opaque": 2.0})                # a term whose weight starts late
    log.close()
    rows = read_rows(path)
    assert list(rows[0]) == ["step", "loss", "loss_rgb", "loss_opaque"]
    assert [r["loss_opaque"] for r in rows] == ["", "", "", "2"]
    with open(path, "a") as f:
        f.write("5,5,0.5")                                                         # killed mid-line
    log = LossLog(path, resume_step=3)                                             # the checkpoint was at step 3
    log.append(4, {"loss": 40, "loss_rgb": 0.5, "loss_opaque": 1.0})
    assert [(r["step"], r["loss"]) for r in read_rows(path)] == [("1", "1"), ("2", "2"), ("3", "3"), ("4", "40")]
    LossLog(path)                                                                  # a fresh run starts over
    assert read_rows(path) == [] and open(path).read() == "step\n"


def test_loss_panels_put_diagnostics_apart_and_log_only_positive_terms():
    nan = float("nan")
    columns = {"loss": [2.0, 1.0], "loss_rgb": [nan, 0.1], "loss_orient": [-0.5, 0.2], "loss_sparsity": [0.0, 1.0],
               "guidance_t": [358.0, 423.0], "guidance_grad_norm": [-1.0, 2.0], "lr": [0.01, 0.01],
               "loss_opaque": [nan, nan]}
    assert figures.loss_panels(columns) == [
        (figures.LOSSES, [("loss", True), ("loss_rgb", True), ("loss_orient", False), ("loss_sparsity", False),
                          ("loss_opaque", False)]),
        (figures.DIAGNOSTICS, [("guidance_t", True), ("guidance_grad_norm", False), ("lr", True)])]
    assert figures.loss_panels({"loss": [1.0]}) == [(figures.LOSSES, [("loss", True)])]   # no empty group


def test_running_mean():
    assert [figures.smoothing_window(n) for n in (1, 4, 6, 60, 400, 4000)] == [1, 1, 3, 3, 21, 201]
    np.testing.assert_allclose(figures.running_mean([1, 2, 3, 4, 5, 100], 3), [1.5, 2, 3, 4, 109 / 3, 52.5])
    np.testing.assert_allclose(figures.running_mean([1, 2, 3, 4, 5, 100], 5), [2, 2.5, 3, 22.8, 28, 109 / 3])
    assert figures.running_mean([4.0, -1.0], 1).tolist() == [4.0, -1.0]                  # window 1: the values
    np.testing.assert_allclose(figures.running_mean([1, float("nan"), 3, 5], 3), [1, np.nan, 4, 4])  # NaN skipped, kept
    assert (figures.running_mean([0.01] * 400, 21) == 0.01).all()                          # a constant stays exact
    v = np.random.default_rng(0).lognormal(size=200)
    v[[5, 50, 51]] = np.nan
    direct = [np.nanmean(v[max(i - 10, 0):i + 11]) if np.isfinite(v[i]) else np.nan for i in range(len(v))]
    np.testing.assert_allclose(figures.running_mean(v, 21), direct, rtol=1e-12)


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_loss_curve(tmp_path, backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    for rows in (1, 60):
        log = LossLog(str(tmp_path / f"losses{rows}.csv"))
        for step in range(10, 10 * rows + 1, 10):
            terms = {"loss": 100 / step, "loss_rgb": 0.1 * (-1) ** step, "guidance_t": step % 7 * 100, "lr": 0.01}
            log.append(step, terms | ({"loss_opaque": 1.0 / step} if step > 300 else {}))   # a term starting late
        log.close()
        png = figures.loss_curve(log.path, str(tmp_path / f"losses{rows}.png"), backend=backend)
        image = iio.imread(png)
        assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] >= 600 and image.std() > 0
    empty = LossLog(str(tmp_path / "empty.csv"))
    assert figures.loss_curve(empty.path, str(tmp_path / "empty.png"), backend=backend) is None


def test_turntable_lasts_three_seconds():
    assert turntable_fps(36) == 12 and turntable_fps(120) == 30 and turntable_fps(3) == 1 and turntable_fps(1) == 1
    assert all(n / turntable_fps(n) >= 3 for n in range(3, 200))
