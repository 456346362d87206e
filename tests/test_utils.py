"""lift3d.utils: the device picker and the image loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from lift3d.errors import UserError
from lift3d.utils.device import pick_device
from lift3d.utils.images import load_image


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            pick_device("cuda:0")


def test_load_image_composites_on_white_and_resizes(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = [255, 0, 0, 255]
    Image.fromarray(rgba).save(tmp_path / "a.png")
    full = load_image(str(tmp_path / "a.png"))
    assert full.shape == (1, 3, 40, 40) and torch.equal(full[0, :, 0, 0], torch.ones(3))
    assert torch.equal(full[0, :, 20, 20], torch.tensor([1.0, 0.0, 0.0]))
    small = load_image(str(tmp_path / "a.png"), 20)
    assert small.shape == (1, 3, 20, 20) and 0 <= small.min() and small.max() <= 1
    assert torch.allclose(small[0, :, 10, 10], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    with pytest.raises(UserError, match="image not found"):
        load_image(str(tmp_path / "missing.png"))
