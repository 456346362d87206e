"""Reference-image preprocessing and the single-image data module."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lift3d.data.image import ZERO123_FOREGROUND_RATIO, load_reference_image
from lift3d.errors import ConfigError, UserError
from lift3d.registry import find


def write_png(path, array):
    Image.fromarray((np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)
    return str(path)


def ellipse_rgba(h, w, cy, cx, ry, rx, colour=(1.0, 0.0, 0.0), background=(0.0, 1.0, 0.0)):
    """An opaque ellipse on a transparent background whose hidden colour is ``background``."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    rgba = np.zeros((h, w, 4))
    rgba[..., :3] = background
    rgba[inside, :3] = colour
    rgba[..., 3] = inside
    return rgba


def bbox(alpha):
    rows, cols = np.nonzero(alpha.any(1))[0], np.nonzero(alpha.any(0))[0]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


# --------------------------------------------------------------------------- load_reference_image


@pytest.mark.parametrize("ry,rx", [(20, 40), (35, 12)])
def test_recentre_puts_object_in_the_middle_at_the_ratio(tmp_path, ry, rx):
    path = write_png(tmp_path / "obj.png", ellipse_rgba(200, 160, 50, 45, ry, rx))
    rgba = load_reference_image(path, 128).numpy()
    assert rgba.shape == (128, 128, 4)
    top, bottom, left, right = bbox(rgba[..., 3] > 0.5)
    assert abs((top + bottom) / 2 - 64) <= 1 and abs((left + right) / 2 - 64) <= 1
    assert abs(max(bottom - top, right - left) - ZERO123_FOREGROUND_RATIO * 128) <= 2
    # Aspect ratio is kept.
    assert abs((right - left) / (bottom - top) - rx / ry) < 0.1


def test_resize_does_not_bleed_the_colour_of_transparent_pixels(tmp_path):
    path = write_png(tmp_path / "obj.png", ellipse_rgba(300, 300, 150, 150, 60, 60, background=(0, 1, 0)))
    rgba = load_reference_image(path, 64, 0.5).numpy()
    visible = rgba[..., 3] > 0.02
    assert rgba[visible, 1].max() < 0.02          # no green halo at the soft edge
    assert np.allclose(rgba[rgba[..., 3] > 0.99, 0], 1.0, atol=0.01)


def test_foreground_ratio_none_keeps_the_framing(tmp_path):
    source = ellipse_rgba(64, 64, 20, 44, 10, 8)
    path = write_png(tmp_path / "obj.png", source)
    rgba = load_reference_image(path, 64, None).numpy()
    assert np.allclose(rgba[..., 3], source[..., 3], atol=1 / 255)
    half = load_reference_image(path, 32, None).numpy()      # only resized
    assert abs(half[..., 3].sum() * 4 - source[..., 3].sum()) < 0.02 * source[..., 3].sum()


def test_rgb_image_is_matted_from_the_border(tmp_path, caplog):
    rgba = ellipse_rgba(120, 100, 60, 50, 30, 25, colour=(0.8, 0.1, 0.1))
    rgb = np.where(rgba[..., 3:] > 0, rgba[..., :3], 0.92)
    rgb = rgb + np.random.default_rng(0).normal(0, 0.01, rgb.shape)     # a bit of sensor noise
    path = write_png(tmp_path / "photo.png", rgb)
    with caplog.at_level(logging.WARNING):
        out = load_reference_image(path, (120, 100), None).numpy()
    assert "matted" in caplog.text
    mask, truth = out[..., 3] > 0.5, rgba[..., 3] > 0.5
    assert (mask & truth).sum() / (mask | truth).sum() > 0.97
    assert np.allclose(out[mask, :3].mean(0), (0.8, 0.1, 0.1), atol=0.03)


def test_matting_keeps_large_holes_and_fills_specks(tmp_path):
    ring = ellipse_rgba(120, 120, 60, 60, 40, 40, colour=(0.1, 0.2, 0.8))[..., 3]
    hole = ellipse_rgba(120, 120, 60, 60, 18, 18)[..., 3]
    body = ring * (1 - hole)
    rgb = np.where(body[..., None] > 0, (0.1, 0.2, 0.8), 1.0)
    rgb[30, 60] = 1.0                                # a background-coloured speck on the object
    out = load_reference_image(write_png(tmp_path / "ring.png", rgb), 120, None).numpy()
    assert out[60, 60, 3] < 0.5                      # the hole of the ring stays transparent
    assert out[30, 60, 3] > 0.5                      # the one-pixel speck is filled


def test_no_foreground_is_a_user_error(tmp_path):
    empty = np.zeros((32, 32, 4))
    with pytest.raises(UserError, match="no foreground"):
        load_reference_image(write_png(tmp_path / "empty.png", empty), 32)
    with pytest.raises(UserError, match="no foreground"):
        load_reference_image(write_png(tmp_path / "white.png", np.ones((32, 32, 3))), 32)


def test_unusable_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError) as e:
        load_reference_image(str(tmp_path / "missing.png"), 32)
    assert "missing.png" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="cannot read image"):
        load_reference_image(str(bad), 32)
    busy = np.random.default_rng(0).random((32, 32, 3))          # no uniform background to matte
    with pytest.raises(UserError, match="uniform"):
        load_reference_image(write_png(tmp_path / "busy.png", busy), 32)


# --------------------------------------------------------------------------- SingleImageData


@pytest.fixture
def image_path(tmp_path):
    return write_png(tmp_path / "ref.png", ellipse_rgba(100, 100, 50, 50, 30, 20))


def test_registered_and_rejects_unknown_keys():
    cls = find("single-image")
    assert cls.__name__ == "SingleImageData"
    with pytest.raises(ConfigError, match="camera_distanse"):
        cls({"camera_distanse": 2.0})


def test_reference_view_and_camera(image_path):
    data = find("single-image")({"image_path": image_path, "default_elevation_deg": 30.0,
                                 "default_azimuth_deg": 20.0, "reference_height": 64, "reference_width": 64})
    ref = data.reference_view()
    assert ref is data.reference_view()                 # cached
    assert ref.rgba.shape == (64, 64, 4) and ref.camera.height == 64
    p = ref.camera.position[0]
    assert torch.allclose(p.norm(), torch.tensor(2.0), atol=1e-5)
    assert math.isclose(math.degrees(math.asin(p[2] / 2.0)), 30.0, abs_tol=1e-3)
    assert math.isclose(math.degrees(math.atan2(p[1], p[0])), 20.0, abs_tol=1e-3)
    assert float(ref.camera.fovy_deg[0]) == pytest.approx(49.1)


def test_empty_image_path_and_missing_gt_are_user_errors(tmp_path):
    data = find("single-image")({})
    with pytest.raises(UserError, match="image=PATH"):
        data.reference_view()
    with pytest.raises(UserError, match="gt=PATH"):
        find("single-image")({"gt_mesh": str(tmp_path / "nope.obj")})


def test_sample_views_follow_ranges_and_milestones(image_path):
    data = find("single-image")({"image_path": image_path, "batch_size": [4, 2], "height": [16, 32],
                                 "width": [16, 32], "resolution_milestones": [10],
                                 "elevation_range": [0.0, 40.0], "azimuth_range": [-90.0, 90.0]})
    g = torch.Generator().manual_seed(0)
    views = data.sample_views(g)
    assert len(views) == 4 and (views.height, views.width) == (16, 16)
    assert torch.all(views.elevation_deg >= -1e-3) and torch.all(views.elevation_deg <= 40 + 1e-3)
    assert torch.all(views.azimuth_deg.abs() <= 90 + 1e-3)
    assert torch.allclose(views.distance, torch.full((4,), 2.0), atol=1e-5)   # null range: the reference's
    data.update_step(10)
    views = data.sample_views(g)
    assert len(views) == 2 and (views.height, views.width) == (32, 32)
    with pytest.raises(UserError, match="stages"):
        find("single-image")({"height": [16, 32, 64], "resolution_milestones": [10]})


def test_eval_orbits_start_at_the_reference_azimuth():
    data = find("single-image")({"default_elevation_deg": 15.0, "default_azimuth_deg": 30.0, "n_val_views": 3,
                                 "n_test_views": 8, "eval_height": 32, "eval_width": 48,
                                 "eval_camera_distance": 2.5})
    val, test = data.val_views(), data.test_views()
    assert len(val) == 3 and len(test) == 8 and (test.height, test.width) == (32, 48)
    assert float(test.azimuth_deg[0]) == pytest.approx(30.0, abs=1e-3)
    assert torch.allclose(test.elevation_deg, torch.full((8,), 15.0), atol=1e-3)
    assert torch.allclose(test.distance, torch.full((8,), 2.5), atol=1e-5)


def test_bundled_example_reference_view_lines_up_with_its_mesh():
    """The documented example set-up gives a reference view that the ground truth reproduces."""
    import json
    import os

    from lift3d.mesh import MeshRaycaster, load_mesh

    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    with open(os.path.join(examples, "mug.json")) as f:
        meta = json.load(f)
    data = find("single-image")({
        "image_path": os.path.join(examples, meta["image"]), "foreground_ratio": None,
        "default_elevation_deg": meta["elevation_deg"], "default_azimuth_deg": meta["azimuth_deg"],
        "default_camera_distance": meta["camera_distance"], "default_fovy_deg": meta["fovy_deg"]})
    ref = data.reference_view()
    gt = MeshRaycaster(load_mesh(os.path.join(examples, meta["object"], "meshes", "model.obj"), normalize=True))
    alpha = gt.render(ref.camera, shading=meta["shading"])["rgba"][0, ..., 3]
    a, b = alpha > 0.5, ref.mask[..., 0] > 0.5
    assert float((a & b).sum() / (a | b).sum()) > 0.97
