"""SIGTERM, SIGHUP and Ctrl-C end a training run alike (issue 26): one stderr line, exit 128 + the signal
(143, 129, 130), the lock released, and a checkpoint of the last completed step, so that a resumed run
ends bit for bit where an uninterrupted one does. Each run is the real command line in a subprocess.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from faultcases import LOCK, ROOT, TINY, error_lines, run_cli

STEPS = 12
# The signal comes inside step 3 (counting from 0), after the view sampler has drawn that step's views.
SIGNAL_IN_STEP = """
import os, signal
from lift3d.systems.image_to_3d import ImageTo3D
_step = ImageTo3D.training_step
def _signalled(self, views, step):
    if step == 3:
        for _ in range(REPEAT):
            os.kill(os.getpid(), signal.SIGNAME)
    return _step(self, views, step)
ImageTo3D.training_step = _signalled
"""
# The reference and resumed runs stop after training: the export and turntable play no part here (and take time).
TRAINING_ONLY = """
from lift3d.runner import Experiment
Experiment.export = Experiment.test = lambda self: None
"""
# Steps slow enough for a signal from outside to land inside one (sleeping changes no number).
SLOW_STEPS = """
import time
from lift3d.systems.image_to_3d import ImageTo3D
_step = ImageTo3D.training_step
def _slow(self, views, step):
    time.sleep(0.3)
    return _step(self, views, step)
ImageTo3D.training_step = _slow
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny config, an RGBA disc, and an uninterrupted run of STEPS steps to compare with."""
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("signals")
    (root / "tiny.yaml").write_text(TINY)
    yy, xx = np.mgrid[:64, :64]
    img = np.zeros((64, 64, 4), np.uint8)
    img[(xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 18 ** 2] = [220, 40, 30, 255]
    iio.imwrite(root / "disc_rgba.png", img)
    ws = {"root": root, "args": ["launch", "--config", str(root / "tiny.yaml"), f"image={root / 'disc_rgba.png'}",
                                 f"trainer.max_steps={STEPS}", "trainer.ckpt_every=0", "trainer.val_every=4"]}
    r = run_cli(ws["args"] + [f"exp_root_dir={root / 'uninterrupted'}"], cwd=str(root), prelude=TRAINING_ONLY)
    assert r.returncode == 0, r.stderr
    ws["reference"] = root / "uninterrupted" / "tiny" / "t"
    return ws


def _assert_equal(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_as_uninterrupted(trial, reference) -> None:
    """Weights, optimiser state, both random states and the loss log equal the uninterrupted run's."""
    load = lambda t: torch.load(t / "ckpts" / "last.ckpt", map_location="cpu", weights_only=True)  # noqa: E731
    got, want = load(trial), load(reference)
    assert got["step"] == want["step"] == STEPS
    for key in ("system", "optimizer", "torch_rng", "view_rng"):
        _assert_equal(got[key], want[key], key)
    assert (trial / "save" / "losses.csv").read_text() == (reference / "save" / "losses.csv").read_text()


def assert_stopped_cleanly(r, trial, sig: int, step: int) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 128 + sig, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    name = "interrupted at" if sig == signal.SIGINT else f"interrupted by {signal.Signals(sig).name} at"
    assert f"{name} step {step}" in lines[0] and f"resume={trial / 'ckpts' / 'last.ckpt'}" in lines[0], lines[0]
    assert not (trial / LOCK).exists(), "the lock was left behind"
    assert torch.load(trial / "ckpts" / "last.ckpt", weights_only=True)["step"] == step
    assert not (trial / "export").exists(), "the run went on to export"
    assert not [n for _, _, fs in os.walk(trial) for n in fs if n.startswith(".tmp-")]


def resume(ws, trial) -> None:
    r = run_cli(ws["args"] + [f"resume={trial / 'ckpts' / 'last.ckpt'}"], cwd=str(ws["root"]), prelude=TRAINING_ONLY)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_mid_step_saves_that_step_and_resumes_bit_exact(workspace, sig):
    name = signal.Signals(sig).name
    out = workspace["root"] / name
    prelude = SIGNAL_IN_STEP.replace("SIGNAME", name).replace("REPEAT", "1")
    r = run_cli(workspace["args"] + [f"exp_root_dir={out}"], cwd=str(workspace["root"]), prelude=prelude)
    trial = out / "tiny" / "t"
    assert_stopped_cleanly(r, trial, sig, step=4)      # the step under way (index 3) finished first
    resume(workspace, trial)
    assert_same_as_uninterrupted(trial, workspace["reference"])


def test_sigterm_from_outside_while_training_resumes_bit_exact(workspace):
    """What `timeout`, `docker stop` and Slurm do: SIGTERM from another process, at whatever point it lands."""
    out = workspace["root"] / "outside"
    trial = out / "tiny" / "t"
    args = workspace["args"][1:] + [f"exp_root_dir={out}"]
    env = {**os.environ, "LIFT3D_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    code = (f"import sys\n{SLOW_STEPS}\nfrom lift3d.cli import launch_main\n"
            f"sys.argv = ['launch.py'] + {args!r}\nlaunch_main()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(workspace["root"]), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    losses = trial / "save" / "losses.csv"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if losses.exists() and len(losses.read_text().splitlines()) >= 3:     # the header and 2 steps
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    with open(losses, newline="") as f:
        last = int(list(csv.DictReader(f))[-1]["step"])
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert_stopped_cleanly(r, trial, signal.SIGTERM, step=last)     # the checkpoint is the last logged step
    assert 2 <= last < STEPS
    resume(workspace, trial)
    assert_same_as_uninterrupted(trial, workspace["reference"])


def test_a_second_signal_stops_at_once_without_a_half_step_checkpoint(workspace):
    out = workspace["root"] / "twice"
    prelude = SIGNAL_IN_STEP.replace("SIGNAME", "SIGTERM").replace("REPEAT", "2")
    r = run_cli(workspace["args"] + [f"exp_root_dir={out}", "trainer.ckpt_every=2"], cwd=str(workspace["root"]),
                prelude=prelude)
    trial = out / "tiny" / "t"
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 143
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "again during step 4: stopped there, unsaved" in lines[0], r.stderr
    assert "previous checkpoint (step 2) is kept" in lines[0], lines[0]
    assert torch.load(trial / "ckpts" / "last.ckpt", weights_only=True)["step"] == 2
    assert not (trial / LOCK).exists()
