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
for _case in EXTRA_CASES:
    _case.listed = False
