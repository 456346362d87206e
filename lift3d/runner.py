"""Runs an experiment: trial folder, training loop, checkpoints, validation, turntable, export, metrics.

The loop is plain PyTorch (no Lightning): one optimiser step per training step, a progress bar
with the losses and it/s, a checkpoint every ``trainer.ckpt_every`` steps and on Ctrl-C, SIGTERM or
SIGHUP (after the step under way: lift3d/utils/interrupts.py, so a resumed run repeats an uninterrupted
one exactly), and a stop with a clear message when a loss stops being finite or the parameters blow up
(not finite, or past PARAMETER_LIMIT); a checkpoint is only written while the parameters are good, so the
last one kept is always usable. Every file is written atomically (lift3d/utils/io.py): a full disk stops
the run with one line naming the file, the previous checkpoint and export intact.

Inputs (config values, the image, resume=, the evaluation protocol) are checked before the trial
folder is created. A run holds the folder's lock (:class:`TrialLock`) while it writes there, so a
second run in the same folder refuses; a killed run's lock and temporary files are cleaned up by the
next one. ``--test``/``--export`` refuse a config that would give other results than the trial's own.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lift3d.config import ExperimentConfig, parse_config
from lift3d.errors import UserError
from lift3d.preflight import check_memory
from lift3d.registry import find
from lift3d.systems.base import RunContext
from lift3d.trial import TrialLock, config_differences, load_checkpoint, trial_dir_for
from lift3d.utils import figures, interrupts, io
from lift3d.utils.device import pick_device
from lift3d.utils.heap import MAX_THRESHOLD_MIB, set_mmap_threshold
from lift3d.utils.images import save_video
from lift3d.utils.losslog import LossLog

log = logging.getLogger("lift3d")


# A parameter whose magnitude reaches this has blown up (a learning rate far too high) even while it is finite.
PARAMETER_LIMIT = 1e8


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP stopped training; ``ckpt_path`` is the checkpoint to continue from (None: there
    is none) and ``exit_code`` the shell's 128 + the signal's number. A KeyboardInterrupt, so that a caller
    catching Exception (a benchmark going on to its next object) stops too."""

    def __init__(self, message: str, ckpt_path: Optional[str], exit_code: int = 130):
        super().__init__(message)
        self.ckpt_path = ckpt_path
        self.exit_code = exit_code


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
        set_mmap_threshold(self.exp.trainer.mmap_threshold_mib)
        self._seed(self.exp.seed)
        self.data = find(self.exp.data_type, "data")(self.exp.data, path="data")
        self.system = find(self.exp.system_type, "system")(self.exp.system, path="system").to(self.device)
        self.step = 0
        self.generator = torch.Generator().manual_seed(self.exp.seed)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ckpt_step: Optional[int] = None    # the step of ckpts/last.ckpt as this run last wrote or read it
        self.outputs: dict = {}   # what this run wrote, for the end-of-run print: {what: path}
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
        except io.WriteFailed as e:   # a full disk (torch.save raises RuntimeError, the rest OSError), read-only
            raise UserError(f"cannot write checkpoint {self.ckpt_path} at step {self.step}: {e.reason}; "
                            f"{self._previous_checkpoint()} (free disk space, then continue with resume=)") from None
        self.ckpt_step = self.step
        return self.ckpt_path

    def _previous_checkpoint(self) -> str:
        if not os.path.exists(self.ckpt_path):
            return "no checkpoint was written"
        at = f" (step {self.ckpt_step})" if self.ckpt_step is not None else ""
        return f"the previous checkpoint{at} is kept"

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
        if os.path.abspath(path) == os.path.abspath(self.ckpt_path):
            self.ckpt_step = self.step

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
        with interrupts.stop_signals():    # SIGTERM/SIGHUP, like Ctrl-C, end in the finally below: the lock goes
            lock = TrialLock(self.trial_dir)
            lock.acquire()
            try:
                io.remove_orphans(self.trial_dir)
                if mode == "train":
                    self.train()
                    self.export()      # first: the turntable and the summary show the exported mesh
                    self.test()
                else:
                    self.restore(self.exp.resume)
                    self.system.setup(self.data, self.context(), train=False)
                    if mode == "test":
                        self.test()
                    elif mode == "export":
                        self.export()
            except interrupts.Stopped as e:    # outside a training step: at once, every write whole or not at all
                raise interrupts.Stopped(e.signum, f"{interrupts.describe(e.signum)} before the run finished; "
                                                   f"{self._stop_note(mode)}") from None
            finally:
                lock.release()
        self.report()
        return self.trial_dir

    def _stop_note(self, mode: str) -> str:
        if mode == "export":
            return (f"{self.path('export')} and metrics.json are as they were; "
                    f"run --export resume={self.exp.resume} again")
        if mode != "train":
            return f"run --{mode} resume={self.exp.resume} again"
        if not os.path.exists(self.ckpt_path):
            return "no checkpoint was written"
        return f"the checkpoint {self.ckpt_path} is kept (continue with resume={self.ckpt_path})"

    def train(self) -> None:
        from tqdm import tqdm

        t = self.exp.trainer
        self.data.reference_view()  # bad input fails here, before a model loads
        check_memory(self)          # so does a run that would not fit in memory (lift3d/preflight.py)
        if self.exp.resume:   # the weights first: a checkpoint of another model fails before the prior loads
            self.restore(self.exp.resume)
        self.system.setup(self.data, self.context(), train=True)
        if self.exp.resume:   # again, with what setup built (a guidance's trainable state) and the optimiser
            self.restore(self.exp.resume, with_optimizer=True)
        else:
            self.optimizer = self.system.configure_optimizer()
        io.write_text(self.path("configs", "parsed.yaml"), OmegaConf.to_yaml(self.raw_cfg))
        self.system.train()
        losses = LossLog(self.path("save", "losses.csv"), resume_step=self.step if self.exp.resume else None,
                         tensorboard_dir=self.path("tensorboard"))
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=os.environ.get("LIFT3D_NO_PROGRESS") == "1")
        with interrupts.stop_signals():
            try:
                with interrupts.deferred():    # a stop signal waits for the end of the step under way
                    while self.step < t.max_steps and not interrupts.pending():
                        self._train_step(losses, bar)
                    bar.close()
                    ckpt = self.save_checkpoint()
                    if interrupts.pending():
                        raise self._interrupted(interrupts.pending(), ckpt)
            except Interrupted:
                raise
            except KeyboardInterrupt as e:     # a second signal, or Ctrl-C where no handler could be set: mid-step
                bar.close()
                raise self._stopped_mid_step(e) from None
            except io.WriteFailed as e:        # the loss log or a validation picture
                raise UserError(f"{e}; training stopped at step {self.step}, {self._kept()} "
                                "(free disk space, then continue with resume=)") from None
            finally:
                losses.close()
        self.outputs["losses"] = losses.path
        self.outputs["loss curve"] = figures.loss_curve(losses.path, self.path("save", "losses.png"))

    def _train_step(self, losses: LossLog, bar) -> None:
        """One optimiser step, then the loss log, validation and checkpoint on their schedules."""
        t = self.exp.trainer
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
            losses.append(self.step, {k: float(v.detach() if torch.is_tensor(v) else v)
                                      for k, v in out.items() if _is_scalar(v)})
            bar.set_postfix({k.replace("loss_", ""): f"{float(v.detach() if torch.is_tensor(v) else v):.3g}"
                            for k, v in out.items()})
        if t.val_every and self.step % t.val_every == 0:
            self.validate()
        if t.ckpt_every and self.step % t.ckpt_every == 0:
            self.save_checkpoint()

    def _interrupted(self, signum: int, ckpt: Optional[str]) -> Interrupted:
        """A stop signal arrived during training; the step under way finished and ``ckpt`` holds its state."""
        if ckpt:
            return Interrupted(f"{interrupts.describe(signum)} at step {self.step}; checkpoint saved, "
                               f"continue with resume={ckpt}", ckpt, 128 + signum)
        kept = self.ckpt_path if os.path.exists(self.ckpt_path) else None
        return Interrupted(f"{interrupts.describe(signum)} at step {self.step}; no checkpoint saved (the parameters "
                           f"are not finite)" + (f", continue from the previous one: resume={kept}" if kept else ""),
                           kept, 128 + signum)

    def _stopped_mid_step(self, e: KeyboardInterrupt) -> Interrupted:
        """Stopped inside a step: its state is half-updated, so no checkpoint of it (it would not resume exactly)."""
        signum = getattr(e, "signum", signal.SIGINT)
        again = " again" if interrupts.pending() else ""
        line = f"{interrupts.describe(signum)}{again} during step {self.step + 1}: stopped there, unsaved; "
        if not os.path.exists(self.ckpt_path):
            return Interrupted(line + "no checkpoint was written", None, 128 + signum)
        return Interrupted(line + f"{self._previous_checkpoint()}, continue with resume={self.ckpt_path}",
                           self.ckpt_path, 128 + signum)

    def context(self) -> RunContext:
        return RunContext(device=self.device, trial_dir=self.trial_dir, seed=self.exp.seed)

    def validate(self) -> None:
        io.save_image(self.path("save", f"it{self.step}-val.png"),
                      figures.labelled_grid([self.system.validation_images()]))

    def _camera_line(self) -> str:
        camera = self.system.reference.camera
        e, a, d = (float(x) for x in camera.spherical[0])
        return f"input camera: elevation {e:.1f}, azimuth {a:.1f}, distance {d:.2f}, fovy {float(camera.fovy_deg[0]):.1f}"

    def test(self) -> None:
        """The turntable video (at least MIN_VIDEO_SECONDS long) and the summary image under save/; both show
        the exported mesh next to the field when export/ holds one (a train run exports first)."""
        if self.system.exported is None:
            found = {k: self.path("export", f"model.{k}") for k in ("glb", "obj")}
            found = {k: v for k, v in found.items() if os.path.isfile(v)}
            self.system.exported = found or None
        frames = [(img.numpy() * 255).astype(np.uint8) for img in self.system.test_frames()]
        if frames:
            fps = turntable_fps(len(frames))
            frames = frames * -(-MIN_VIDEO_SECONDS * fps // len(frames))   # repeat a turntable too short to last
            self.outputs["turntable"] = save_video(self.path("save", f"it{self.step}-test"), frames, fps=fps)
        rows = self.system.summary_images()
        if rows:
            title = f"{self.exp.name}/{self.exp.tag}  step {self.step}  |  {self._camera_line()}"
            metrics = io.read_json_if_any(self.path("metrics.json"))     # export wrote it, if it ran
            if isinstance(metrics, dict):
                title += f"  |  {_metrics_line(metrics)}"
            io.save_image(self.path("save", "summary.png"), figures.labelled_grid(rows, title=title))
            self.outputs["summary"] = self.path("save", "summary.png")

    def export(self) -> None:
        """export/ and metrics.json, whole or not at all: a failure (a full disk at model.glb) leaves the previous
        export and its metrics as they were."""
        try:
            with io.all_or_nothing():
                exported = self.system.export(self.path("export"))
                metrics = self.system.metrics(exported, self.exp.eval_protocol)
                if metrics is not None:
                    io.write_json(self.path("metrics.json"), metrics)
        except io.WriteFailed as e:
            retry = f"--export resume={self.ckpt_path}" if os.path.exists(self.ckpt_path) else "the export"
            raise UserError(f"cannot write {e.path}: {e.reason}; the export in {self.path('export')} and metrics.json "
                            f"are left as they were (free disk space, then run {retry})") from None
        log.info("exported %s", ", ".join(exported.values()))
        meshes = [exported[k] for k in ("obj", "glb") if k in exported]
        if meshes:
            self.outputs["mesh"] = ", ".join(meshes)
        if metrics is not None:
            self.outputs["metrics"] = f"{self.path('metrics.json')}  {_metrics_line(metrics)}"

    def report(self) -> None:
        """The last lines of a run: where its results are."""
        order = ("mesh", "turntable", "summary", "losses", "loss curve", "metrics")
        shown = sorted(((k, v) for k, v in self.outputs.items() if v),
                       key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        width = max((len(k) for k, _ in shown), default=0) + 1
        for what, where in shown:
            print(f"{what + ':':<{width}} {where}")


MIN_VIDEO_SECONDS = 3


def turntable_fps(n_frames: int) -> int:
    """Frames per second that make ``n_frames`` last at least MIN_VIDEO_SECONDS (at most 30 fps)."""
    return max(1, min(30, n_frames // MIN_VIDEO_SECONDS))


def _is_scalar(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (torch.is_tensor(v) and v.numel() == 1)


def _check_trainer(t) -> None:
    if t.max_steps < 1:
        raise UserError(f"trainer.max_steps must be at least 1, got {t.max_steps}")
    for key in ("val_every", "ckpt_every", "log_every", "num_threads"):
        if getattr(t, key) < 0:
            raise UserError(f"trainer.{key} must be 0 (never/default) or positive, got {getattr(t, key)}")
    if not 0 <= t.mmap_threshold_mib <= MAX_THRESHOLD_MIB:
        raise UserError(f"trainer.mmap_threshold_mib must be between 0 (glibc's default) and {MAX_THRESHOLD_MIB}, "
                        f"got {t.mmap_threshold_mib}")


def _metrics_line(metrics: dict) -> str:
    keys = ("chamfer_distance", "volume_iou")
    parts = [f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), (int, float))]
    ref = metrics.get("reference_view") or {}
    parts += [f"reference_view_{k}={ref[k]:.{d}f}" for k, d in (("psnr", 2), ("silhouette_iou", 3), ("see_through", 4))
              if isinstance(ref.get(k), (int, float))]
    return " ".join(parts)


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
