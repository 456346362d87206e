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
    with pytest.raises(ConfigError, match=r"unknown geometry plugin 'no-such-field'.*valid: hashgrid-nerf, voxel-rf$"):
        load_config(str(child), ["system.geometry_type=no-such-field"])
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
