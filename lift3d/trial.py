"""The trial folder ``<exp_root_dir>/<name>/<tag>[@timestamp]/``: where it is, its lock, its checkpoints'
reading, and whether a config would give other results than the one a trial was made with.

A run holds the folder's lock (:class:`TrialLock`) while it writes there, so a second run in the same
folder refuses; a lock left by a killed run (a dead process on this host) is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time

from omegaconf import OmegaConf

from lift3d.config import ExperimentConfig
from lift3d.errors import UserError
from lift3d.utils import io

log = logging.getLogger("lift3d")

# Config keys that do not change what --test/--export write (where and how a run goes, not what it computes).
RESULT_NEUTRAL_KEYS = ("name", "tag", "exp_root_dir", "use_timestamp", "resume", "trainer", "data.image_path")


class TrialLock:
    """``<trial>/.lift3d.lock``: "PID HOST" of the run using a trial folder, so that a second run in the same
    folder refuses instead of mixing its outputs in. A lock left by a killed run on this host (its process
    is gone) is taken over. ``release`` also removes the folders ``acquire`` created if they hold no file (a run
    that fails before writing anything, a disk full from the start), so it leaves no stub trial folder behind."""

    NAME = ".lift3d.lock"

    def __init__(self, trial_dir: str):
        self.trial_dir = trial_dir
        self.path = os.path.join(trial_dir, self.NAME)
        self.created: list[str] = []
        self.held = False

    def acquire(self) -> None:
        folder = os.path.abspath(self.trial_dir)
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            self.created.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self.trial_dir, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self._take_over_stale()
                    continue
                self.held = True      # from here on release() removes it, also when writing the pid fails
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {socket.gethostname()}\n")
                return
        except OSError as e:
            self.release()
            hint = "free disk space, or set exp_root_dir to another disk" if e.errno == errno.ENOSPC else \
                "set exp_root_dir to a folder you can write"
            raise UserError(f"cannot write the trial folder {self.trial_dir}: {e.strerror or e}; {hint}") from None
        raise UserError(f"trial folder {self.trial_dir} is in use: another run took its lock at the same time")

    def _take_over_stale(self) -> None:
        try:
            with open(self.path) as f:
                pid_text, _, host = f.read().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            pid, host = None, ""
        if pid is not None and (host != socket.gethostname() or _alive(pid)):
            raise UserError(f"trial folder {self.trial_dir} is in use by another run (pid {pid} on {host or '?'}); "
                            "wait for it to finish or choose another folder (tag=..., or use_timestamp=true); "
                            f"if that run is gone, delete {self.path}")
        log.warning("taking over the lock of a run that is gone (pid %s) in %s", pid, self.trial_dir)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.held = False
        if self.created and not _holds_files(self.trial_dir):   # a run that wrote nothing: no folders left behind
            for base, _, _ in sorted(os.walk(self.trial_dir), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(base)
        for folder in self.created:        # deepest first; stops at the first one holding something
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                continue
            except OSError:
                break
        self.created = []


def _holds_files(folder: str) -> bool:
    return any(files for _, _, files in os.walk(folder))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True        # exists, owned by another user
    return True


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def config_differences(trial_cfg, cfg) -> list[str]:
    """``key (new, trial: old)`` for every setting that differs and could change a result."""
    def flat(c):
        tree = _flatten(OmegaConf.to_container(c, resolve=True))
        return {k: v for k, v in tree.items()
                if not any(k == n or k.startswith(n + ".") for n in RESULT_NEUTRAL_KEYS)}

    old, new = flat(trial_cfg), flat(cfg)
    return [f"{k} ({new.get(k, 'unset')!r}, trial: {old.get(k, 'unset')!r})" for k in sorted(set(old) | set(new))
            if not _same_value(old.get(k), new.get(k))]


def trial_dir_for(exp: ExperimentConfig) -> str:
    if exp.resume:
        # Resuming (or testing/exporting) a run continues in that run's folder: <trial>/ckpts/last.ckpt.
        folder = os.path.dirname(os.path.abspath(exp.resume))
        if os.path.basename(folder) == "ckpts":
            return os.path.dirname(folder)
        # A checkpoint copied out of its trial: the trial folder exp_root_dir/name/tag names (the run's last line
        # prints it), not the checkpoint's grandparent.
    tag = exp.tag + (time.strftime("@%Y%m%d-%H%M%S") if exp.use_timestamp else "")
    return os.path.join(exp.exp_root_dir, exp.name, tag)


def load_checkpoint(path: str) -> dict:
    """A lift3d run's checkpoint (``resume=``), read through :func:`io.load_torch`; refuses a file that is not
    one, and one whose weights are not finite (written by a run that had already diverged: not resumable)."""
    from lift3d.utils.inputs import require_file

    require_file(path, "checkpoint", "pass resume=<trial>/ckpts/last.ckpt")
    try:
        ckpt = io.load_torch(path)
    except io.UnsafeCheckpoint as e:
        raise UserError(f"{e}; it is not a lift3d checkpoint") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("system"), dict) or "step" not in ckpt:
        raise UserError(f"{path} is not a lift3d checkpoint (no 'system'/'step' entries)")
    import torch

    def finite(v) -> bool:
        return not (torch.is_tensor(v) and v.is_floating_point()) or bool(torch.isfinite(v).all())

    bad = [k for k, v in ckpt["system"].items() if not finite(v)]
    state = ckpt.get("optimizer", {}).get("state", {}) if isinstance(ckpt.get("optimizer"), dict) else {}
    bad += [f"optimizer state {k}" for k, v in state.items()
            if isinstance(v, dict) and not all(finite(x) for x in v.values())][:1]
    if bad:
        more = f" and {len(bad) - 2} more" if len(bad) > 2 else ""
        raise UserError(f"checkpoint {path} holds weights that are not finite ({', '.join(bad[:2])}{more}): the run "
                        "that wrote it had diverged, so it cannot be resumed, tested or exported; use an earlier "
                        "checkpoint or train anew")
    return ckpt
