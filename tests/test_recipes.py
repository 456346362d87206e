"""Issue 13: published-weight configs fall back to the bundled model's own recipe (and say so), a user's
image does not inherit a bundled example's settings, a run that would not fit in memory stops before
training in one line, and the GPU check refuses cleanly without CUDA."""

import logging
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lift3d.config import PACKAGE_DIR, load_config
from lift3d.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(PACKAGE_DIR, "assets", "zero123-mini")
CAR = os.path.join(ROOT, "examples", "car_rgba.png")


@pytest.fixture(autouse=True)
def no_models(tmp_path, monkeypatch):
    """An empty published-weights folder, whatever the machine has."""
    monkeypatch.setenv("LIFT3D_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("name,recipe", [("zero123-sjc", "recipes/zero123-mini.yaml"),
                                         ("zero123-sds", "recipes/zero123-mini.yaml"),
                                         ("stable-zero123", "recipes/zero123-mini.yaml"),
                                         ("cascade-zero123", "recipes/cascade-mini.yaml")])
def test_without_published_weights_the_mini_model_runs_its_own_recipe(name, recipe, caplog):
    overrides = [f"image={CAR}", "data.default_elevation_deg=10"]
    cfg = load_config(name, overrides)
    mini = load_config(recipe, overrides)
    assert cfg.name == name and cfg.applied.recipe == recipe
    assert cfg.system.guidance.pretrained_model_name_or_path == MINI
    for key in ("data", "trainer"):
        assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(mini[key])
    assert cfg.system.geometry == mini.system.geometry and cfg.trainer.max_steps == 400
    lines = [w for w in warnings(caplog) if "no published weights" in w]
    assert len(lines) == 1 and len(warnings(caplog)) == 1    # one line; the elevation was given
    assert recipe in lines[0] and "pretrained_model_name_or_path=PATH" in lines[0] and "\n" not in lines[0]


def test_a_recipe_that_extends_another_and_changes_its_guidance_keeps_the_shared_keys(caplog):
    """recipes/cascade-mini.yaml extends zero123-mini.yaml and switches zero123-sjc to cascade-zero123: the
    guidance keys both plugins have stay (issue 23 drops only the keys the new plugin lacks), silently."""
    cfg = load_config("cascade-zero123")
    mini = load_config("recipes/zero123-mini.yaml")
    assert cfg.system.guidance_type == "cascade-zero123" and cfg.system.guidance.refiner_name_or_path
    for key, value in mini.system.guidance.items():
        assert cfg.system.guidance[key] == value, key
    assert not [w for w in warnings(caplog) if "dropped" in w]
    # the fallback recipe, then a command-line switch: the mini recipe's guidance keys leave in one line
    oracle = load_config("zero123-sjc", [f"image={CAR}", "data.default_elevation_deg=10",
                                         "system.guidance_type=multiview-oracle"])
    assert oracle.applied.recipe == "recipes/zero123-mini.yaml" and OmegaConf.to_container(oracle.system.guidance) == {}
    lines = [w for w in warnings(caplog) if "dropped" in w]
    assert len(lines) == 1 and lines[0].startswith("system.guidance_type: zero123-sjc -> multiview-oracle; dropped "
                                                   "system.guidance.pretrained_model_name_or_path, ")


def test_published_weights_given_or_found_keep_the_published_recipe(no_models, caplog):
    given = load_config("zero123-sjc", [f"image={CAR}", "system.guidance.pretrained_model_name_or_path=/w/zero123-xl"])
    assert given.system.guidance.pretrained_model_name_or_path == "/w/zero123-xl"
    assert given.data.height == 32 and given.trainer.max_steps == 10000 and given.system.geometry.n_feature_dims == 4
    (no_models / "zero123").mkdir(parents=True)
    found = load_config("zero123-sjc", [f"image={CAR}"])
    assert found.system.guidance.pretrained_model_name_or_path == str(no_models / "zero123")
    assert OmegaConf.to_container(found.data) == OmegaConf.to_container(given.data)
    assert not any("no published weights" in w for w in warnings(caplog))
    assert "recipe" not in (found.get("applied") or {})


def test_a_user_image_gets_the_recipe_not_the_example(caplog):
    example = load_config("zero123-sjc-cpu")                                  # the README's main job
    assert example.data.gt_mesh.endswith("mushroom/meshes/model.obj") and example.data.foreground_ratio is None
    assert example.data.default_elevation_deg == 30.0 and not warnings(caplog)
    same = load_config("zero123-sjc-cpu", [f"image={os.path.join(ROOT, 'examples', 'mushroom_rgba.png')}"])
    assert os.path.samefile(same.data.pop("image_path"), example.data.pop("image_path"))
    assert OmegaConf.to_container(same.data) == OmegaConf.to_container(example.data)
    mine = load_config("zero123-sjc-cpu", [f"image={CAR}"])
    assert "gt_mesh" not in mine.data and "foreground_ratio" not in mine.data   # no ground truth; recentred
    assert mine.data.default_elevation_deg == 20.0
    line = [w for w in warnings(caplog) if "elevation" in w]
    assert len(line) == 1 and "20.0" in line[0] and "data.default_elevation_deg=E" in line[0]
    with_gt = load_config("zero123-sjc-cpu", [f"image={CAR}", "gt=examples/objects/car/meshes/model.obj",
                                              "data.default_elevation_deg=30"])
    assert with_gt.data.gt_mesh == "examples/objects/car/meshes/model.obj" and len(warnings(caplog)) == 1


def test_parsed_config_reloads_as_it_ran(tmp_path, caplog):
    cfg = load_config("zero123-sds", [f"image={CAR}"])
    parsed = tmp_path / "parsed.yaml"
    parsed.write_text(OmegaConf.to_yaml(cfg))
    caplog.clear()
    again = load_config(str(parsed), [])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert again.applied.recipe == "recipes/zero123-mini.yaml" and not warnings(caplog)


def test_dreamgaussian_without_weights_runs_the_gaussian_mini_recipe(caplog):
    cfg = load_config("dreamgaussian-zero123", [f"image={CAR}", "data.default_elevation_deg=10"])
    assert cfg.name == "dreamgaussian-zero123" and cfg.applied.recipe == "zero123-gs-cpu.yaml"
    assert cfg.system.geometry_type == "gaussians" and cfg.trainer.max_steps == 200
    assert cfg.system.guidance.pretrained_model_name_or_path == MINI
    assert any("running zero123-gs-cpu.yaml instead of dreamgaussian-zero123" in w for w in warnings(caplog))
    given = load_config("dreamgaussian-zero123", [f"image={CAR}", f"system.guidance.pretrained_model_name_or_path={MINI}"])
    assert given.applied.weights == "given" and given.trainer.max_steps == 500
    assert given.system.geometry.num_points == 5000 and list(given.data.height) == [128, 256, 512]


def test_memory_verdict_names_the_setting_to_lower():
    from lift3d.preflight import Estimate, verdict

    est = Estimate(parts={"baseline": 0.8, "model": 4.6, "render": 11.0, "vae": 0.9},
                   settings={"render": "system.renderer.train_chunk_samples (now 2097152)",
                             "vae": "system.guidance.encode_chunk (now 1)"})
    assert verdict(est, 20.0) is None
    message = verdict(est, 10.0)
    assert "lower system.renderer.train_chunk_samples (now 2097152)" in message and "\n" not in message
    assert "the model alone does not fit" in verdict(est, 4.0)


def test_a_run_that_does_not_fit_stops_before_the_model_loads(tmp_path, monkeypatch):
    from lift3d import preflight
    from lift3d.runner import Experiment

    cfg = load_config("zero123-sjc-cpu", [f"exp_root_dir={tmp_path}", "use_timestamp=false"])
    exp = Experiment(cfg)
    est = preflight.estimate_step_memory(exp.system, exp.data)
    assert set(est.parts) == {"baseline", "reference", "model", "render", "vae", "unet", "margin"}
    assert 0 < est.parts["model"] < 0.1
    monkeypatch.setattr(preflight, "available_gib", lambda: 1.0)
    monkeypatch.setattr(preflight, "_vm_bytes", lambda key: 0)
    with pytest.raises(UserError, match="lower system.renderer.train_chunk_samples") as e:
        exp.train()
    assert "\n" not in str(e.value) and exp.system.guidance is None and exp.step == 0


def test_memory_estimate_counts_the_guidance_batch_through_the_unet(tmp_path):
    from lift3d.preflight import estimate_step_memory
    from lift3d.runner import Experiment

    def parts(batch, chunk):
        cfg = load_config("zero123-sds", [f"exp_root_dir={tmp_path}", "use_timestamp=false", f"data.batch_size={batch}",
                                          "data.resolution_milestones=[]", f"system.guidance.unet_chunk={chunk}"])
        exp = Experiment(cfg)
        est = estimate_step_memory(exp.system, exp.data)
        return est.parts, est.settings

    (small, _), (large, _), (chunked, settings) = parts(4, 0), parts(12, 0), parts(12, 4)
    assert large["unet"] == pytest.approx(3 * small["unet"]) and small["unet"] > 0
    assert large["margin"] == pytest.approx(0.05 / 1.05 * sum(large.values()))
    # Four views per UNet pass: the pass holds four views' activations whatever the batch.
    assert chunked["unet"] == pytest.approx(small["unet"]) and "unet_chunk (now 4)" in settings["unet"]


def test_memory_estimate_counts_the_freed_tensors_glibc_keeps_without_a_threshold(tmp_path, monkeypatch):
    from lift3d.preflight import estimate_step_memory, verdict
    from lift3d.runner import Experiment
    from lift3d.utils import heap

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    exp = Experiment(load_config("zero123-sds", [f"exp_root_dir={tmp_path}", "use_timestamp=false"]))
    monkeypatch.setattr(heap, "_glibc", lambda: object())   # as on glibc, whatever this machine's C library
    with_threshold = estimate_step_memory(exp.system, exp.data, 4)
    without = estimate_step_memory(exp.system, exp.data, 0)
    assert "heap" not in with_threshold.parts
    assert without.parts["heap"] == pytest.approx(without.parts["render"] + without.parts["vae"])
    assert without.parts["heap"] > 0
    message = verdict(without, free_gib=without.total_gib - 0.5)
    assert "set trainer.mmap_threshold_mib=4 (now 0)" in message


def test_gpu_check_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_an_allocator_failure_ends_as_one_line(capsys):
    from lift3d import cli

    def oom(argv):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes.")

    assert cli.run(oom, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lower " in err and "system.renderer.train_chunk_samples" in err
    with pytest.raises(RuntimeError, match="unrelated"):
        cli.run(lambda argv: (_ for _ in ()).throw(RuntimeError("unrelated")), [])
