import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

import pytest

from lift3d.config import C, load_config, parse_config, parse_overrides, schedulable
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
