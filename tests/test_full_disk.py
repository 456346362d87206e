"""A real full disk (issue 26): a small tmpfs, filled up, under a real run of the command line. The run stops
with one line naming the file it could not write; the previous checkpoint and export stay as they were; a run
that could not start leaves no trial folder and no lock. Skipped where a tmpfs cannot be mounted (mounting
needs root, or CAP_SYS_ADMIN in a container).
"""

import hashlib
import os
import subprocess

import numpy as np
import pytest
import torch

from faultcases import LOCK, TINY, error_lines, run_cli


@pytest.fixture()
def small_disk(tmp_path):
    """A 16 MiB tmpfs of its own, unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs to fill up: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up: {r.stderr.strip() or 'mount exited ' + str(r.returncode)}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture()
def inputs(tmp_path):
    """The tiny config and an RGBA disc, outside the small disk."""
    import imageio.v3 as iio

    (tmp_path / "tiny.yaml").write_text(TINY)
    yy, xx = np.mgrid[:64, :64]
    img = np.zeros((64, 64, 4), np.uint8)
    img[(xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 18 ** 2] = [220, 40, 30, 255]
    iio.imwrite(tmp_path / "disc_rgba.png", img)
    return ["--config", str(tmp_path / "tiny.yaml"), f"image={tmp_path / 'disc_rgba.png'}"]


def fill(disk, leave: int) -> None:
    """Take all of the disk's free space but ``leave`` bytes."""
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - leave
    fd = os.open(disk / "filler", os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize <= leave + st.f_frsize


def hashes(folder) -> dict:
    return {os.path.relpath(os.path.join(b, n), folder): hashlib.sha1(open(os.path.join(b, n), "rb").read()).hexdigest()
            for b, _, files in os.walk(folder) for n in files}


def no_leftovers(trial) -> list:
    return [n for _, _, fs in os.walk(trial) for n in fs if n.startswith(".tmp-") or n == LOCK]


def one_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert "No space left on device" in lines[0], lines[0]
    return lines[0]


# The first run's outputs that a test does not look at are skipped: the tests' time goes to the runs that fail.
NO_TURNTABLE = "from lift3d.runner import Experiment\nExperiment.test = lambda self: None\n"
NO_EXPORT = NO_TURNTABLE + "Experiment.export = lambda self: None\n"


def train(disk, inputs, prelude: str):
    r = run_cli(["launch", *inputs, f"exp_root_dir={disk / 'out'}"], cwd=str(disk.parent), prelude=prelude)
    assert r.returncode == 0, r.stderr
    return disk / "out" / "tiny" / "t"


@pytest.mark.parametrize("leave", [0, 4096], ids=["no byte left", "one page left"])
def test_a_run_on_a_full_disk_leaves_no_trial_folder_and_no_lock(small_disk, inputs, leave):
    fill(small_disk, leave)
    r = run_cli(["launch", *inputs, f"exp_root_dir={small_disk / 'out'}"], cwd=str(small_disk.parent))
    line = one_line(r)
    assert str(small_disk / "out" / "tiny" / "t") in line, line
    assert not (small_disk / "out").exists(), sorted(str(p) for p in (small_disk / "out").rglob("*"))


def test_a_disk_that_fills_at_a_checkpoint_keeps_the_previous_one(small_disk, inputs):
    trial = train(small_disk, inputs, NO_EXPORT)
    ckpt = trial / "ckpts" / "last.ckpt"
    before = hashes(trial / "ckpts")
    fill(small_disk, os.path.getsize(ckpt) // 2)     # the small files fit, a checkpoint does not
    # torch.save raises RuntimeError ("unexpected pos ...") on a full disk, not OSError.
    r = run_cli(["launch", *inputs, f"resume={ckpt}", "trainer.max_steps=8", "trainer.val_every=0"],
                cwd=str(small_disk.parent))
    line = one_line(r)
    assert f"cannot write checkpoint {ckpt} at step 6" in line and "previous checkpoint (step 4) is kept" in line, line
    assert hashes(trial / "ckpts") == before
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    assert not no_leftovers(trial)


def test_a_disk_that_fills_during_export_keeps_the_previous_export(small_disk, inputs):
    trial = train(small_disk, inputs, NO_TURNTABLE)
    export = trial / "export"
    for name in ("model.mtl", "model.obj"):       # mark the previous export: a new one would not match it
        with open(export / name, "a") as f:
            f.write("# the previous export\n")
    before = {**hashes(export), "metrics.json": hashes(trial)["metrics.json"]}
    # The texture and the material fit, the mesh does not: the files already written must be rolled back.
    fill(small_disk, os.path.getsize(export / "model.png") + os.path.getsize(export / "model.mtl") + 8192)
    assert os.path.getsize(export / "model.obj") > 3 * 8192
    r = run_cli(["launch", "--config", str(trial / "configs" / "parsed.yaml"), "--export",
                 f"resume={trial / 'ckpts' / 'last.ckpt'}"], cwd=str(small_disk.parent))
    line = one_line(r)
    assert f"cannot write {export}{os.sep}" in line and "left as they were" in line, line
    assert {**hashes(export), "metrics.json": hashes(trial)["metrics.json"]} == before
    assert not no_leftovers(trial)
