"""The diffusion training loop shared by ``lift3d train-zero123`` and ``lift3d train-cascade``.

:class:`TrainLoop` owns what the two commands have in common: the trained parameters by name,
AdamW with the camera projection at 10x the learning rate (as Zero123), a linear warm-up then
cosine or constant learning-rate schedule, gradient-norm clipping at 1, an EMA of the trained
weights (what the final model is saved with), the step count, wall time and a time limit, the
per-step losses and ``OUT/loss.csv``. Each command supplies the batch loss and its own checkpoint
contents; :meth:`TrainLoop.state` / :meth:`TrainLoop.load_state` hold the loop's part of it.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import torch

from lift3d.errors import UserError
from lift3d.utils.io import UnsafeCheckpoint, load_torch, write_text

PROJECTION_LR_FACTOR = 10  # Zero123 trains the camera projection at 10x the base learning rate


def named_params(modules: dict) -> dict:
    return {f"{m}.{k}": p for m, mod in modules.items() for k, p in mod.named_parameters()}


def param_groups(params: dict, lr: float) -> list[dict]:
    """AdamW groups: everything at ``lr``, the ``projection.*`` parameters at 10x."""
    projection = [p for k, p in params.items() if k.startswith("projection.")]
    rest = [p for k, p in params.items() if not k.startswith("projection.")]
    return [{"params": rest, "lr": lr}, {"params": projection, "lr": PROJECTION_LR_FACTOR * lr}]


def lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    """Linear warm-up, then constant or a cosine decay to 10% at ``total`` steps (annealing the
    learning rate at the end lowers the final loss noticeably at these small step counts)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(total - warmup, 1))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))
    return factor


def out_of_time(t0: float, minutes) -> bool:
    return minutes is not None and time.time() - t0 > 60 * minutes


def write_loss_csv(out: str, losses: list) -> None:
    """``OUT/loss.csv``: every 50th step's loss and the mean of the last 100."""
    rows, window = ["step,loss,loss_avg100"], []
    for step, loss in losses:
        window = (window + [loss])[-100:]
        if step % 50 == 0:
            rows.append(f"{step},{loss:.5f},{sum(window) / len(window):.5f}")
    write_text(os.path.join(out, "loss.csv"), "\n".join(rows) + "\n")


def replace_model_folder(model, path: str) -> None:
    """Save ``model`` as a model folder, replacing one written there earlier."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        import shutil

        shutil.rmtree(path)
    model.save_pretrained(path)


class EMA:
    """Exponential moving average of named parameters, by ``diffusers.training_utils.EMAModel``
    (decay min(decay, (1 + n) / (10 + n)) at update n + 1). It differs from lift3d's earlier
    hand-written EMA only at the first update, which copies the weights instead of keeping 90% of
    the initial ones; that initial share decays as ∏ k / (9 + k) (< 1e-5 after 10 updates), so
    the saved models are the same to float precision after a few dozen steps (see tests)."""

    def __init__(self, params: dict, decay: float):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.model = EMAModel(list(params.values()), decay=decay)

    def update(self) -> None:
        self.model.step(list(self.params.values()))

    @property
    def shadow(self) -> dict:
        return dict(zip(self.params, self.model.shadow_params))

    def load(self, shadow: dict, updates: int) -> None:
        self.model.shadow_params = [shadow[k].clone() for k in self.params]
        self.model.optimization_step = int(updates)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for p, s in zip(self.params.values(), self.model.shadow_params):
            live = p.detach().clone()
            p.copy_(s)
            s.copy_(live)


class TrainLoop:
    """Optimiser, schedule, EMA, step count, wall time and losses of one diffusion training run."""

    def __init__(self, trainable: dict, *, lr: float, warmup: int, steps: int, ema_decay: float, seed: int,
                 out: str, ckpt_every: int, max_minutes: Optional[float] = None, schedule: str = "cosine",
                 desc: str = "train"):
        for module in trainable.values():
            module.train().requires_grad_(True)
        self.params = named_params(trainable)
        self.opt = torch.optim.AdamW(param_groups(self.params, lr), weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(warmup, steps, schedule))
        self.ema = EMA(self.params, ema_decay)
        self.steps, self.seed, self.out, self.ckpt_every, self.max_minutes, self.desc = \
            steps, seed, out, ckpt_every, max_minutes, desc
        self.step, self.elapsed, self.losses = 0, 0.0, []

    def state(self) -> dict:
        """The loop's part of a run checkpoint (``losses`` is the live list)."""
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "ema": self.ema.shadow,
                "step": self.step, "elapsed": self.elapsed, "losses": self.losses}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state`; without ``opt`` only the step count, time and losses."""
        self.step, self.elapsed = int(state.get("step", 0)), float(state.get("elapsed", 0.0))
        self.losses = state.get("losses", self.losses)
        if "opt" in state:
            self.opt.load_state_dict(state["opt"])
            if "sched" in state:
                self.sched.load_state_dict(state["sched"])
            if "ema" in state:
                self.ema.load(state["ema"], self.step)

    def mean_loss(self, last: int) -> float:
        recent = self.losses[-last:]
        return sum(x[1] for x in recent) / max(1, len(recent))

    def run(self, batch_loss: Callable[[torch.Generator], torch.Tensor], save: Callable[[], None],
            after_step: Optional[Callable[[], None]] = None,
            on_step: Optional[Callable[[int, bool], None]] = None) -> None:
        """Train until ``steps`` or the time limit. Per step: ``batch_loss(generator)``, backward,
        clip, optimiser and schedule step, EMA update, ``after_step()``; ``save()`` (the command's
        checkpoint, with :meth:`state`) every ``ckpt_every`` steps and at the end, with the loss
        CSV; ``on_step(step, last)`` after that. The generator is seeded from the seed and the
        step, so a resumed run draws what it would have drawn from its restart point."""
        from tqdm import tqdm

        g = torch.Generator().manual_seed(self.seed * 1000 + self.step)
        t0 = time.time() - self.elapsed
        bar = tqdm(total=self.steps, initial=self.step, desc=self.desc, mininterval=5)
        while self.step < self.steps and not out_of_time(t0, self.max_minutes):
            loss = batch_loss(g)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
            self.opt.step()
            self.sched.step()
            self.ema.update()
            if after_step is not None:
                after_step()
            self.step += 1
            self.losses.append([self.step, loss.item()])
            bar.update(1)
            bar.set_postfix(loss=f"{self.mean_loss(50):.4f}", refresh=False)
            last = self.step >= self.steps or out_of_time(t0, self.max_minutes)
            self.elapsed = time.time() - t0
            if self.step % self.ckpt_every == 0 or last:
                save()
                write_loss_csv(self.out, self.losses)
            if on_step is not None:
                on_step(self.step, last)
        bar.close()
        self.elapsed = time.time() - t0


def load_run_checkpoint(path: str, keys: tuple = ()) -> dict:
    """A checkpoint of a train-zero123 / train-cascade run (or one of its caches), read through the project's
    loader: no pickled code runs, and a damaged file, a folder or a FIFO ends as one line naming it, as does a
    file without the entries ``keys``."""
    try:
        ckpt = load_torch(path)
    except UnsafeCheckpoint as e:
        raise UserError(f"{e}; it is not a checkpoint of this command") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint of this command (no {', '.join(repr(k) for k in missing)}); "
                        "--out must be this command's run folder")
    return ckpt
