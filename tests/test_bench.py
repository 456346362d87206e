"""GSO folders, render-gso, and the bench runner (resume, failures, summaries, Ray backend)."""

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from lift3d.bench import main as bench_main
from lift3d.bench import run_bench
from lift3d.data.gso import decode_depth, list_objects, load_object, read_metadata, render_gso
from lift3d.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = os.path.join(ROOT, "examples", "objects")
CONFIG = os.path.join(ROOT, "configs", "oracle.yaml")
SMALL = {"render_options": {"resolution": 32, "n_views": 2, "samples_per_pixel": 1},
         "eval_options": {"n_points": 3000, "iou_resolutions": (32,)}, "protocols": ("surface",)}


def fake_reconstruct(fail=(), log_dir=None, scale=1.0):
    """A stand-in for launch.py: 'reconstructs' the normalised ground truth (optionally scaled)."""

    def reconstruct(input_png, gt_mesh, out_dir, config, overrides):
        name = os.path.basename(out_dir)
        if log_dir:
            open(os.path.join(log_dir, f"{name}-{len(os.listdir(log_dir))}"), "w").close()
        assert os.path.isfile(input_png) and "data.default_elevation_deg=30.0" in overrides
        if name in fail:
            raise RuntimeError(f"boom on {name}")
        from lift3d.mesh.io import load_mesh

        mesh = load_mesh(gt_mesh, normalize=True)
        mesh = trimesh.Trimesh(mesh.vertices * scale, mesh.faces)
        trial = os.path.join(out_dir, "trial")
        os.makedirs(os.path.join(trial, "export"), exist_ok=True)
        mesh.export(os.path.join(trial, "export", "model.obj"))
        return trial

    return reconstruct


def test_gso_folder_loader():
    assert list_objects(DATASET) == ["car", "mug", "mushroom"]
    with pytest.raises(UserError, match="nope"):
        list_objects(DATASET, ["mug", "nope"])
    with pytest.raises(UserError, match="not found"):
        list_objects("/nonexistent")
    mesh = load_object(os.path.join(DATASET, "mug"))
    # GSO's texture quirk: the .mtl names texture.png beside it; the file is in materials/textures/.
    assert mesh.visual.kind == "texture" and mesh.visual.material.image is not None
    assert np.max(mesh.extents) == pytest.approx(1.0) and np.allclose(mesh.bounds.sum(0), 0, atol=1e-9)
    assert read_metadata(os.path.join(DATASET, "mug"))["name"] == "mug"


def test_render_gso_views_depth_and_cameras(tmp_path):
    out = str(tmp_path / "render")
    paths = render_gso(os.path.join(DATASET, "mug"), out, resolution=48, n_views=4, samples_per_pixel=1)
    meta = json.load(open(paths["cameras"]))
    assert [v["azimuth_deg"] for v in meta["views"]] == pytest.approx([0, 90, 180, 270])
    assert all(v["elevation_deg"] == 30 and v["distance"] == 1.5 for v in meta["views"])
    assert meta["views"][0]["fovy_deg"] == pytest.approx(49.134, abs=1e-3)
    rgba = iio.imread(os.path.join(out, "001.png"))
    assert rgba.shape == (48, 48, 4) and (rgba[..., 3] > 0).mean() > 0.1
    assert np.array_equal(iio.imread(paths["input"]), iio.imread(os.path.join(out, "000.png")))
    # Back-projecting the depth PNG lands on the normalised mesh's surface.
    view = meta["views"][1]
    depth = decode_depth(iio.imread(os.path.join(out, view["depth"])))
    assert ((depth > 0) == (rgba[..., 3] > 0)).mean() > 0.97
    K, c2w = np.array(view["K"]), np.array(view["c2w"])
    i, j = np.nonzero(depth > 0)
    z = depth[i, j]
    cam = np.stack([(j + 0.5 - K[0, 2]) / K[0, 0] * z, -(i + 0.5 - K[1, 2]) / K[1, 1] * z, -z], 1)
    world = cam @ c2w[:3, :3].T + c2w[:3, 3]
    pytest.importorskip("rtree")      # trimesh.proximity's triangle tree (the [test] extra)
    _, dist, _ = trimesh.proximity.closest_point(load_object(os.path.join(DATASET, "mug")), world)
    assert np.percentile(dist, 95) < 2e-3


def test_bench_records_failures_and_resumes(tmp_path):
    out, calls = str(tmp_path / "bench"), tmp_path / "calls"
    calls.mkdir()
    objects = ["mug", "car"]
    summary = run_bench(DATASET, CONFIG, out, objects=objects, **SMALL,
                        reconstruct=fake_reconstruct(fail=("car",), log_dir=str(calls)))
    assert summary["n_ok"] == 1 and summary["n_failed"] == 1
    mug = json.load(open(os.path.join(out, "results", "mug.json")))
    assert mug["status"] == "ok" and mug["metrics"]["surface"]["volume_iou"] > 0.95
    assert mug["seconds"]["total"] > 0
    car = json.load(open(os.path.join(out, "results", "car.json")))
    assert car["status"] == "failed" and "boom on car" in car["error"] and car["stage"] == "reconstruct"
    table = open(os.path.join(out, "summary.md")).read()
    assert "| mug | ok |" in table and "car failed: RuntimeError: boom on car" in table
    header = next(line for line in table.splitlines() if line.startswith("| object"))
    assert "surface Chamfer ↓" in header and "surface IoU ↑" in header and "Protocol: surface" in table
    # Ground truth above the reconstruction, 4 views of 128 px under their labels, a title line on top.
    assert mug["compare_image"] == os.path.join(out, "compare", "mug.png")
    assert iio.imread(mug["compare_image"]).shape == (18 + 2 * (14 + 128), 4 * 128, 3)
    assert not os.path.exists(os.path.join(out, "compare", "car.png"))
    # Re-run: only the failed object runs again; then nothing does.
    before = set(os.listdir(calls))
    assert before == {"mug-0", "car-1"}
    summary = run_bench(DATASET, CONFIG, out, objects=objects, **SMALL, reconstruct=fake_reconstruct(log_dir=str(calls)))
    assert set(os.listdir(calls)) - before == {"car-2"}
    assert summary["n_ok"] == 2
    run_bench(DATASET, CONFIG, out, objects=objects, **SMALL, reconstruct=fake_reconstruct(log_dir=str(calls)))
    assert len(os.listdir(calls)) == 3
    # The summary: per-object rows plus the mean, in CSV/JSON/Markdown.
    csv_lines = open(os.path.join(out, "summary.csv")).read().splitlines()
    assert csv_lines[0].startswith("object,status,surface/chamfer,surface/volume_iou")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["mug", "car", "mean"]
    data = json.load(open(os.path.join(out, "summary.json")))
    assert data["mean"]["surface/volume_iou"] > 0.95 and data["protocol_details"]["surface"]["name"] == "surface"
    assert "**mean**" in open(os.path.join(out, "summary.md")).read()


def test_bench_scores_reflect_the_reconstruction(tmp_path):
    summary = run_bench(DATASET, CONFIG, str(tmp_path), objects=["mushroom"], **SMALL,
                        reconstruct=fake_reconstruct(scale=0.8))
    row = summary["objects"][0]
    assert 0.4 < row["surface/volume_iou"] < 0.6          # about 0.8^3
    assert row["surface/chamfer"] > 0.01


def test_bench_cli_errors(tmp_path):
    with pytest.raises(UserError, match="backend"):
        run_bench(DATASET, CONFIG, str(tmp_path), backend="slurm")
    with pytest.raises(UserError, match="config 'nope.yaml' not found.*packaged configs: .*oracle"):
        run_bench(DATASET, "nope.yaml", str(tmp_path))
    with pytest.raises(UserError, match="protocol"):
        run_bench(DATASET, CONFIG, str(tmp_path), protocols=("chamfer9000",))
    with pytest.raises(UserError, match="unknown option"):
        bench_main(["--dataset", DATASET, "--config", CONFIG, "--out", str(tmp_path), "--bogus"])


def test_bench_finds_packaged_configs_by_name_as_launch_does(tmp_path):
    from lift3d.config import resolve_config

    for name in ("oracle", "oracle.yaml"):
        summary = run_bench(DATASET, name, str(tmp_path / name), objects=["mug"], **SMALL,
                            reconstruct=fake_reconstruct())
        assert summary["n_ok"] == 1
        result = json.load(open(os.path.join(str(tmp_path / name), "results", "mug.json")))
        assert result["config"] == os.path.abspath(resolve_config("oracle"))
        assert result["config"].endswith("oracle.yaml")


def test_bench_ray_backend(tmp_path):
    ray = pytest.importorskip("ray")
    out = str(tmp_path / "bench")
    try:
        summary = run_bench(DATASET, CONFIG, out, objects=["mug", "car"], backend="ray", **SMALL,
                            reconstruct=fake_reconstruct(fail=("car",)))
    finally:
        ray.shutdown()
    assert summary["n_ok"] == 1 and summary["n_failed"] == 1
    result = json.load(open(os.path.join(out, "results", "mug.json")))
    assert result["status"] == "ok" and result["metrics"]["surface"]["volume_iou"] > 0.95
    assert "boom on car" in json.load(open(os.path.join(out, "results", "car.json")))["error"]


def test_render_gso_command(tmp_path, capsys):
    from lift3d.data.gso import render_main

    out = str(tmp_path / "r")
    assert render_main(["--object", os.path.join(DATASET, "car"), "--out", out, "--resolution", "24",
                        "--views", "3", "--samples-per-pixel", "1", "--shading", "albedo"]) == 0
    assert sorted(os.listdir(out)) == ["000-depth.png", "000.png", "001-depth.png", "001.png", "002-depth.png",
                                       "002.png", "cameras.json", "input.png"]
    assert capsys.readouterr().out.strip() == os.path.join(out, "cameras.json")
    with pytest.raises(UserError, match="square"):
        render_main(["--object", os.path.join(DATASET, "car"), "--out", out, "--samples-per-pixel", "3"])
    with pytest.raises(UserError, match="not a GSO object folder"):
        render_main(["--object", DATASET, "--out", out])


KILLED_RUN = """
import os, sys, time
sys.path.insert(0, {root!r})
import trimesh
from lift3d.bench import run_bench
from lift3d.mesh.io import load_mesh

def reconstruct(input_png, gt_mesh, out_dir, config, overrides):
    if os.path.basename(out_dir) == "car":
        open(os.path.join({marker!r}), "w").close()
        time.sleep(120)                      # killed here
    trial = os.path.join(out_dir, "trial")
    os.makedirs(os.path.join(trial, "export"), exist_ok=True)
    mesh = load_mesh(gt_mesh, normalize=True)
    trimesh.Trimesh(mesh.vertices, mesh.faces).export(os.path.join(trial, "export", "model.obj"))
    return trial

run_bench({dataset!r}, {config!r}, {out!r}, objects=["mug", "car"], reconstruct=reconstruct,
          render_options={render!r}, eval_options={evalopts!r}, protocols=("surface",))
"""


def test_bench_resumes_after_being_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out, marker = str(tmp_path / "bench"), str(tmp_path / "car-started")
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(root=ROOT, marker=marker, dataset=DATASET, config=CONFIG, out=out,
                                        render=SMALL["render_options"], evalopts=SMALL["eval_options"]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert os.path.exists(marker), "the first run never reached the second object"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(os.listdir(os.path.join(out, "results"))) == ["mug.json"]      # no half-written files
    calls = tmp_path / "calls"
    calls.mkdir()
    summary = run_bench(DATASET, CONFIG, out, objects=["mug", "car"], **SMALL,
                        reconstruct=fake_reconstruct(log_dir=str(calls)))
    assert os.listdir(calls) == ["car-0"] and summary["n_ok"] == 2


@pytest.mark.slow
def test_bench_end_to_end_with_launch(tmp_path):
    """The real engine: a few oracle steps on a tiny grid through launch.py's code path."""
    overrides = ("trainer.max_steps=10", "trainer.val_every=0", "trainer.ckpt_every=0",
                 "system.geometry.grid_size=32", "data.height=16", "data.width=16", "data.reference_height=32",
                 "data.reference_width=32", "data.n_test_views=2", "data.n_val_views=1", "data.eval_height=16",
                 "data.eval_width=16", "system.renderer.num_samples_per_ray=32", "system.export.resolution=32",
                 "system.export.texture_size=64", "system.export.threshold=0.4")
    out = str(tmp_path / "bench")
    summary = run_bench(DATASET, "oracle", out, objects=["car"], overrides=overrides, **SMALL)   # by name, as launch
    row = summary["objects"][0]
    assert row["status"] == "ok", row["error"]
    result = json.load(open(os.path.join(out, "results", "car.json")))
    trial = result["trial_dir"]
    assert trial == os.path.join(out, "objects", "car", "trial", "oracle")
    for name in ("model.obj", "model.mtl", "model.png", "model.glb"):
        assert os.path.isfile(os.path.join(trial, "export", name))
    assert os.path.isfile(os.path.join(trial, "metrics.json")) and 0 < row["surface/volume_iou"] <= 1
    with pytest.raises(UserError, match="unknown config key"):
        run_bench(DATASET, CONFIG, out, objects=["car"], overrides=("system.nonsense=1",), force=True)
