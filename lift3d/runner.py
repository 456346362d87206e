"""Runs an experiment: trial folder, training loop, checkpoints, validation, turntable, export, metrics.

The loop is plain PyTorch (no Lightning): one optimiser step per training step, a progress bar
with the losses and it/s, a checkpoint every ``trainer.ckpt_every`` steps and on Ctrl-C, and a
stop with a clear message when a loss stops being finite or the parameters blow up (not finite, or
past PARAMETER_LIMIT); a checkpoint is only written while the parameters are good, so the last one
kept is always usable.

Inputs (config values, the image, resume=, the evaluation protocol) are checked before the trial
folder is created. A run holds the folder's lock (:class:`TrialLock`) while it writes there, so a
second run in the same folder refuses; a killed run's lock and temporary files are cleaned up by the
next one. ``--test``/``--export`` refuse a config that would give other results than the trial's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lift3d.config import ExperimentConfig, parse_config
from lift3d.errors import UserError
from lift3d.registry import find
from lift3d.systems.base import RunContext
from lift3d.utils import io
from lift3d.utils.device import pick_device
from lift3d.utils.images import image_grid, save_video

log = logging.getLogger("lift3d")


# A parameter whose magnitude reaches this has blown up (a learning rate far too high) even while it is finite.
PARAMETER_LIMIT = 1e8
# Config keys that do not change what --test/--export write (where and how a run goes, not what it computes).
RESULT_NEUTRAL_KEYS = ("name", "tag", "exp_root_dir", "use_timestamp", "resume", "trainer", "data.image_path")


class Interrupted(Exception):
    """Ctrl-C during training; the checkpoint has been saved (``ckpt_path``; None when none could be)."""

    def __init__(self, ckpt_path: Optional[str], step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved, continue with resume={ckpt_path}" if ckpt_path
                         else f"interrupted at step {step}; no checkpoint saved (the parameters are not finite)")
        self.ckpt_path = ckpt_path


class TrialLock:
    """``<trial>/.lift3d.lock``: "PID HOST" of the run using a trial folder, so that a second run in the same
    folder refuses instead of mixing its outputs in. A lock left by a killed run on this host (its process
    is gone) is taken over. ``release`` also removes the folders ``acquire`` created if they are still empty,
    so a run that fails before writing anything leaves no stub trial folder behind."""

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
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {socket.gethostname()}\n")
                self.held = True
                return
        except OSError as e:
            self.release()
            raise UserError(f"cannot write the trial folder {self.trial_dir}: {e.strerror or e}; "
                            "set exp_root_dir to a folder you can write") from None
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
        for folder in self.created:        # deepest first; stops at the first one holding something
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.created = []


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
        return os.path.dirname(os.path.dirname(os.path.abspath(exp.resume)))
    tag = exp.tag + (time.strftime("@%Y%m%d-%H%M%S") if exp.use_timestamp else "")
    return os.path.join(exp.exp_root_dir, exp.name, tag)


def load_checkpoint(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f"resume={path} is a folder; pass a checkpoint file, resume=<trial>/ckpts/last.ckpt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (pass resume=<trial>/ckpts/last.ckpt)")
    try:
        ckpt = io.load_torch(path)
    except io.UnsafeCheckpoint as e:
        raise UserError(f"{e}; it is not a lift3d checkpoint") from None
    if not isinstance(ckpt, dict) or "system" not in ckpt or "step" not in ckpt:
        raise UserError(f"{path} is not a lift3d checkpoint (no 'system'/'step' entries)")
    return ckpt


class Experiment:
    """One trial: builds data and system from a validated config and runs the requested mode."""

    def __init__(self, cfg: DictConfig):
        self.raw_cfg = cfg
        self.exp: ExperimentConfig = parse_config(ExperimentConfig, cfg)
        _check_trainer(self.exp.trainer)
        self.trial_dir = trial_dir_for(self.exp)
        self.device = pick_device(self.exp.trainer.device)
        if self.exp.trainer.num_threads:
            torch.set_num_threads(self.exp.trainer.num_threads)
        self._seed(self.exp.seed)
        self.data = find(self.exp.data_type, "data")(self.exp.data, path="data")
        self.system = find(self.exp.system_type, "system")(self.exp.system, path="system").to(self.device)
        self.step = 0
        self.generator = torch.Generator().manual_seed(self.exp.seed)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._loaded: dict = {}           # checkpoints read while checking the inputs, by path

    # ------------------------------------------------------------------ paths

    def path(self, *parts: str) -> str:
        return os.path.join(self.trial_dir, *parts)

    @property
    def ckpt_path(self) -> str:
        return self.path("ckpts", "last.ckpt")

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ checkpoints

    def bad_parameter(self) -> Optional[str]:
        """The first parameter that is not finite or has blown up past PARAMETER_LIMIT (``name (max |value| x)``)."""
        params = [(n, p) for n, p in self.system.named_parameters() if p.is_floating_point() and p.numel()]
        if not params:
            return None
        peaks = torch.stack([p.detach().abs().max().float() for _, p in params])
        ok = peaks < PARAMETER_LIMIT          # False for NaN and inf too
        if bool(ok.all()):
            return None
        i = int((~ok).nonzero()[0])
        return f"{params[i][0]} reached {float(peaks[i]):.3g}"

    def _kept(self) -> str:
        return f"last good checkpoint: {self.ckpt_path}" if os.path.exists(self.ckpt_path) else \
            "no checkpoint was written yet"

    def _blew_up(self, what: str) -> UserError:
        lr = self.exp.system.get("optimizer", {}).get("lr", "default")
        return UserError(f"the parameters blew up at step {self.step}: {what}; stopped, {self._kept()}. "
                         f"Lower system.optimizer.lr (now {lr}) or the loss weights.")

    def save_checkpoint(self) -> Optional[str]:
        """Write ``ckpts/last.ckpt`` (atomically) and return its path; None, writing nothing, when the parameters
        are not finite: a good checkpoint is never replaced by a bad one."""
        if self.bad_parameter():
            return None
        state = {
            "step": self.step,
            "system": self.system.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
            "torch_rng": torch.get_rng_state(),
            "view_rng": self.generator.get_state(),
            "config": OmegaConf.to_yaml(self.raw_cfg),
        }
        try:
            io.save_torch(self.ckpt_path, state)
        except OSError as e:
            kept = "the previous checkpoint is kept" if os.path.exists(self.ckpt_path) else "no checkpoint was written"
            raise UserError(f"cannot write checkpoint {self.ckpt_path} at step {self.step}: {e.strerror or e}; "
                            f"{kept} (free disk space, then continue with resume=)") from None
        return self.ckpt_path

    def restore(self, path: str, with_optimizer: bool = False) -> None:
        """Load a checkpoint's weights (their shapes may differ: see BaseSystem) and RNG states;
        with ``with_optimizer``, build the optimiser over the loaded weights and restore it too."""
        ckpt = self._loaded.pop(path, None) or load_checkpoint(path)
        try:
            self.system.load_state_dict(ckpt["system"])
        except RuntimeError as e:
            raise UserError(f"checkpoint {path} does not match this config's model: {str(e).splitlines()[0]}"
                            " (use the config saved in the trial's configs/parsed.yaml)") from None
        if with_optimizer:
            self.optimizer = self.system.configure_optimizer()
            if ckpt.get("optimizer"):
                self.optimizer.load_state_dict(ckpt["optimizer"])
        if "torch_rng" in ckpt:
            torch.set_rng_state(ckpt["torch_rng"])
        if "view_rng" in ckpt:
            self.generator.set_state(ckpt["view_rng"])
        self.step = int(ckpt["step"])

    # ------------------------------------------------------------------ modes

    def check_inputs(self, mode: str) -> None:
        """Everything that can be checked before any work and before the trial folder exists."""
        if mode not in ("train", "test", "export"):
            raise UserError(f"unknown mode '{mode}'; use train, test or export")
        if mode != "train" and not self.exp.resume:
            raise UserError(f"--{mode} needs a trained model: pass resume=<trial>/ckpts/last.ckpt")
        if self.exp.resume:
            self._loaded[self.exp.resume] = load_checkpoint(self.exp.resume)
        if mode == "train":
            self.data.reference_view()  # a bad image fails here, before a model loads
        if self.data.gt_mesh:
            from lift3d.evaluation.protocols import get_protocol

            get_protocol(self.exp.eval_protocol)
        if mode != "train":
            self._check_trial_config(mode)

    def _check_trial_config(self, mode: str) -> None:
        """--test/--export write into the trial of resume=: refuse a config that would give other results."""
        parsed = self.path("configs", "parsed.yaml")
        try:
            trial_cfg = OmegaConf.load(parsed) if os.path.isfile(parsed) else \
                OmegaConf.create(self._loaded[self.exp.resume].get("config") or "{}")
            diffs = config_differences(trial_cfg, self.raw_cfg)
        except Exception:      # an unreadable record of the trial's config: nothing to compare with
            return
        if diffs:
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise UserError(f"this config differs from the trial's {parsed} in {'; '.join(diffs[:3])}{more}: --{mode} "
                            f"would overwrite that trial's outputs with other settings; pass --config {parsed} "
                            "(trainer.* overrides are fine), or train a new trial with these settings")

    def run(self, mode: str) -> str:
        self.check_inputs(mode)
        lock = TrialLock(self.trial_dir)
        lock.acquire()
        try:
            io.remove_orphans(self.trial_dir)
            if mode == "train":
                self.train()
                self.test()
                self.export()
            else:
                self.restore(self.exp.resume)
                self.system.setup(self.data, self.context(), train=False)
                if mode == "test":
                    self.test()
                elif mode == "export":
                    self.export()
        finally:
            lock.release()
        return self.trial_dir

    def train(self) -> None:
        from tqdm import tqdm

        t = self.exp.trainer
        self.data.reference_view()  # bad input fails here, before a model loads
        if self.exp.resume:
            self.restore(self.exp.resume, with_optimizer=True)
        else:
            self.optimizer = self.system.configure_optimizer()
        self.system.setup(self.data, self.context(), train=True)
        io.write_text(self.path("configs", "parsed.yaml"), OmegaConf.to_yaml(self.raw_cfg))
        self.system.train()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=os.environ.get("LIFT3D_NO_PROGRESS") == "1")
        try:
            while self.step < t.max_steps:
                self.data.update_step(self.step)
                self.system.update_step(self.step)
                views = self.data.sample_views(self.generator).to(self.device)
                out = self.system.training_step(views, self.step)
                loss = out["loss"]
                if not torch.is_tensor(loss) or not torch.isfinite(loss):
                    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in out.items() if k.startswith("loss_"))
                    raise UserError(f"loss is not finite at step {self.step} ({terms}); stopped, {self._kept()}. "
                                    "Lower the learning rate or the loss weights.")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.system.on_after_backward(self.optimizer, self.step)
                try:
                    self.optimizer.step()
                except RuntimeError as e:   # an update too large for float32 ("cannot be converted ... overflow")
                    if "overflow" not in str(e):
                        raise
                    raise self._blew_up(f"the optimiser's update overflowed ({str(e).splitlines()[0]})") from None
                self.step += 1
                bad = self.bad_parameter()
                if bad:
                    raise self._blew_up(f"{bad} (not finite or over {PARAMETER_LIMIT:g})")
                bar.update(1)
                if self.step % max(t.log_every, 1) == 0 or self.step == t.max_steps:
                    bar.set_postfix({k.replace("loss_", ""): f"{float(v.detach() if torch.is_tensor(v) else v):.3g}"
                                    for k, v in out.items()})
                if t.val_every and self.step % t.val_every == 0:
                    self.validate()
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            raise Interrupted(self.save_checkpoint() or (self.ckpt_path if os.path.exists(self.ckpt_path) else None),
                              self.step) from None
        bar.close()
        self.save_checkpoint()

    def context(self) -> RunContext:
        return RunContext(device=self.device, trial_dir=self.trial_dir, seed=self.exp.seed)

    def validate(self) -> None:
        io.save_image(self.path("save", f"it{self.step}-val.png"), image_grid(self.system.validation_images()))

    def test(self) -> None:
        """Turntable renders: a video under save/."""
        frames = [(img.numpy() * 255).astype(np.uint8) for img in self.system.test_frames()]
        save_video(self.path("save", f"it{self.step}-test"), frames)

    def export(self) -> None:
        exported = self.system.export(self.path("export"))
        log.info("exported %s", ", ".join(exported.values()))
        metrics = self.system.metrics(exported, self.exp.eval_protocol)
        if metrics is not None:
            io.write_json(self.path("metrics.json"), metrics)
            print(_metrics_line(metrics))


def _check_trainer(t) -> None:
    if t.max_steps < 1:
        raise UserError(f"trainer.max_steps must be at least 1, got {t.max_steps}")
    for key in ("val_every", "ckpt_every", "log_every", "num_threads"):
        if getattr(t, key) < 0:
            raise UserError(f"trainer.{key} must be 0 (never/default) or positive, got {getattr(t, key)}")


def _metrics_line(metrics: dict) -> str:
    keys = ("chamfer_distance", "volume_iou")
    parts = [f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), (int, float))]
    return "metrics: " + " ".join(parts)


def run_experiment(config_path: str, overrides: list[str] = (), mode: str = "train") -> str:
    """Load and validate a config, run it, return the trial folder (what launch.py does)."""
    from lift3d.config import load_config

    return Experiment(load_config(config_path, list(overrides))).run(mode)


def load_trial(trial_dir: str, overrides: list[str] = ()) -> Experiment:
    """Rebuild a finished trial (its parsed config and last checkpoint) for evaluation."""
    from lift3d.config import load_config

    ckpt = os.path.join(trial_dir, "ckpts", "last.ckpt")
    exp = Experiment(load_config(os.path.join(trial_dir, "configs", "parsed.yaml"), [f"resume={ckpt}", *overrides]))
    exp.restore(ckpt)
    exp.system.setup(exp.data, exp.context(), train=False)
    exp.system.eval()
    return exp
