"""Fault-injection cases for the lift3d command line, run as an outside user would: each case is one
``python launch.py ...`` or ``python -m lift3d ...`` in a subprocess.

Shared by ``tests/test_faults.py`` (the cases of issue 14) and ``scripts/fault_pass.py`` (those plus
more, printed as a table). A case says what exit code it expects, a word its one stderr line must
contain, and optionally what must survive it (``check`` returns a description of what was lost).
``prelude`` is Python run in the child before the command: it injects faults (a full disk, an
out-of-memory error, a NaN) that a command line alone cannot cause.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
name: tiny
tag: t
use_timestamp: false
trainer: {max_steps: 4, val_every: 2, ckpt_every: 2, log_every: 1, device: cpu}
data:
  reference_height: 32
  reference_width: 32
  height: 16
  width: 16
  foreground_ratio: null
  n_val_views: 2
  n_test_views: 3
  eval_height: 16
  eval_width: 16
system:
  geometry_type: voxel-rf
  geometry: {grid_size: 16, radius: 0.6}
  renderer: {num_samples_per_ray: 16, use_occupancy_grid: false}
  loss: {lambda_guidance: 0, lambda_rgb: 1.0, lambda_mask: 1.0, lambda_sparsity: 0.01}
  optimizer: {name: adam, lr: 0.1}
  export: {resolution: 32, texture_size: 64, relative_threshold: 1.0}
"""

LOCK = ".lift3d.lock"    # the trial folder's lock file (lift3d.runner.TrialLock)


# --------------------------------------------------------------------------- workspace


class Workspace:
    """Files every case may use: a tiny config, an RGBA disc, and one trained tiny trial (read-only to cases:
    a case that writes into a trial copies it first with :func:`copy_trial`)."""

    def __init__(self, root: str):
        self.root = root
        self.tiny = os.path.join(root, "tiny.yaml")
        self.img = os.path.join(root, "disc_rgba.png")
        self.trial = os.path.join(root, "trained", "tiny", "t")
        self.hashes: dict = {}

    def build(self) -> "Workspace":
        import imageio.v3 as iio
        import numpy as np

        os.makedirs(self.root, exist_ok=True)
        with open(self.tiny, "w") as f:
            f.write(TINY)
        yy, xx = np.mgrid[:64, :64]
        img = np.zeros((64, 64, 4), np.uint8)
        img[(xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 18 ** 2] = [220, 40, 30, 255]
        iio.imwrite(self.img, img)
        r = run_cli(["launch", "--config", self.tiny, f"image={self.img}",
                     f"exp_root_dir={os.path.dirname(os.path.dirname(self.trial))}"], cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"training the shared tiny trial failed:\n{r.stderr}")
        self.hashes = tree_hashes(self.trial)
        return self

    def fields(self, case_dir: str) -> dict:
        return {"tiny": self.tiny, "img": self.img, "trial": self.trial, "dir": case_dir,
                "out": f"exp_root_dir={os.path.join(case_dir, 'out')}",
                "ckpt": os.path.join(self.trial, "ckpts", "last.ckpt"),
                "copy": os.path.join(case_dir, "trial"), "pkg": os.path.join(ROOT, "lift3d"),
                "ro": readonly_dir(case_dir)}


def tree_hashes(folder: str) -> dict:
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------- running a case


@dataclass
class Case:
    name: str
    args: list                      # "launch" ... -> python launch.py ...; else python -m lift3d ...
    expect: int = 2                 # exit code
    message: str = ""               # a word of the one stderr line ("" for exit 0)
    avoid: str = ""                 # a word the message must not contain (a misleading one)
    setup: Optional[Callable] = None     # (ws, case_dir) -> None
    check: Optional[Callable] = None     # (ws, case_dir) -> what was lost, or None
    prelude: str = ""
    timeout: int = 180
    listed: bool = True             # one of issue 14's cases (else one of the fault pass's extras)
    in_test: bool = True            # run by tests/test_faults.py too (False: a near-duplicate, fault pass only)
    labels: dict = field(default_factory=dict)


def run_cli(args: list, cwd: str, prelude: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIFT3D_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    launch = args[0] == "launch"
    rest = args[1:] if launch else args
    if prelude:
        tail = ("from lift3d.cli import launch_main; sys.argv = ['launch.py'] + ARGS; launch_main()" if launch else
                "from lift3d.cli import main; sys.exit(main(ARGS))")
        cmd = [sys.executable, "-c", f"import sys\nARGS = {rest!r}\n{prelude}\n{tail}"]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *rest] if launch else \
            [sys.executable, "-m", "lift3d", *rest]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def error_lines(stderr: str) -> list:
    """The stderr lines a user reads, without tqdm bars and argparse's usage block."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    if lines and lines[0].startswith("usage:"):
        lines = [ln for ln in lines if ": error:" in ln]
    return lines


@dataclass
class Outcome:
    code: int
    stderr: str
    lines: list
    lost: Optional[str]
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr


def run_case(ws: Workspace, case: Case, case_dir: str) -> Outcome:
    os.makedirs(case_dir, exist_ok=True)
    if case.setup:
        case.setup(ws, case_dir)
    f = ws.fields(case_dir)
    args = [a.format(**f) for a in case.args]
    t0 = time.time()
    try:
        r = run_cli(args, cwd=case_dir, prelude=case.prelude.format(**f) if case.prelude else "",
                    timeout=case.timeout)
        code, stderr = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        code, stderr = -9, f"timed out after {case.timeout} s\n{e.stderr or ''}"
    seconds = time.time() - t0
    lost = case.check(ws, case_dir) if case.check else None
    if ws.hashes and tree_hashes(ws.trial) != ws.hashes:
        lost = (lost + "; " if lost else "") + "the shared trained trial changed"
    return Outcome(code, stderr, error_lines(stderr), lost, seconds)


def verdict(case: Case, o: Outcome) -> str:
    """clean | traceback | wrong exit | multi-line | misleading | lost."""
    if o.lost:
        return "lost"
    if o.traceback:
        return "traceback"
    if o.code != case.expect:
        return "wrong exit"
    if case.expect != 0:
        if len(o.lines) != 1:
            return "multi-line"
        if case.message.lower() not in o.lines[0].lower() or (case.avoid and case.avoid.lower() in o.lines[0].lower()):
            return "misleading"
    return "clean"


# --------------------------------------------------------------------------- setups and checks


def write(rel: str, data):
    def setup(ws, d):
        path = os.path.join(d, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
    return setup


def random_bytes(rel: str, n: int = 4096):
    import random

    return write(rel, bytes(random.Random(14).getrandbits(8) for _ in range(n)))


class _Evil:
    """Unpickling this would run a shell command: a checkpoint loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def evil_pickle(rel: str, torch_format: bool):
    def setup(ws, d):
        path = os.path.join(d, rel)
        if torch_format:
            import torch

            torch.save({"step": 1, "system": {}, "state_dict": {"x": _Evil()}}, path)
        else:
            with open(path, "wb") as fh:
                pickle.dump({"step": 1, "system": _Evil()}, fh)
    return setup


def not_pwned(ws, d):
    return "pickled code ran (PWNED written)" if os.path.exists(os.path.join(d, "PWNED")) else None


def copy_trial(ws, d):
    shutil.copytree(ws.trial, os.path.join(d, "trial"))


def trial_copy_intact(ws, d):
    now = tree_hashes(os.path.join(d, "trial"))
    changed = [k for k, v in ws.hashes.items() if now.get(k) != v]
    return f"the finished trial's {', '.join(changed)} changed" if changed else None


def no_trial_folder(ws, d):
    out = os.path.join(d, "out")
    return f"left a stub trial folder in {out}" if os.path.exists(os.path.join(out, "tiny")) else None


def ckpt_problem(path: str, step: Optional[int] = None) -> Optional[str]:
    """Why ``path`` is not a good checkpoint (None: it is one, or there is none)."""
    import torch

    if not os.path.exists(path):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, v in ckpt["system"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not (torch.isfinite(v).all() and v.abs().max() < 1e8)]
    if bad:
        return f"{path} holds non-finite or blown-up {', '.join(bad)}"
    if step is not None and ckpt["step"] != step:
        return f"{path} is at step {ckpt['step']}, expected {step}"
    return None


def good_ckpt(step: Optional[int] = None, must_exist: bool = False):
    def check(ws, d):
        path = os.path.join(d, "out", "tiny", "t", "ckpts", "last.ckpt")
        if must_exist and not os.path.exists(path):
            return f"{path} is gone"
        problem = ckpt_problem(path, step)
        tmp = [n for b, _, fs in os.walk(os.path.join(d, "out")) for n in fs if n.startswith(".tmp-")]
        return problem or (f"left temporary files {tmp}" if tmp else None)
    return check


def lock_with_pid(pid_of: Callable[[], int]):
    def setup(ws, d):
        trial = os.path.join(d, "out", "tiny", "t")
        os.makedirs(trial)
        with open(os.path.join(trial, LOCK), "w") as fh:
            fh.write(f"{pid_of()} {socket.gethostname()}\n")
    return setup


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def locked_trial_untouched(ws, d):
    trial = os.path.join(d, "out", "tiny", "t")
    extra = sorted(set(os.listdir(trial)) - {LOCK})
    return f"wrote {extra} into a trial folder in use" if extra else None


def lock_released(ws, d):
    trial = os.path.join(d, "out", "tiny", "t")
    if os.path.exists(os.path.join(trial, LOCK)):
        return "the lock was not released"
    return good_ckpt(4, must_exist=True)(ws, d)


def plant_tmp_files(ws, d):
    copy_trial(ws, d)
    for rel in ("ckpts/.tmp-dead1.ckpt", "save/.tmp-dead2.png", "export/.tmp-dead3.obj"):
        with open(os.path.join(d, "trial", rel), "w") as fh:
            fh.write("half-written")


def tmp_files_gone(ws, d):
    left = [n for b, _, fs in os.walk(os.path.join(d, "trial")) for n in fs if n.startswith(".tmp-")]
    return f"orphan temporary files {left} were not removed" if left else None


def obj_file(rel: str, vertices: list, faces: list):
    text = "".join(f"v {x} {y} {z}\n" for x, y, z in vertices) + "".join(f"f {a} {b} {c}\n" for a, b, c in faces)
    return write(rel, text)


def float_tiff(ws, d):
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    Image.fromarray(((xx + yy) / 126.0).astype(np.float32), mode="F").save(os.path.join(d, "float.tif"))


def readonly_root(ws, d):
    os.makedirs(os.path.join(d, "ro"))
    os.chmod(os.path.join(d, "ro"), 0o555)


def readonly_dir(d: str) -> str:
    """A folder this process cannot write into (root ignores permission bits: /sys refuses it)."""
    return "/sys/lift3d-faults" if os.geteuid() == 0 else os.path.join(d, "ro", "out")


# Fault injection (the child's prelude).
DISK_FULL_ON_3RD_SAVE = """
import errno, torch
_save, _n = torch.save, [0]
def _full(*a, **k):
    _n[0] += 1
    if _n[0] >= 3:
        raise OSError(errno.ENOSPC, 'No space left on device')
    return _save(*a, **k)
torch.save = _full
"""
OOM_IN_STEP = """
import torch
from lift3d.systems.image_to_3d import ImageTo3D
def _oom(self, views, step):
    raise {error}
ImageTo3D.training_step = _oom
"""
NAN_PARAMS_AT_STEP_3 = """
import torch
_step, _n = torch.optim.Adam.step, [0]
def _nan(self, *a, **k):
    out = _step(self, *a, **k)
    _n[0] += 1
    if _n[0] == 3:
        with torch.no_grad():
            for g in self.param_groups:
                for p in g['params']:
                    p.fill_(float('nan'))
    return out
torch.optim.Adam.step = _nan
"""

L = ["launch", "--config", "{tiny}", "image={img}", "{out}"]          # a fresh tiny run in the case's folder
NVS = ["nvs", "--model", "{pkg}/assets/zero123-mini", "--elevation", "0", "--azimuth", "30", "--out", "{dir}/nvs",
       "--steps", "2", "--n-samples", "1", "--device", "cpu"]
COPY = "{copy}/ckpts/last.ckpt"

# The cases of issue 14 (data lost, tracebacks, wrong exit codes and messages, leftovers).
CASES = [
    # data lost
    Case("nan-stop lr=inf", L + ["system.optimizer.lr=inf", "trainer.ckpt_every=1"], message="lr",
         check=good_ckpt()),
    Case("nan-stop lr=1e38", L + ["system.optimizer.lr=1e38", "trainer.ckpt_every=1"], message="system.optimizer.lr",
         avoid="last good checkpoint: ", check=good_ckpt()),
    Case("blow-up lr=1e30", L + ["system.optimizer.lr=1e30", "trainer.ckpt_every=1"], message="system.optimizer.lr",
         check=good_ckpt()),
    Case("NaN parameters after a good checkpoint", L + ["trainer.ckpt_every=1"], message="last good checkpoint",
         prelude=NAN_PARAMS_AT_STEP_3, check=good_ckpt(2, must_exist=True)),
    Case("trial folder in use", L, message="in use", setup=lock_with_pid(os.getpid), check=locked_trial_untouched),
    Case("stale lock is taken over", L, expect=0, setup=lock_with_pid(dead_pid), check=lock_released),
    Case("--test with another config", ["launch", "--config", "{tiny}", "--test", f"resume={COPY}",
                                        "data.n_test_views=5"], message="parsed.yaml", setup=copy_trial,
         check=trial_copy_intact),
    Case("--export with another config", ["launch", "--config", "{tiny}", "--export", f"resume={COPY}",
                                          "system.export.resolution=48"], message="system.export.resolution",
         setup=copy_trial, check=trial_copy_intact, in_test=False),
    # tracebacks
    Case("random bytes as resume=", ["launch", "--config", "{tiny}", "image={img}", "--export",
                                     "resume={dir}/random.ckpt"], message="not a", avoid="list index",
         setup=random_bytes("random.ckpt")),
    Case("blocked pickle as resume=", ["launch", "--config", "{tiny}", "--export", "resume={dir}/evil.ckpt"],
         message="evil.ckpt", setup=evil_pickle("evil.ckpt", torch_format=False), check=not_pwned),
    Case("random bytes to convert-ckpt", ["convert-ckpt", "{dir}/random.ckpt", "{dir}/conv"], message="random.ckpt",
         setup=random_bytes("random.ckpt"), in_test=False),
    Case("blocked pickle (torch zip) to convert-ckpt", ["convert-ckpt", "{dir}/evil.ckpt", "{dir}/conv"],
         message="evil.ckpt", setup=evil_pickle("evil.ckpt", torch_format=True), check=not_pwned),
    Case("read-only output folder", ["launch", "--config", "{tiny}", "image={img}", "exp_root_dir={ro}"],
         message="cannot write", setup=readonly_root),
    Case("exp_root_dir is a file", ["launch", "--config", "{tiny}", "image={img}", "exp_root_dir={tiny}"],
         message="exp_root_dir"),
    Case("disk full while writing a checkpoint", L + ["trainer.ckpt_every=1"], message="No space left",
         prelude=DISK_FULL_ON_3RD_SAVE, check=good_ckpt(2, must_exist=True)),
    Case("data.reference_height=0", L + ["data.reference_height=0"], message="data.reference_height",
         check=no_trial_folder),
    Case("data.eval_height=0", L + ["data.eval_height=0"], message="data.eval_height", check=no_trial_folder),
    Case("data.n_test_views=0", L + ["data.n_test_views=0"], message="data.n_test_views", check=no_trial_folder),
    Case("trainer.device=banana", L + ["trainer.device=banana"], message="banana", check=no_trial_folder),
    Case("out of memory", L, message="data.height", prelude=OOM_IN_STEP.replace(
        "{error}", "torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')")),
    # wrong exit code, misleading message
    Case("trainer.max_steps=0", L + ["trainer.max_steps=0"], message="trainer.max_steps", check=no_trial_folder),
    Case("trainer.max_steps=-3", L + ["trainer.max_steps=-3"], message="trainer.max_steps", in_test=False),
    Case("trainer.val_every=-1", L + ["trainer.val_every=-1"], message="trainer.val_every"),
    Case("trainer.ckpt_every=-1", L + ["trainer.ckpt_every=-1"], message="trainer.ckpt_every", in_test=False),
    Case("eval: zero-area mesh", ["eval", "--pred", "{dir}/flat.obj", "--gt", "{pkg}/examples/objects/car"],
         message="area", setup=obj_file("flat.obj", [(0, 0, 0), (1, 0, 0), (2, 0, 0)], [(1, 2, 3)])),
    Case("eval: partly NaN mesh", ["eval", "--pred", "{dir}/nan.obj", "--gt", "{pkg}/examples/objects/car"],
         message="not finite", setup=obj_file("nan.obj", [(0, 0, 0), (1, 0, 0), (0, 1, 0), ("nan", 0, 1)],
                                              [(1, 2, 3), (1, 3, 4)])),
    Case("a directory as the image", ["launch", "--config", "{tiny}", "image={dir}", "{out}"],
         message="directory", check=no_trial_folder),
    Case("32-bit float TIFF", ["launch", "--config", "{tiny}", "image={dir}/float.tif", "{out}"],
         message="32-bit", avoid="background colour", setup=float_tiff),
    Case("default_elevation_deg=nan", L + ["data.default_elevation_deg=nan"], message="data.default_elevation_deg",
         avoid="learning rate"),
    Case("YAML syntax error", ["launch", "--config", "{dir}/bad.yaml"], message="line 4",
         setup=write("bad.yaml", "name: x\ntrainer:\n  max_steps: [1, 2\n  device: cpu\n")),
    Case("a JPEG given as the model", ["nvs", "--model", "{dir}/photo.jpg", "--image", "{img}", "--elevation", "0",
                                       "--azimuth", "30", "--out", "{dir}/nvs"], message="photo.jpg",
         avoid="weights_only", setup=write("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 200)),
    Case("unknown plugin names the valid ones", L + ["system.geometry_type=x"],
         message="valid: gaussians, hashgrid-nerf, voxel-rf", avoid="guidance"),
    Case("nvs: missing image before the model loads", [*NVS[:3], "--image", "{dir}/missing.png", *NVS[3:]],
         message="missing.png", timeout=20),
    # leftovers
    Case("orphan .tmp files are cleaned", ["launch", "--config", "{copy}/configs/parsed.yaml", "--export",
                                           f"resume={COPY}"], expect=0, setup=plant_tmp_files, check=tmp_files_gone),
    Case("no stub trial folder for a bad input", L[:3] + ["image={dir}/missing.png", "{out}"], message="not found",
         check=no_trial_folder),
]
