"""The fault pass's cases beyond issue 14's (scripts/fault_pass.py runs both); see tests/faultcases.py."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib

from faultcases import COPY, LOCK, NVS, ROOT, Case, L, copy_trial, good_ckpt, no_trial_folder, obj_file, write

EXPORT = ["launch", "--config", "{copy}/configs/parsed.yaml", "--export", f"resume={COPY}"]


def png_bytes(width: int, height: int, data: bytes = b"") -> bytes:
    """A PNG header claiming ``width`` x ``height`` RGBA pixels, followed by ``data`` as its image data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


def rgba_png(rel: str, width: int, height: int, alpha: int):
    def setup(ws, d):
        import imageio.v3 as iio
        import numpy as np

        img = np.full((height, width, 4), 200, np.uint8)
        img[..., 3] = alpha
        iio.imwrite(os.path.join(d, rel), img)
    return setup


def truncated(src_field: str, rel: str):
    def setup(ws, d):
        src = ws.fields(d)[src_field]
        with open(src, "rb") as f:
            data = f.read()
        with open(os.path.join(d, rel), "wb") as f:
            f.write(data[: len(data) // 2])
    return setup


def legacy_evil(ws, d):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    torch.save({"step": 1, "system": Evil()}, os.path.join(d, "legacy.ckpt"), _use_new_zipfile_serialization=False)


def other_run_holds_the_folder(ws, d):
    """Start a real first run in the same trial folder and wait until it holds the lock."""
    args = ["--config", ws.tiny, f"image={ws.img}", f"exp_root_dir={os.path.join(d, 'out')}", "trainer.max_steps=60",
            "trainer.val_every=0"]
    env = {**os.environ, "LIFT3D_NO_PROGRESS": "1", "PYTHONPATH": ROOT}
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=d, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = os.path.join(d, "out", "tiny", "t", LOCK)
    deadline = time.time() + 120
    while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    ws.background = first


def first_run_finished_alone(ws, d):
    first = ws.background
    _, err = first.communicate(timeout=600)
    if first.returncode != 0:
        return f"the first run failed: {err.decode()[-300:]}"
    return good_ckpt(60, must_exist=True)(ws, d)


INTERRUPT_EXPORT = """
import lift3d.export.mesh as _m
def _ctrl_c(*a, **k):
    raise KeyboardInterrupt
_m.export_mesh = _ctrl_c
"""
CPU_OOM = """
from lift3d.systems.image_to_3d import ImageTo3D
def _oom(self, views, step):
    raise MemoryError()
ImageTo3D.training_step = _oom
"""


def export_interrupted_cleanly(ws, d):
    from faultcases import ckpt_problem, tmp_files_gone

    return tmp_files_gone(ws, d) or ckpt_problem(os.path.join(d, "trial", "ckpts", "last.ckpt"), step=4)


EXTRA_CASES = [
    Case("corrupted PNG", L[:3] + ["image={dir}/bad.png", "{out}"], message="cannot read image",
         setup=write("bad.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50), check=no_trial_folder),
    Case("truncated PNG", L[:3] + ["image={dir}/half.png", "{out}"], message="half.png",
         setup=truncated("img", "half.png"), check=no_trial_folder),
    Case("1x1 image", L[:3] + ["image={dir}/one.png", "{out}"], message="foreground", setup=rgba_png("one.png", 1, 1, 255)),
    Case("fully transparent image", L[:3] + ["image={dir}/clear.png", "{out}"], message="foreground",
         setup=rgba_png("clear.png", 64, 64, 0), check=no_trial_folder),
    Case("huge dimensions in the PNG header", L[:3] + ["image={dir}/huge.png", "{out}"], message="huge.png",
         setup=write("huge.png", png_bytes(100000, 100000, b"\x00" * 64))),
    Case("non-UTF-8 YAML", ["launch", "--config", "{dir}/latin1.yaml"], message="latin1.yaml",
         setup=write("latin1.yaml", "name: caf\xe9\n".encode("latin-1"))),
    Case("config that is a list", ["launch", "--config", "{dir}/list.yaml"], message="mapping",
         setup=write("list.yaml", "- a\n- b\n")),
    Case("trainer.max_steps=abc", L + ["trainer.max_steps=abc"], message="trainer.max_steps"),
    Case("negative geometry radius", L + ["system.geometry.radius=-1"], message="radius", check=no_trial_folder),
    Case("grid_size=1", L + ["system.geometry.grid_size=1"], message="grid_size"),
    Case("schedule with decreasing steps", L + ["system.loss.lambda_opaque=[300,0.0,10.0,100]"],
         message="increasing"),
    Case("eval: unknown protocol", ["eval", "--pred", "{pkg}/examples/objects/car", "--gt",
                                    "{pkg}/examples/objects/car", "--protocol", "bogus"], message="protocol"),
    Case("eval: missing --gt", ["eval", "--pred", "{pkg}/examples/objects/car"], message="--gt"),
    Case("eval: a PNG as --gt", ["eval", "--pred", "{pkg}/examples/objects/car", "--gt", "{img}"], message="mesh"),
    Case("eval: a directory as --pred", ["eval", "--pred", "{dir}", "--gt", "{pkg}/examples/objects/car"],
         message="mesh"),
    Case("bench: empty dataset folder", ["bench", "--dataset", "{dir}/empty", "--config", "{tiny}", "--out",
                                         "{dir}/bench"], message="empty", setup=lambda ws, d: os.makedirs(
                                             os.path.join(d, "empty"))),
    Case("bench: dataset folder missing", ["bench", "--dataset", "{dir}/nope", "--config", "{tiny}", "--out",
                                           "{dir}/bench"], message="nope"),
    Case("render-gso: folder without a mesh", ["render-gso", "--object", "{dir}", "--out", "{dir}/r",
                                               "--resolution", "8", "--views", "1"], message="mesh"),
    Case("nvs: azimuth=nan", [*NVS[:3], "--image", "{img}", "--elevation", "0", "--azimuth", "nan", "--out",
                              "{dir}/nvs"], message="finite"),
    Case("nvs: --steps 0", [*NVS[:3], "--image", "{img}", *NVS[3:9], "--steps", "0"], message="--steps"),
    Case("nvs: model folder missing", ["nvs", "--model", "{dir}/nomodel", "--image", "{img}", "--elevation", "0",
                                       "--azimuth", "30", "--out", "{dir}/nvs"], message="nomodel"),
    Case("Ctrl-C during export", EXPORT, expect=130, message="interrupted", setup=copy_trial,
         prelude=INTERRUPT_EXPORT, check=export_interrupted_cleanly),
    Case("two runs at once in one trial folder", L + ["trainer.val_every=0"], message="in use",
         setup=other_run_holds_the_folder, check=first_run_finished_alone, timeout=600),
    Case("extends a missing config", ["launch", "--config", "{dir}/ext.yaml"], message="extends",
         setup=write("ext.yaml", "extends: nowhere.yaml\n")),
    Case("override without =", L + ["trainer.max_steps"], message="key=value"),
    Case("unknown --option", L + ["--bogus"], message="--bogus"),
    Case("resume= a directory", L + ["resume={dir}"], message="folder"),
    Case("resume= an empty file", L + ["resume={dir}/empty.ckpt"], message="empty.ckpt",
         setup=write("empty.ckpt", b"")),
    Case("resume= a truncated checkpoint", L + ["resume={dir}/half.ckpt"], message="half.ckpt",
         setup=truncated("ckpt", "half.ckpt")),
    Case("resume= a legacy torch pickle with a blocked global", L + ["resume={dir}/legacy.ckpt"],
         message="refusing", setup=legacy_evil,
         check=lambda ws, d: "pickled code ran" if os.path.exists(os.path.join(d, "PWNED")) else None),
    Case("resume= a checkpoint of another grid size", L[:3] + ["image={img}", f"resume={COPY}",
                                                               "system.geometry.grid_size=8"],
         message="does not match", setup=copy_trial),
    Case("--test without resume=", ["launch", "--config", "{tiny}", "--test"], message="resume="),
    Case("gt= a missing mesh", L + ["gt={dir}/no.obj"], message="no.obj", check=no_trial_folder),
    Case("eval_protocol=bogus with a gt mesh", L + ["gt={pkg}/examples/objects/car", "eval_protocol=bogus"],
         message="protocol", check=no_trial_folder),
    Case("data.foreground_ratio=2", ["launch", "--config", "{tiny}", "image={img}", "{out}",
                                     "data.foreground_ratio=2"], message="foreground_ratio", check=no_trial_folder),
    Case("data.elevation_range=[80,10]", L + ["data.elevation_range=[80,10]"], message="elevation_range"),
    Case("data.batch_size=0", L + ["data.batch_size=0"], message="batch_size"),
    Case("trainer.num_threads=-1", L + ["trainer.num_threads=-1"], message="num_threads"),
    Case("trainer.mmap_threshold_mib=64", L + ["trainer.mmap_threshold_mib=64"], message="mmap_threshold_mib"),
    Case("seed=abc", L + ["seed=abc"], message="seed"),
    Case("system.optimizer.name=sgd", L + ["system.optimizer.name=sgd"], message="sgd", check=no_trial_folder),
    Case("system.renderer.num_samples_per_ray=0", L + ["system.renderer.num_samples_per_ray=0"],
         message="num_samples_per_ray"),
    Case("CPU out of memory (MemoryError)", L, message="memory", prelude=CPU_OOM),
    Case("eval: mesh whose faces index missing vertices", ["eval", "--pred", "{dir}/idx.obj", "--gt",
                                                           "{pkg}/examples/objects/car"], message="idx.obj",
         setup=obj_file("idx.obj", [(0, 0, 0), (1, 0, 0), (0, 1, 0)], [(1, 2, 9)])),
]


# --------------------------------------------------------------------------- issue 26: signals and full disks

SIGNAL_IN_STEP_3 = """
import os, signal
from lift3d.systems.image_to_3d import ImageTo3D
_step = ImageTo3D.training_step
def _signalled(self, views, step):
    if step == 3:
        for _ in range(TIMES):
            os.kill(os.getpid(), signal.NAME)
    return _step(self, views, step)
ImageTo3D.training_step = _signalled
"""
SIGTERM_AT_THE_GLB = """
import os, signal
import lift3d.export.mesh as _m
_glb = _m._write_glb
def _term(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return _glb(*a, **k)
_m._write_glb = _term
"""


def signal_in_step(name: str, times: int = 1) -> str:
    return SIGNAL_IN_STEP_3.replace("TIMES", str(times)).replace("NAME", name)


def stopped_with_checkpoint(step: int):
    """The lock released and ``last.ckpt`` at ``step`` (no temporary files)."""
    def check(ws, d):
        if os.path.exists(os.path.join(d, "out", "tiny", "t", LOCK)):
            return "the lock was left behind"
        return good_ckpt(step, must_exist=True)(ws, d)
    return check


def export_rolled_back(ws, d):
    from faultcases import tmp_files_gone, trial_copy_intact

    lock = os.path.join(d, "trial", LOCK)
    return trial_copy_intact(ws, d) or tmp_files_gone(ws, d) or ("the lock was left behind" if os.path.exists(lock)
                                                                 else None)


def _mount_tmpfs(folder: str) -> str:
    """Mount a 16 MiB tmpfs at ``folder``; '' or why not."""
    os.makedirs(folder, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", folder], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return "" if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def _can_mount_tmpfs() -> bool:
    import tempfile

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    probe = tempfile.mkdtemp(prefix="lift3d-tmpfs-probe-")
    ok = not _mount_tmpfs(probe)
    if ok:
        subprocess.run(["umount", "-l", probe], capture_output=True)
    os.rmdir(probe)
    return ok


def _fill(folder: str, leave: int) -> None:
    st = os.statvfs(folder)
    fd = os.open(os.path.join(folder, "filler"), os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, max(st.f_bavail * st.f_frsize - leave, 1))
    finally:
        os.close(fd)


def full_disk_at(rel: str, leave=lambda trial: 0, with_trial: bool = False):
    """Setup: a tmpfs at ``<case>/rel`` (holding a copy of the trained trial with ``with_trial``), filled up to
    ``leave(folder)`` bytes."""
    def setup(ws, d):
        import shutil

        folder = os.path.join(d, rel)
        why = _mount_tmpfs(folder)
        if why:
            raise RuntimeError(f"cannot mount a tmpfs at {folder}: {why}")
        if with_trial:
            shutil.copytree(ws.trial, folder, dirs_exist_ok=True)
        _fill(folder, leave(folder))
    return setup


def unmounting(rel: str, check):
    """``check``, then unmount the case's tmpfs."""
    def run(ws, d):
        try:
            return check(ws, d)
        finally:
            subprocess.run(["umount", "-l", os.path.join(d, rel)], capture_output=True)
    return run


def checkpoint_unchanged(ws, d):
    from faultcases import tmp_files_gone, tree_hashes

    now = tree_hashes(os.path.join(d, "trial", "ckpts"))
    if now.get("last.ckpt") != ws.hashes.get(os.path.join("ckpts", "last.ckpt")):
        return "the previous checkpoint changed"
    return tmp_files_gone(ws, d)


def no_trial_folder_nor_lock(ws, d):
    left = [os.path.join(b, n) for b, _, fs in os.walk(os.path.join(d, "out")) for n in fs if n != "filler"]
    return no_trial_folder(ws, d) or (f"left {left}" if left else None)


TRAIN_8 = ["trainer.max_steps=8", "trainer.val_every=0"]
SIGNAL_AND_DISK_CASES = [
    Case("SIGTERM mid-step", L + TRAIN_8 + ["trainer.ckpt_every=0"], expect=143, message="resume=",
         prelude=signal_in_step("SIGTERM"), check=stopped_with_checkpoint(4)),
    Case("SIGHUP mid-step", L + TRAIN_8 + ["trainer.ckpt_every=0"], expect=129, message="SIGHUP",
         prelude=signal_in_step("SIGHUP"), check=stopped_with_checkpoint(4)),
    Case("Ctrl-C (SIGINT) mid-step waits for the step", L + TRAIN_8 + ["trainer.ckpt_every=0"], expect=130,
         message="at step 4", prelude=signal_in_step("SIGINT"), check=stopped_with_checkpoint(4)),
    Case("a second SIGTERM in one step", L + TRAIN_8 + ["trainer.ckpt_every=2"], expect=143,
         message="previous checkpoint (step 2)", prelude=signal_in_step("SIGTERM", times=2),
         check=stopped_with_checkpoint(2)),
    Case("SIGTERM during export", EXPORT, expect=143, message="SIGTERM", setup=copy_trial, prelude=SIGTERM_AT_THE_GLB,
         check=export_rolled_back),
]
if _can_mount_tmpfs():   # a real full disk needs a mount: root, or CAP_SYS_ADMIN in a container
    SIGNAL_AND_DISK_CASES += [
        Case("full disk (tmpfs) from the start", L, message="No space left", setup=full_disk_at("out"),
             check=unmounting("out", no_trial_folder_nor_lock)),
        Case("full disk (tmpfs) at a checkpoint: torch.save's RuntimeError",
             ["launch", "--config", "{copy}/configs/parsed.yaml", f"resume={COPY}"] + TRAIN_8,
             message="previous checkpoint (step 4) is kept", check=unmounting("trial", checkpoint_unchanged),
             setup=full_disk_at("trial", lambda t: os.path.getsize(os.path.join(t, "ckpts", "last.ckpt")) // 2,
                                with_trial=True)),
        Case("full disk (tmpfs) during export", EXPORT, message="left as they were",
             check=unmounting("trial", export_rolled_back),
             setup=full_disk_at("trial", lambda t: sum(os.path.getsize(os.path.join(t, "export", n))
                                                       for n in ("model.png", "model.mtl")) + 8192, with_trial=True)),
    ]
EXTRA_CASES += SIGNAL_AND_DISK_CASES
for _case in EXTRA_CASES:
    _case.listed = False
