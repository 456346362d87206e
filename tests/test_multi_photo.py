"""Several input photos (issue 25, item 3): images=/cameras parsing, one-line errors, the shared framing,
nearest-photo conditioning with its per-view relative pose, every photo scored, and one photo unchanged."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lift3d.cameras import Cameras, zero123_pose
from lift3d.config import load_config, parse_overrides
from lift3d.data.image import load_reference_image, load_reference_images
from lift3d.data.reference import ReferenceView, nearest_reference, parse_reference_cameras
from lift3d.errors import UserError
from lift3d.registry import find

DEFAULTS = {"elevation_deg": 20.0, "azimuth_deg": 0.0, "camera_distance": 2.0, "fovy_deg": 40.0}


def write_png(path, h, w, box):
    """An opaque rectangle (top, bottom, left, right) on transparency."""
    rgba = np.zeros((h, w, 4), np.uint8)
    top, bottom, left, right = box
    rgba[top:bottom, left:right] = [200, 60, 40, 255]
    Image.fromarray(rgba).save(path)
    return str(path)


@pytest.fixture()
def photos(tmp_path):
    # The same object seen from the front (narrow) and the side (wide): 20 x 20 and 20 x 60 pixels.
    return [write_png(tmp_path / "front.png", 100, 100, (40, 60, 45, 65)),
            write_png(tmp_path / "side.png", 100, 100, (40, 60, 20, 80))]


def data(**cfg):
    return find("single-image", "data")({"reference_height": 32, "reference_width": 32, **cfg})


# --------------------------------------------------------------------------- parsing


def test_images_shorthand_and_command_line_cameras():
    cfg = parse_overrides(["images=[a.png,b.png]",
                           "data.reference_cameras=[{elevation_deg:30,azimuth_deg:0},{elevation_deg: 10, azimuth_deg: 90}]"])
    assert list(cfg.data.image_paths) == ["a.png", "b.png"]
    cams = parse_reference_cameras(list(cfg.data.reference_cameras), ["a.png", "b.png"], DEFAULTS, "data.reference_cameras")
    assert [(c["elevation_deg"], c["azimuth_deg"], c["camera_distance"]) for c in cams] == [(30, 0, 2.0), (10, 90, 2.0)]
    short = parse_reference_cameras([[30, 0], [10, 90, 1.5, 45]], ["a", "b"], DEFAULTS, "x")
    assert short[1] == {"elevation_deg": 10, "azimuth_deg": 90, "camera_distance": 1.5, "fovy_deg": 45}


def test_cameras_from_render_gso_json_by_file_name(tmp_path):
    views = [{"index": i, "image": f"{i:03d}.png", "elevation_deg": 30.0, "azimuth_deg": 90.0 * i, "distance": 1.5,
              "fovy_deg": 49.13, "c2w": [[1, 0, 0, 0]] * 4} for i in range(4)]
    path = tmp_path / "cameras.json"
    path.write_text(json.dumps({"views": views, "input_view": 0}))
    cams = parse_reference_cameras(str(path), ["out/002.png", "out/000.png"], DEFAULTS, "data.reference_cameras")
    assert [c["azimuth_deg"] for c in cams] == [180.0, 0.0] and cams[0]["camera_distance"] == 1.5
    (tmp_path / "list.json").write_text(json.dumps([[30, 0], {"elevation_deg": 5, "azimuth_deg": 45}]))
    cams = parse_reference_cameras(str(tmp_path / "list.json"), ["a", "b"], DEFAULTS, "w")
    assert cams[1]["elevation_deg"] == 5 and cams[1]["fovy_deg"] == 40.0


def test_the_primary_photo_defines_azimuth_zero(photos):
    d = data(image_paths=photos, reference_cameras=[[30, 40], [10, 130]], default_azimuth_deg=0.0)
    assert [c["azimuth_deg"] for c in d.cameras] == [0.0, 90.0]
    assert torch.allclose(d.reference_camera(1).spherical, torch.tensor([[10.0, 90.0, 2.0]]), atol=1e-4)
    views = d.reference_views()
    assert len(views) == 2 and views[0] is d.reference_view() and views[1].path == photos[1]
    # Evaluation orbits start at the primary photo's camera.
    assert float(d.val_views().elevation_deg[0]) == pytest.approx(30.0, abs=1e-4)


@pytest.mark.parametrize("cfg,message", [
    (lambda p: {"image_paths": p}, "2 photos but no data.reference_cameras"),
    (lambda p: {"image_paths": p, "reference_cameras": [[30, 0]]}, "gives 1 camera for 2 photos"),
    (lambda p: {"image_paths": p, "reference_cameras": [[30, 0], [30]]}, "must be [elevation, azimuth"),
    (lambda p: {"image_paths": p, "reference_cameras": [[30, 0], {"elevation": 3, "azimuth_deg": 9}]}, "unknown key 'elevation'"),
    (lambda p: {"image_paths": p, "reference_cameras": [[30, 0], [95, 0]]}, "elevation_deg is 95"),
    (lambda p: {"image_paths": p, "reference_cameras": [[30, 0], ["up", 0]]}, "must be a number"),
    (lambda p: {"image_paths": p, "reference_cameras": "/nonexistent/cameras.json"}, "not found"),
    (lambda p: {"image_path": p[1], "image_paths": p, "reference_cameras": [[30, 0], [30, 90]]}, "both data.image_path"),
    (lambda p: {"reference_cameras": [[30, 0]]}, "given but no photo"),
])
def test_bad_input_is_one_line(photos, cfg, message):
    with pytest.raises(UserError) as e:
        data(**cfg(photos)).reference_views()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_photo_is_named(photos, tmp_path):
    d = data(image_paths=[photos[0], str(tmp_path / "gone.png")], reference_cameras=[[30, 0], [30, 90]])
    with pytest.raises(UserError, match="gone.png") as e:
        d.reference_views()
    assert "\n" not in str(e.value)


def test_json_without_a_view_for_a_photo(tmp_path, photos):
    path = tmp_path / "cameras.json"
    path.write_text(json.dumps({"views": [{"image": "000.png", "elevation_deg": 30, "azimuth_deg": 0}]}))
    with pytest.raises(UserError, match="no view for front.png, side.png"):
        data(image_paths=photos, reference_cameras=str(path))


def test_load_config_takes_images_and_not_the_example(photos, tmp_path):
    cfg = load_config("zero123-sjc-cpu", [f"images=[{photos[0]},{photos[1]}]", "data.reference_cameras=[[30,0],[30,90]]"])
    assert list(cfg.data.image_paths) == photos and not cfg.data.image_path and not cfg.data.get("gt_mesh")


# --------------------------------------------------------------------------- framing


def test_one_zoom_for_all_photos(photos):
    front, side = load_reference_images(photos, 64, 0.5)
    width = lambda im: int((im[..., 3] > 0.5).any(0).sum())    # noqa: E731
    # The wide side view fills half the frame; the front view keeps its size relative to it (1/3), both centred.
    assert width(side) == pytest.approx(32, abs=1) and width(front) == pytest.approx(32 / 3, abs=1)
    cols = torch.nonzero((front[..., 3] > 0.5).any(0)).flatten()
    assert abs((int(cols[0]) + int(cols[-1]) + 1) / 2 - 32) <= 1
    # One photo: exactly the single-image preprocessing.
    assert torch.equal(load_reference_images(photos[:1], 64, 0.5)[0], load_reference_image(photos[0], 64, 0.5))
    kept = load_reference_images(photos, 50, None)
    assert torch.equal(kept[1], load_reference_image(photos[1], 50, None))


# --------------------------------------------------------------------------- nearest photo


def test_nearest_reference_by_direction():
    refs = Cameras.from_spherical([30.0, 30.0, 0.0], [0.0, 90.0, 180.0], [2.0, 1.5, 3.0], 40.0, 8, 8)
    views = Cameras.from_spherical([20.0, 0.0, 10.0, 80.0], [30.0, 80.0, -150.0, 0.0], 2.0, 40.0, 8, 8)
    assert nearest_reference(views, refs).tolist() == [0, 1, 2, 0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lift3d.zero123.random_model import random_zero123

    path = str(tmp_path_factory.mktemp("zero123") / "tiny")
    random_zero123("tiny", seed=1).save_pretrained(path)
    return path


def reference(azimuth, seed, size=32):
    rgba = torch.rand(size, size, 4, generator=torch.Generator().manual_seed(seed))
    return ReferenceView(rgba, Cameras.from_spherical(20.0, azimuth, 2.0, 40.0, size, size))


def prior(model_dir, references, **cfg):
    from lift3d.guidance.base import GuidanceContext

    p = find("zero123", "prior")({"pretrained_model_name_or_path": model_dir, **cfg})
    p.prepare(references, GuidanceContext(device=torch.device("cpu")))
    return p


@pytest.mark.parametrize("variant", ["zero123", "stable"])
def test_each_view_is_conditioned_on_its_nearest_photo(model_dir, variant):
    a, b = reference(0.0, 0), reference(90.0, 1)
    two = prior(model_dir, [a, b], pose_variant=variant)
    only_a, only_b = prior(model_dir, a, pose_variant=variant), prior(model_dir, b, pose_variant=variant)
    views = Cameras.from_spherical([40.0, 0.0, 10.0], [10.0, 100.0, -20.0], [2.2, 1.8, 2.0], 40.0, 8, 8)
    # The relative pose of each view against its own photo's camera.
    expected = torch.cat([zero123_pose(views[0], a.camera, variant == "stable"),
                          zero123_pose(views[1], b.camera, variant == "stable"),
                          zero123_pose(views[2], a.camera, variant == "stable")])
    assert torch.allclose(two.poses(views), expected)
    assert torch.allclose(two.poses(views)[1:2], only_b.poses(views[1]))
    # The batched conditions are each photo's, and the noise is what the one-photo prior of that photo predicts.
    s = two.latent_size
    noisy = torch.randn(3, 4, s, s, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500, 300, 700])
    eps = two.predict_noise(noisy, t, views, 3.0)
    singles = torch.cat([only_a.predict_noise(noisy[0:1], t[0:1], views[0], 3.0),
                         only_b.predict_noise(noisy[1:2], t[1:2], views[1], 3.0),
                         only_a.predict_noise(noisy[2:3], t[2:3], views[2], 3.0)])
    assert torch.allclose(eps, singles, atol=1e-5)


def test_one_photo_as_a_list_is_the_one_photo(model_dir):
    a = reference(0.0, 0)
    listed, single = prior(model_dir, [a]), prior(model_dir, a)
    views = Cameras.from_spherical([40.0, 0.0], [10.0, 100.0], 2.0, 40.0, 8, 8)
    noisy = torch.randn(2, 4, single.latent_size, single.latent_size, generator=torch.Generator().manual_seed(3))
    assert torch.equal(listed.predict_noise(noisy, 400, views, 3.0), single.predict_noise(noisy, 400, views, 3.0))


def test_generate_uses_the_nearest_photo(model_dir):
    a, b = reference(0.0, 0), reference(180.0, 1)
    two, only_b = prior(model_dir, [a, b]), prior(model_dir, b)
    view = Cameras.from_spherical(20.0, 170.0, 2.0, 40.0, 8, 8)
    assert torch.equal(two.generate(view, [5], steps=2), only_b.generate(view, [5], steps=2))


@pytest.mark.parametrize("coarse", ["none", "estimate"])
def test_cascade_refines_each_view_with_its_nearest_photo(tmp_path, model_dir, coarse):
    from lift3d.zero123.cascade import CascadeLayout
    from lift3d.zero123.random_model import random_zero123

    refiner = str(tmp_path / "refiner")
    random_zero123("tiny", seed=2).save_pretrained(refiner)
    CascadeLayout(nearby=[[0, 45, 0], [30, 0, 0]], base_model=model_dir).save(refiner)
    cfg = {"refiner_name_or_path": refiner, "prompt_steps": 2, "prompt_cache_dir": "none", "coarse_token": coarse}
    a, b = reference(0.0, 0), reference(180.0, 1)

    def cascade(references, trial):
        from lift3d.guidance.base import GuidanceContext

        p = find("cascade-zero123", "prior")({"pretrained_model_name_or_path": model_dir, **cfg})
        p.prepare(references, GuidanceContext(device=torch.device("cpu"), trial_dir=str(tmp_path / trial)))
        return p

    two, only_a, only_b = cascade([a, b], "two"), cascade(a, "a"), cascade(b, "b")
    assert (tmp_path / "two" / "save" / "self_prompts" / "photo2" / "prompts.json").is_file()
    assert torch.equal(two.other_prompts[0][0], only_b.prompt_images) and len(two.validation_images()) == 4
    views = Cameras.from_spherical([40.0, 10.0, 0.0], [170.0, 20.0, -160.0], 2.0, 40.0, 8, 8)
    noisy = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500, 300, 700])
    eps = two.predict_noise(noisy, t, views, 3.0)
    singles = torch.cat([only_b.predict_noise(noisy[0:1], t[0:1], views[0], 3.0),
                         only_a.predict_noise(noisy[1:2], t[1:2], views[1], 3.0),
                         only_b.predict_noise(noisy[2:3], t[2:3], views[2], 3.0)])
    assert torch.allclose(eps, singles, atol=1e-5)


# --------------------------------------------------------------------------- the run


TINY = """
name: multi
tag: t
use_timestamp: false
trainer: {max_steps: 2, val_every: 0, ckpt_every: 0, device: cpu, num_threads: 1}
data: {reference_height: 32, reference_width: 32, height: 16, width: 16, foreground_ratio: null, batch_size: 1,
       n_val_views: 1, n_test_views: 1, eval_height: 16, eval_width: 16}
system:
  geometry: {grid_size: 16, radius: 0.6}
  renderer: {num_samples_per_ray: 16, use_occupancy_grid: false}
  guidance_type: null
  loss: {lambda_guidance: 0.0, lambda_rgb: 1.0, lambda_mask: 1.0}
"""


def experiment(tmp_path, *overrides):
    from lift3d.runner import Experiment

    path = tmp_path / "multi.yaml"
    path.write_text(TINY)
    return Experiment(load_config(str(path), [f"exp_root_dir={tmp_path / 'out'}", *overrides]))


def test_every_photo_gets_the_reference_losses(tmp_path, photos):
    exp = experiment(tmp_path, f"images=[{photos[0]},{photos[1]}]", "data.reference_cameras=[[30,0],[30,90]]")
    exp.system.setup(exp.data, exp.context(), train=True)
    torch.manual_seed(0)
    out = exp.system.training_step(exp.data.sample_views(), 0)
    ctx = exp.system._step_context
    assert ctx.outputs["reference"]["opacity"].shape[0] == 2 and ctx.reference_mask.shape[0] == 2
    # The mask loss is the mean over both photos' pixels: each photo's own term, averaged.
    opacity = ctx.outputs["reference"]["opacity"].detach()
    each = [float(((opacity[i] - ctx.reference_mask[i]) ** 2).mean()) for i in range(2)]
    assert float(out["loss_mask"]) == pytest.approx(sum(each) / 2, rel=1e-5)
    assert exp.system.reference_batch(exp.data) == 2


def test_reference_views_per_step_draws_some(tmp_path, photos):
    exp = experiment(tmp_path, f"images=[{photos[0]},{photos[1]}]", "data.reference_cameras=[[30,0],[30,90]]",
                     "system.reference_views_per_step=1", "system.reference_stride=2")
    exp.system.setup(exp.data, exp.context(), train=True)
    exp.system.training_step(exp.data.sample_views(), 0)
    ctx = exp.system._step_context
    assert ctx.outputs["reference"]["opacity"].shape[:3] == (1, 16, 16) and exp.system.reference_batch(exp.data) == 1


def test_one_photo_by_images_is_the_one_photo_run(tmp_path, photos):
    def first_loss(*overrides):
        exp = experiment(tmp_path, *overrides, "system.reference_stride=2")
        exp.system.setup(exp.data, exp.context(), train=True)
        torch.manual_seed(0)
        out = exp.system.training_step(exp.data.sample_views(), 0)
        return [float(out[k].detach()) for k in ("loss", "loss_rgb", "loss_mask")]

    assert first_loss(f"image={photos[0]}") == first_loss(f"images=[{photos[0]}]")
    assert not math.isnan(first_loss(f"image={photos[0]}")[0])


def test_the_export_uses_every_photo_and_one_photo_as_a_list_exports_the_same(tmp_path, photos):
    from lift3d.export.mesh import export_mesh

    exp = experiment(tmp_path, f"images=[{photos[0]},{photos[1]}]", "data.reference_cameras=[[30,0],[30,90]]",
                     "system.export.resolution=24", "system.export.texture_size=64", "system.export.bake_size=16",
                     "system.export.relative_threshold=null")
    exp.system.setup(exp.data, exp.context(), train=False)
    with torch.no_grad():       # a ball of density the photos' masks then carve
        grid = exp.system.geometry.density_raw
        grid.copy_(torch.full_like(grid, 5.0))
    both = exp.system.export(str(tmp_path / "both"))
    info = json.load(open(both["info"]))
    assert "mask_fit_photo2" in info and "2 photos" in info["bake"] and len(info["other_photo_cameras"]) == 1
    assert "(2 photos)" in info["level_method"]
    primary = exp.system.reference
    one = export_mesh(exp.system.geometry, str(tmp_path / "one"), exp.system.cfg.export, reference=primary,
                      render=exp.system._bake_render, eval_size=16)
    listed = export_mesh(exp.system.geometry, str(tmp_path / "listed"), exp.system.cfg.export, reference=[primary],
                         render=exp.system._bake_render, eval_size=16)
    a, b = json.load(open(one["info"])), json.load(open(listed["info"]))
    for key in ("faces", "threshold", "level_method", "mask_fit", "bake", "texels_seen"):
        assert a[key] == b[key], key
    assert open(one["obj"]).read() == open(listed["obj"]).read()


def test_bench_gives_rendered_views_as_photos(tmp_path):
    from lift3d.bench import build_parser, run_bench

    seen = []

    def reconstruct(input_png, gt, out_dir, config, overrides):
        seen.append((input_png, overrides))
        raise RuntimeError("stop after the arguments")       # recorded as a failed object

    dataset = str(tmp_path / "objects")
    import shutil

    from lift3d.data.gso import mesh_path

    shutil.copytree("lift3d/examples/objects/car", f"{dataset}/car")
    assert mesh_path(f"{dataset}/car")
    run_bench(dataset, "zero123-sjc-cpu", str(tmp_path / "out"), reconstruct=reconstruct, photos=[0, 2],
              render_options={"resolution": 16, "n_views": 4, "samples_per_pixel": 1}, protocols=("surface",))
    (input_png, overrides), = seen
    render = tmp_path / "out" / "objects" / "car" / "render"
    assert input_png == str(render / "000.png")
    assert f"images=[{render / '000.png'},{render / '002.png'}]" in overrides
    assert f"data.reference_cameras={render / 'cameras.json'}" in overrides
    result = json.load(open(tmp_path / "out" / "results" / "car.json"))
    assert result["photos"] == [0, 2] and result["status"] == "failed"
    assert build_parser().parse_args(["--dataset", "d", "--config", "c", "--out", "o", "--photos", "0,8"]).photos == [0, 8]
    seen.clear()
    run_bench(dataset, "zero123-sjc-cpu", str(tmp_path / "out2"), reconstruct=reconstruct, photos=[0, 9],
              render_options={"resolution": 16, "n_views": 4, "samples_per_pixel": 1}, protocols=("surface",))
    bad = json.load(open(tmp_path / "out2" / "results" / "car.json"))
    assert "--photos 9 is not a rendered view" in bad["error"] and not seen
