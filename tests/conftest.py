"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture()
def disc_image(tmp_path):
    """A 32x32 RGBA PNG of a red disc on transparency: the input of the tiny end-to-end runs."""
    import imageio.v3 as iio
    import numpy as np

    yy, xx = np.mgrid[:32, :32]
    img = np.zeros((32, 32, 4), np.uint8)
    img[(xx - 15.5) ** 2 + (yy - 15.5) ** 2 < 81] = [200, 60, 40, 255]
    iio.imwrite(tmp_path / "disc.png", img)
    return str(tmp_path / "disc.png")
