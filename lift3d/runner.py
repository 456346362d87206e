"""Runs an experiment: trial folder, training loop, checkpoints, validation, turntable, export, metrics.

The loop is plain PyTorch (no Lightning): one optimiser step per training step, a progress bar
with the losses and it/s, a checkpoint every ``trainer.ckpt_every`` steps and on Ctrl-C, and a
stop with a clear message when a loss stops being finite (the last good checkpoint is kept).
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lift3d.config import ExperimentConfig, parse_config
from lift3d.errors import UserError
from lift3d.preflight import check_memory
from lift3d.registry import find
from lift3d.systems.base import RunContext
from lift3d.utils import io
from lift3d.utils.device import pick_device
from lift3d.utils.images import image_grid, save_video

log = logging.getLogger("lift3d")


class Interrupted(Exception):
    """Ctrl-C during training; the checkpoint has been saved."""

    def __init__(self, ckpt_path: str, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved, continue with resume={ckpt_path}")
        self.ckpt_path = ckpt_path


def trial_dir_for(exp: ExperimentConfig) -> str:
    if exp.resume:
        # Resuming (or testing/exporting) a run continues in that run's folder: <trial>/ckpts/last.ckpt.
        return os.path.dirname(os.path.dirname(os.path.abspath(exp.resume)))
    tag = exp.tag + (time.strftime("@%Y%m%d-%H%M%S") if exp.use_timestamp else "")
    return os.path.join(exp.exp_root_dir, exp.name, tag)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (pass resume=<trial>/ckpts/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "system" not in ckpt or "step" not in ckpt:
        raise UserError(f"{path} is not a lift3d checkpoint (no 'system'/'step' entries)")
    return ckpt


class Experiment:
    """One trial: builds data and system from a validated config and runs the requested mode."""

    def __init__(self, cfg: DictConfig):
        self.raw_cfg = cfg
        self.exp: ExperimentConfig = parse_config(ExperimentConfig, cfg)
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

    def save_checkpoint(self) -> str:
        state = {
            "step": self.step,
            "system": self.system.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
            "torch_rng": torch.get_rng_state(),
            "view_rng": self.generator.get_state(),
            "config": OmegaConf.to_yaml(self.raw_cfg),
        }
        io.save_torch(self.ckpt_path, state)
        return self.ckpt_path

    def restore(self, path: str, with_optimizer: bool = False) -> None:
        """Load a checkpoint's weights (their shapes may differ: see BaseSystem) and RNG states;
        with ``with_optimizer``, build the optimiser over the loaded weights and restore it too."""
        ckpt = load_checkpoint(path)
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

    def run(self, mode: str) -> str:
        os.makedirs(self.trial_dir, exist_ok=True)
        if mode == "train":
            io.write_text(self.path("configs", "parsed.yaml"), OmegaConf.to_yaml(self.raw_cfg))
            self.train()
            self.test()
            self.export()
        else:
            if not self.exp.resume:
                raise UserError(f"--{mode} needs a trained model: pass resume=<trial>/ckpts/last.ckpt")
            self.restore(self.exp.resume)
            self.system.setup(self.data, self.context(), train=False)
            if mode == "test":
                self.test()
            elif mode == "export":
                self.export()
        return self.trial_dir

    def train(self) -> None:
        from tqdm import tqdm

        t = self.exp.trainer
        self.data.reference_view()  # bad input fails here, before a model loads
        check_memory(self)          # so does a run that would not fit in memory (lift3d/preflight.py)
        if self.exp.resume:
            self.restore(self.exp.resume, with_optimizer=True)
        else:
            self.optimizer = self.system.configure_optimizer()
        self.system.setup(self.data, self.context(), train=True)
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
                    kept = f"last good checkpoint: {self.ckpt_path}" if os.path.exists(self.ckpt_path) else \
                        "no checkpoint was written yet"
                    raise UserError(f"loss is not finite at step {self.step} ({terms}); stopped, {kept}. "
                                    "Lower the learning rate or the loss weights.")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.system.on_after_backward(self.optimizer, self.step)
                self.optimizer.step()
                self.step += 1
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
            raise Interrupted(self.save_checkpoint(), self.step) from None
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
