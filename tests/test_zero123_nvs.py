"""``lift3d nvs``: relative pose semantics, DDIM sampling and the files written."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lift3d.errors import UserError
from lift3d.zero123.nvs import nvs
from lift3d.zero123.sampling import relative_pose, sample
from lift3d.zero123.random_model import random_zero123


@pytest.fixture(scope="module")
def tiny():
    return random_zero123("tiny", seed=2)


@pytest.fixture
def image(tmp_path):
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[20:60, 25:55] = [200, 40, 30, 255]
    path = str(tmp_path / "in.png")
    Image.fromarray(rgba).save(path)
    return path


def test_relative_pose():
    # 30 degrees up = polar angle 30 degrees smaller; azimuth 90 degrees; radius +0.5.
    assert torch.allclose(relative_pose(30, 90, 0.5, n=2),
                          torch.tensor([[-math.pi / 6, 1.0, 0.0, 0.5]] * 2), atol=1e-6)
    stable = relative_pose(0, 180, 0.0, stable=True, condition_elevation=20)
    assert torch.allclose(stable, torch.tensor([[0.0, 0.0, -1.0, math.radians(70)]]), atol=1e-6)


def test_ddim_uses_ldm_timesteps(tiny, monkeypatch):
    seen = []
    original = tiny.predict_noise
    monkeypatch.setattr(tiny, "predict_noise", lambda x, t, *a: seen.append(int(t)) or original(x, t, *a))
    condition = tiny.encode_condition(torch.rand(1, 3, 64, 64))
    out = sample(tiny, condition, relative_pose(0, 30), steps=5, generator=torch.Generator().manual_seed(0))
    assert seen == [801, 601, 401, 201, 1]  # ldm's uniform DDIM steps: range(0, 1000, 200) + 1, reversed
    assert out.shape == (1, 3, 64, 64) and 0 <= out.min() and out.max() <= 1


def test_nvs_writes_views_and_grid(tiny, image, tmp_path):
    out = str(tmp_path / "views")
    paths = nvs(tiny, image, elevation=20, azimuth=45, out_dir=out, steps=3, n_samples=2, seed=7)
    assert [os.path.basename(p) for p in paths] == ["view_00.png", "view_01.png", "grid.png", "nvs.json"]
    assert Image.open(paths[0]).size == (64, 64)
    assert Image.open(paths[2]).size == (3 * 64, 64)  # input + 2 samples in a row
    grid = np.asarray(Image.open(paths[2]))
    assert (grid[:5, :5] == 255).all()  # input composited on white
    meta = json.load(open(paths[3]))
    assert meta["pose"][0] == pytest.approx(-math.radians(20)) and meta["steps"] == 3
    again = nvs(tiny, image, elevation=20, azimuth=45, out_dir=str(tmp_path / "again"), steps=3, n_samples=2, seed=7)
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(paths[0])))


def test_nvs_errors(tiny, image, tmp_path):
    with pytest.raises(UserError, match="image not found"):
        nvs(tiny, str(tmp_path / "missing.png"), 0, 30, out_dir=str(tmp_path / "o"))
    with pytest.raises(UserError, match="not found"):
        nvs(str(tmp_path / "no-model"), image, 0, 30, out_dir=str(tmp_path / "o"))


def test_condition_of_a_channels_last_view_equals_the_contiguous_one(tiny):
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    view = img.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not view.is_contiguous() and torch.equal(view, img)
    a, b = tiny.encode_condition(img), tiny.encode_condition(view)
    torch.testing.assert_close(b.embedding, a.embedding, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.latent, a.latent, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.encode(view, sample=False), tiny.encode(img, sample=False), atol=1e-6, rtol=0)
