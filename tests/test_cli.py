import subprocess
import sys

import pytest

from lift3d.cli import COMMANDS, _resolve


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_resolves_and_has_help(name, capsys):
    fn = _resolve(COMMANDS[name])
    with pytest.raises(SystemExit) as e:
        fn(["--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_unknown_command_and_eval_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lift3d.cli", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lift3d.cli", "eval", "--pred", str(tmp_path / "no.obj"),
                        "--gt", str(tmp_path / "no.obj")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def _cli(*args, cwd=None):
    """``python -m lift3d ARGS`` with this checkout's lift3d, run from ``cwd``."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, "-m", "lift3d", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_version_and_python_dash_m():
    import lift3d
    from lift3d.cli import version

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lift3d {version()}"
    assert version() == lift3d.__version__      # pyproject's version is lift3d.__version__ (dynamic)
    r = _cli()
    assert r.returncode == 0 and "launch" in r.stdout and "configs" in r.stdout


def test_configs_lists_every_packaged_config_with_its_first_comment_line(tmp_path):
    from lift3d.config import config_summary, packaged_configs

    r = _cli("configs", cwd=tmp_path)     # outside the repository
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    configs = packaged_configs()
    assert len(lines) == len(configs) >= 6
    for line, (name, path) in zip(lines, configs.items()):
        summary = config_summary(path)
        assert len(summary) > 20, f"{name}: write a describing first comment line"
        assert line.split()[0] == name and line.endswith(summary)


def test_launch_help_names_program_shorthands_and_configs(capsys):
    from lift3d.cli import _launch
    from lift3d.config import packaged_configs

    with pytest.raises(SystemExit):
        _launch(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: lift3d launch")
    for word in ("image=", "gt=", "resume=", "exp_root_dir=", "name=", "tag=", "use_timestamp=", *packaged_configs()):
        assert word in out, word


def test_unknown_config_name_is_one_line_naming_the_packaged_configs(tmp_path):
    r = _cli("launch", "--config", "zero123-sjx", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "zero123-sjx" in r.stderr and "zero123-sjc-cpu" in r.stderr and "oracle" in r.stderr
