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
