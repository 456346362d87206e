"""The tiny random Zero123 folder and the reference view that the Zero123 guidance tests (test_vsd.py,
test_zero123_guidance.py) share: their expected numbers are computed against this seed and this view.
A test module imports ``model_dir`` (a module-scoped fixture: one folder per importing module) and
``reference``; pytest puts tests/ on sys.path."""

import pytest
import torch

from lift3d.cameras import Cameras
from lift3d.data.reference import ReferenceView
from lift3d.zero123.random_model import random_zero123

REF = dict(elevation=20.0, azimuth=0.0, distance=2.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("zero123") / "tiny")
    random_zero123("tiny", seed=1).save_pretrained(path)
    return path


def reference(size=64):
    rgba = torch.rand(size, size, 4, generator=torch.Generator().manual_seed(0))
    camera = Cameras.from_spherical(REF["elevation"], REF["azimuth"], REF["distance"], 40.0, size, size)
    return ReferenceView(rgba, camera)
