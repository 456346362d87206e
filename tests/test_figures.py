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


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_loss_curve(tmp_path, backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    log = LossLog(str(tmp_path / "losses.csv"))
    for step in range(1, 6):
        log.append(step, {"loss": 1 / step, "loss_rgb": -step, "guidance_t": 0.5})
    png = figures.loss_curve(log.path, str(tmp_path / "losses.png"), backend=backend)
    image = iio.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0


def test_turntable_lasts_three_seconds():
    assert turntable_fps(36) == 12 and turntable_fps(120) == 30 and turntable_fps(3) == 1 and turntable_fps(1) == 1
    assert all(n / turntable_fps(n) >= 3 for n in range(3, 200))
