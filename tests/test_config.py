import dataclasses
import logging
import subprocess
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from omegaconf import OmegaConf

from lift3d.config import C, domain, load_config, number_arg, parse_config, parse_overrides, schedulable
from lift3d.errors import ConfigError


@dataclass
class Loss:
    lambda_rgb: Any = schedulable(1.0)
    lambda_mask: Any = schedulable(0.0)


@dataclass
class Sys:
    loss: Loss = field(default_factory=Loss)
    steps: int = 3
    name: str = "x"


def test_unknown_nested_key_names_key_and_neighbour():
    with pytest.raises(ConfigError) as e:
        parse_config(Sys, {"loss": {"lamda_rgb": 1}}, "system")
    msg = str(e.value)
    assert "system.loss.lamda_rgb" in msg and "lambda_rgb" in msg
    assert "\n" not in msg


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="system.steps"):
        parse_config(Sys, {"steps": "many"}, "system")


@pytest.mark.parametrize("bad", ["abc", [10, 1.0, 2.0], [10, 1.0, 2.0, 5], True])
def test_bad_schedules_are_rejected(bad):
    with pytest.raises(ConfigError, match="lambda_rgb"):
        parse_config(Sys, {"loss": {"lambda_rgb": bad}}, "system")


def test_schedules():
    assert C(3, 100) == 3.0
    s = [100, 1.0, 3.0, 300]
    assert C(s, 0) == 1.0 and C(s, 200) == pytest.approx(2.0) and C(s, 10**6) == 3.0
    piecewise = [100, 7, 5, 150, 10, 200]  # 7 at 100 -> 5 at 150 -> 10 at 200
    assert C(piecewise, 125) == pytest.approx(6.0)
    assert C(piecewise, 175) == pytest.approx(7.5)
    assert C(piecewise, 500) == 10.0
    parse_config(Sys, {"loss": {"lambda_rgb": piecewise}})


def test_overrides_shorthands():
    cfg = parse_overrides(["image=a.png", "gt=b.obj", "system.loss.lambda_rgb=100"])
    assert cfg.data.image_path == "a.png" and cfg.data.gt_mesh == "b.obj"
    assert cfg.system.loss.lambda_rgb == 100
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lambda_rgb"])


def test_extends_and_validation_before_build(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(textwrap.dedent("""
        name: base
        trainer: {max_steps: 5}
        system: {geometry_type: voxel-rf, geometry: {grid_size: 8}}
    """))
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\n")
    cfg = load_config(str(child), ["trainer.max_steps=7"])
    assert cfg.name == "child" and cfg.trainer.max_steps == 7 and cfg.system.geometry.grid_size == 8
    with pytest.raises(ConfigError, match="system.geometry.grid_sise"):
        load_config(str(child), ["system.geometry.grid_sise=4"])
    # the message lists the plugins valid for that key only
    with pytest.raises(ConfigError, match=r"unknown geometry plugin 'no-such-field'; valid: .*hashgrid-nerf.*voxel-rf") as e:
        load_config(str(child), ["system.geometry_type=no-such-field"])
    assert not any(other in str(e.value) for other in ("zero123", "sds", "single-image", "volume-renderer"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_import_is_light():
    code = ("import sys, lift3d; bad = [m for m in ('torch', 'diffusers', 'transformers', 'tinycudann', 'nerfacc') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_plugin_modules_do_not_import_diffusion_libraries():
    code = ("import sys, lift3d; lift3d.registered_names(); "
            "bad = [m for m in ('diffusers', 'transformers', 'tinycudann', 'nerfacc') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_packaged_configs_resolve_by_name_and_a_path_wins(tmp_path, monkeypatch):
    import os

    from lift3d.config import CONFIG_DIR, resolve_config

    monkeypatch.chdir(tmp_path)            # outside the repository: no configs/ here
    expected = os.path.join(CONFIG_DIR, "zero123-sjc-cpu.yaml")
    assert resolve_config("zero123-sjc-cpu") == resolve_config("zero123-sjc-cpu.yaml") == expected
    assert resolve_config("zero123-sjc") == os.path.join(CONFIG_DIR, "zero123-sjc.yaml")
    (tmp_path / "oracle.yaml").write_text("name: mine\n")
    assert resolve_config("oracle.yaml") == "oracle.yaml"          # an existing file wins over the name
    assert resolve_config("oracle") == os.path.join(CONFIG_DIR, "oracle.yaml")
    with pytest.raises(ConfigError, match="not found.*zero123-sjc-cpu") as e:
        resolve_config("no-such-config")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config("some/dir/zero123-sjc.yaml")                 # a path with a directory is not a name


def test_packaged_config_loads_outside_the_repository_with_packaged_examples(tmp_path, monkeypatch):
    import os

    from lift3d.config import PACKAGE_DIR

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIFT3D_MODELS", str(tmp_path / "models"))
    cfg = load_config("zero123-sjc-cpu")                  # extends recipes/zero123-mini.yaml, runs its example
    assert cfg.name == "zero123-sjc-cpu" and cfg.system.guidance_type == "zero123-sjc"
    assert cfg.data.image_path == os.path.join(PACKAGE_DIR, "examples", "mushroom_rgba.png")
    assert os.path.isfile(cfg.data.image_path) and os.path.isfile(cfg.data.gt_mesh)
    cfg = load_config("cascade-zero123")                  # no published weights: the packaged recipes/cascade-mini.yaml
    assert cfg.name == "cascade-zero123" and cfg.system.guidance_type == "cascade-zero123"
    assert os.path.isdir(cfg.system.guidance.refiner_name_or_path)
    cfg = load_config("oracle", ["image=${pkg:examples/car_rgba.png}"])
    assert cfg.data.image_path == os.path.join(PACKAGE_DIR, "examples", "car_rgba.png")
    with pytest.raises(ConfigError, match="no file examples/nope.png"):
        load_config("oracle", ["image=${pkg:examples/nope.png}"])


def test_extends_a_packaged_config_by_name(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: zero123-sjc-cpu\nname: mine\ntrainer: {max_steps: 3}\n")
    cfg = load_config(str(mine))
    assert cfg.name == "mine" and cfg.trainer.max_steps == 3 and cfg.trainer.device == "cpu"
    (tmp_path / "zero123-sjc-cpu.yaml").write_text("name: local-base\n")
    mine.write_text("extends: zero123-sjc-cpu.yaml\nname: mine\ntrainer: {max_steps: 3}\n")
    cfg = load_config(str(mine))                                    # a file next to it wins over the packaged one
    assert cfg.name == "mine" and "data" not in cfg and "device" not in cfg.trainer
    mine.write_text("extends: no-such-base\n")
    with pytest.raises(ConfigError, match="extends 'no-such-base'"):
        load_config(str(mine))


# --- issue 23: changing a plugin type (command line or `extends:`) trims its block to the new plugin's keys


def _said(caplog) -> list[str]:
    """The log lines about trimmed plugin blocks."""
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [line for line in lines if "_type: " in line or "=null:" in line]


def test_a_changed_plugin_type_drops_the_old_keys_in_one_line(caplog):
    cfg = load_config("oracle", ["system.geometry_type=hashgrid-nerf", "system.geometry.n_levels=8"])
    assert cfg.system.geometry_type == "hashgrid-nerf"
    # keys both plugins have stay, then what the override gives, on hashgrid-nerf's defaults
    assert OmegaConf.to_container(cfg.system.geometry) == {"radius": 0.6, "n_feature_dims": 3, "n_levels": 8}
    assert _said(caplog) == ["system.geometry_type: voxel-rf -> hashgrid-nerf; dropped system.geometry.grid_size "
                             "(not keys of hashgrid-nerf)"]
    caplog.clear()
    same = load_config("oracle", ["system.geometry_type=voxel-rf"])          # the same type: an ordinary merge
    assert same.system.geometry.grid_size == 128 and not _said(caplog)


def test_a_key_the_new_plugin_lacks_still_fails_when_given():
    with pytest.raises(ConfigError, match=r"unknown config key 'system.geometry.grid_size'.*n_levels") as e:
        load_config("oracle", ["system.geometry_type=hashgrid-nerf", "system.geometry.grid_size=64"])
    assert "\n" not in str(e.value)


def test_a_null_plugin_block_means_its_defaults(caplog):
    cfg = load_config("oracle", ["system.geometry=null"])
    assert cfg.system.geometry_type == "voxel-rf" and OmegaConf.to_container(cfg.system.geometry) == {}
    assert _said(caplog) == ["system.geometry=null: dropped system.geometry.radius, system.geometry.grid_size, "
                             "system.geometry.n_feature_dims (voxel-rf's defaults apply)"]
    caplog.clear()
    cfg = load_config("oracle", ["system.geometry=null", "system.geometry_type=hashgrid-nerf",
                                 "system.geometry.radius=1"])
    assert OmegaConf.to_container(cfg.system.geometry) == {"radius": 1}        # hashgrid-nerf's defaults only
    assert _said(caplog) == ["system.geometry_type: voxel-rf -> hashgrid-nerf; dropped system.geometry.grid_size, "
                             "system.geometry.n_feature_dims (system.geometry=null)"]


def test_a_config_that_extends_another_may_change_a_plugin_type(tmp_path, caplog):
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: oracle\nsystem:\n  guidance_type: zero123-sjc\n"
                    "  guidance: {pretrained_model_name_or_path: '${pkg:assets/zero123-mini}', render_space: rgb}\n")
    cfg = load_config(str(mine))
    assert OmegaConf.to_container(cfg.system.guidance).keys() == {"pretrained_model_name_or_path", "render_space"}
    assert cfg.system.geometry.grid_size == 128                         # blocks whose type stays are merged as before
    assert _said(caplog) == ["system.guidance_type: multiview-oracle -> zero123-sjc; dropped "
                             "system.guidance.mask_weight, system.guidance.depth_weight (not keys of zero123-sjc)"]
    # zero123-sjc-cpu extends recipes/zero123-mini.yaml; switching its guidance on the command line
    cfg = load_config("zero123-sjc-cpu", ["system.guidance_type=multiview-oracle", "system.guidance.depth_weight=0.5"])
    assert OmegaConf.to_container(cfg.system.guidance) == {"depth_weight": 0.5}
    with pytest.raises(ConfigError, match="unknown config key 'system.guidance.guidance_scale'"):
        load_config("zero123-sjc-cpu", ["system.guidance_type=multiview-oracle", "system.guidance.guidance_scale=3"])


def test_nested_plugin_types_and_default_types_change_too(caplog):
    from lift3d.config import merge_configs

    guidance = {"method_type": "sjc", "method": {"guidance_scale": 3.0, "var_red": False},   # prior_type: zero123
                "prior": {"pretrained_model_name_or_path": "m", "pose_variant": "x"}}            # by default
    base = OmegaConf.create({"system": {"guidance_type": "score-distillation", "guidance": guidance},
                             "data": {"height": 32}})
    over = OmegaConf.create({"system": {"guidance": {"prior_type": "cascade-zero123",
                                                     "prior": {"refiner_name_or_path": "r"}}},
                             "data_type": "single-image"})
    merged = merge_configs(base, over)
    assert OmegaConf.to_container(merged.system.guidance) == {
        "method_type": "sjc", "method": {"guidance_scale": 3.0, "var_red": False}, "prior_type": "cascade-zero123",
        "prior": {"pretrained_model_name_or_path": "m", "pose_variant": "x", "refiner_name_or_path": "r"}}
    assert merged.data.height == 32                                     # data_type is its default: unchanged
    assert not _said(caplog)                                            # cascade-zero123 has those keys: none dropped
    merged = merge_configs(base, OmegaConf.create({"system": {"guidance": {"method_type": "sds"}}}))
    assert OmegaConf.to_container(merged.system.guidance.method) == {"guidance_scale": 3.0}
    assert _said(caplog) == ["system.guidance.method_type: sjc -> sds; dropped system.guidance.method.var_red "
                             "(not keys of sds)"]
    caplog.clear()
    # no geometry_type anywhere: voxel-rf (the system's default) is the type that changes
    base = OmegaConf.create({"system": {"geometry": {"grid_size": 8}}})
    same = merge_configs(base, OmegaConf.create({"system": {"geometry_type": "voxel-rf"}}))
    assert same.system.geometry.grid_size == 8
    switched = merge_configs(base, OmegaConf.create({"system": {"geometry_type": "hashgrid-nerf"}}))
    assert OmegaConf.to_container(switched.system.geometry) == {}
    assert _said(caplog) == ["system.geometry_type: voxel-rf -> hashgrid-nerf; dropped system.geometry.grid_size "
                             "(not keys of hashgrid-nerf)"]


# --------------------------------------------------------------------------- domains (issue 26)


@dataclass
class Bounded:
    lr: float = domain(0.01, gt=0)
    betas: list = domain([0.9, 0.99], ge=0, lt=1, length=2)
    span: Optional[list] = domain(None, gt=0, length=2, ordered=True)
    steps: int = domain(3, ge=1)
    weight: Any = schedulable(1.0, ge=0)


@pytest.mark.parametrize("key, value, words", [
    ("lr", 0.0, "> 0"), ("lr", -1, "> 0"), ("betas", [0.9], "2 numbers"), ("betas", [2, 3], "[0, 1)"),
    ("span", [0, 0], "> 0"), ("span", [3, 1], "low to high"), ("steps", 0, ">= 1"), ("weight", -1, ">= 0"),
    ("weight", [0, 1.0, -1.0, 100], "each value of the schedule")])
def test_a_number_outside_its_declared_domain_names_its_key(key, value, words):
    with pytest.raises(ConfigError) as e:
        parse_config(Bounded, {key: value}, "system.x")
    assert str(e.value).startswith(f"system.x.{key} ") and words in str(e.value) and "\n" not in str(e.value)


def test_values_inside_their_domains_and_unset_options_pass():
    cfg = parse_config(Bounded, {"lr": 1e-4, "betas": [0.0, 0.5], "span": [1, 1], "weight": [0, 0.0, 2.0, 10]})
    assert cfg.lr == 1e-4 and cfg.span == [1, 1] and Bounded().betas is not Bounded().betas
    assert parse_config(Bounded, {}).span is None


def test_number_arg_checks_a_flag_where_it_is_declared(capsys):
    import argparse

    p = argparse.ArgumentParser(prog="lift3d x")
    p.add_argument("--steps", type=number_arg(int, ge=1, le=1000), default=50)
    p.add_argument("--scale", type=number_arg(float, ge=0), default=3.0)
    assert p.parse_args(["--steps", "7"]).steps == 7 and p.parse_args([]).scale == 3.0
    for argv, words in ((["--steps", "5000"], "argument --steps: must be a number in [1, 1000], got 5000"),
                        (["--scale", "nan"], "argument --scale: must be a finite number >= 0"),
                        (["--steps", "1.5"], "argument --steps: expected a whole number")):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert words in capsys.readouterr().err


# Numbers any finite value suits (an angle, an offset) or that a plugin checks as a choice (3 or 4 channels).
ANY_FINITE = {"default_azimuth_deg", "density_shift", "n_feature_dims"}


def _numeric_fields(schema, path):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _numeric_fields(kind, f"{path}.{f.name}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        numbers = kind in (int, float, Optional[int], Optional[float]) or (
            isinstance(default, (int, float)) and not isinstance(default, bool)) or (
            isinstance(default, list) and default and all(isinstance(x, (int, float)) for x in default))
        if numbers and f.name not in ANY_FINITE:
            yield f"{path}.{f.name}", "domain" in f.metadata or "schedulable" in f.metadata


def test_every_number_of_every_config_declares_its_domain():
    from lift3d import registry
    from lift3d.config import ExperimentConfig

    registry._load_plugins()
    schemas = {("experiment", ExperimentConfig)} | {(f"{kind} {name}", cls.Config) for kind, classes in
                                                    registry._classes.items() for name, cls in classes.items()
                                                    if hasattr(cls, "Config") and cls.__module__.startswith("lift3d.")}
    missing = [where for label, schema in sorted(schemas, key=lambda s: s[0])
               for where, declared in _numeric_fields(schema, label) if not declared]
    assert not missing, f"numbers without a declared domain (lift3d.config.domain): {missing}"


@pytest.mark.parametrize("override, key", [
    ("system.optimizer.betas=[0.9]", "system.optimizer.betas"), ("system.optimizer.eps=-1", "system.optimizer.eps"),
    ("seed=-1", "seed"), ("seed=99999999999999", "seed"), ("data.fovy_range=[0,0]", "data.fovy_range"),
    ("data.camera_distance_range=[0,0]", "data.camera_distance_range"), ("trainer=5", "trainer.max_steps"),
    ("image=", "image="), ("system.export.min_component_fraction=2", "system.export.min_component_fraction"),
    ("system.geometry_type=gaussians", None)])
def test_the_issue_26_numbers_fail_when_the_config_loads(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\ntrainer: {max_steps: 2, device: cpu}\n")
    if key is None:     # the Gaussians' fields: prune_opacity in [0, 1), extent > 0, learning rates > 0
        for bad, name in (("prune_opacity=1", "prune_opacity"), ("extent=0", "extent"), ("scale_lr=0", "scale_lr"),
                          ("densify_grad_threshold=-1", "densify_grad_threshold")):
            with pytest.raises(ConfigError, match=f"system.geometry.{name}"):
                load_config(str(path), [override, f"system.geometry.{bad}"])
        with pytest.raises(ConfigError, match="system.renderer.tile_size"):
            load_config(str(path), [override, "system.renderer_type=gaussian-splatting", "system.renderer.tile_size=0"])
        return
    with pytest.raises(ConfigError) as e:
        load_config(str(path), [override])
    assert key in str(e.value) and "\n" not in str(e.value)
