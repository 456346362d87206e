"""The interface of a distillation method: a rule that turns a prior's noise predictions for the
latents of rendered views into a gradient on those latents (SDS, SJC, ...).

A method is a :class:`~lift3d.plugin.Plugin` registered with kind ``method``. It is called as
``method(prior, latents, cameras, render, step)`` with detached latents (B, C, h, w) and returns
``{"grad": dL/dlatents (B, C, h, w), ...logged scalars}``; the guidance applies the gradient
(see ``distillation.py``). It knows the prior only through :mod:`lift3d.priors.base`.

A method that trains something of its own (VSD's LoRA) builds it in ``prepare(prior, context)``, after the
prior has loaded, and uses the plugin hooks: the guidance passes ``trainable_state()``, ``param_groups``,
``losses(ctx)`` (declared in ``loss_defaults``) and ``memory_estimate`` through to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lift3d.config import C, domain, schedulable
from lift3d.errors import UserError
from lift3d.plugin import Plugin


class DistillationMethod(Plugin):
    @dataclass
    class Config:
        guidance_scale: float = domain(3.0, ge=0)  # classifier-free guidance scale
        min_step_percent: Any = schedulable(0.02, ge=0, le=1)  # noise levels, as a share of the prior's T timesteps
        max_step_percent: Any = schedulable(0.98, ge=0, le=1)
        grad_clip: Any = schedulable(0.0, ge=0)    # clamp the per-element gradient to ±value; 0: off

    #: how a share p of the T timesteps becomes an index: "floor" (threestudio) or "round"
    step_rounding: str = "round"

    def prepare(self, prior, context) -> None:
        """Called once after ``prior.prepare`` (its weights are loaded); ``context``: the GuidanceContext."""

    def __call__(self, prior, latents: torch.Tensor, cameras, render: dict, step: int) -> dict:
        raise NotImplementedError

    def memory_estimate(self, plan, prior=None) -> dict:
        """Its own share of a step's memory beyond the prior's passes (``prior``: not loaded yet)."""
        return {}

    def step_range(self, prior, step: int) -> tuple[int, int]:
        """Inclusive timestep range [t_min, t_max] at training ``step``."""
        T = prior.num_train_timesteps
        to_index = int if self.step_rounding == "floor" else round
        lo = int(to_index(T * C(self.cfg.min_step_percent, step)))
        hi = int(to_index(T * C(self.cfg.max_step_percent, step)))
        lo, hi = max(0, min(lo, T - 1)), max(0, min(hi, T - 1))
        if lo > hi:
            raise UserError(f"guidance min_step_percent ({lo / T}) exceeds max_step_percent ({hi / T}) at step {step}")
        return lo, hi

    def finish_grad(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """NaN guard and optional clipping of a latent-space gradient."""
        grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
        clip = C(self.cfg.grad_clip, step)
        return grad.clamp(-clip, clip) if clip > 0 else grad
