"""Checks on the models shipped inside the package (not on freshly built toy models)."""

import pytest
import torch

from lift3d.priors.zero123 import BUNDLED_MODEL


@pytest.fixture(scope="module")
def mini():
    from lift3d.zero123 import Zero123Model

    return Zero123Model.from_pretrained(BUNDLED_MODEL, torch_dtype=torch.float32)


def test_mini_vae_keeps_colour(mini):
    """A flat red, green or blue square on white must come back in its own colour (the first mini
    model's VAE returned every object grey; see lift3d/training/arch.py)."""
    size = mini.image_size
    squares = torch.ones(3, 3, size, size)
    lo, hi = size // 4, 3 * size // 4
    for i in range(3):
        squares[i, :, lo:hi, lo:hi] = 0.0
        squares[i, i, lo:hi, lo:hi] = 1.0
    with torch.no_grad():
        recon = mini.decode(mini.encode(squares, sample=False)).clamp(0, 1)
    centre = recon[:, :, lo + 2:hi - 2, lo + 2:hi - 2].mean((2, 3))   # (3 squares, 3 channels)
    assert centre.argmax(1).tolist() == [0, 1, 2], centre
    assert (centre.amax(1) - centre.amin(1)).min() > 0.3, centre
