"""Base classes for plugins, and the hooks the system calls on every one of them.

Every plugin (geometry, background, renderer, guidance and what they hold) has a typed ``Config`` parsed
on construction and the same five hooks, each with a default that does nothing. The system calls them on
all its plugins, in the order geometry, background, renderer, guidance, so a new plugin needs no change
anywhere else:

- ``update_step(step)``: before every training step (schedules, resolution changes);
- ``losses(ctx) -> {name: scalar}``: extra loss terms of this step, computed from ``ctx`` (a
  :class:`StepContext`: the step's render outputs, views and reference targets). Each name must be
  declared in ``loss_defaults`` ({name: default weight}); the system weights ``loss_<name>`` by
  ``system.loss.lambda_<name>`` (a number or a schedule) and skips the call while every weight of
  the plugin is 0;
- ``param_groups(lr) -> [{"params": [...], "lr": ...}, ...]``: what the optimiser trains, with per-group
  learning rates (default: every trainable parameter of the module at ``lr``);
- ``after_backward(ctx)``: between ``loss.backward()`` and ``optimizer.step()``; ``ctx.optimizer`` (an
  :class:`OptimizerOps`) extends, prunes or replaces a parameter together with its optimiser state, and
  ``ctx.outputs`` still holds the step's renders (a point-based geometry reads its view-space gradients
  there). Parameters whose row count changes are listed in ``resizable_parameters`` and per-point
  statistics are registered buffers listed there too, so that checkpoints with another count load;
- ``memory_estimate(plan) -> {part: (GiB, "setting to lower")}``: this plugin's share of a training
  step's peak memory (lift3d/preflight.py adds the parts up; ``plan`` says what the step renders).

A guidance is not an ``nn.Module`` (its weights are frozen and not checkpointed); one that trains state of
its own (VSD's LoRA, a learned camera embedding) returns it from ``trainable_state()``: the system then
owns that module, so it is checkpointed and its ``param_groups`` join the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from lift3d.config import parse_config
from lift3d.utils import param_surgery


@dataclass
class EmptyConfig:
    pass


@dataclass
class MemoryPlan:
    """What a training step renders, for the plugins' memory estimates (lift3d/preflight.py fills it).

    ``stages``: per resolution stage, the step's renders as (name, views, height, width): ``reference``
    (at the size the field renders it), ``guidance`` and, with that loss on, ``near_view``;
    ``normals``: the guidance renders carry normals; ``latent_field``: the field renders latents;
    ``decode_reference``: a latent reference render goes through the decoder with gradients."""
    stages: list = field(default_factory=list)
    normals: bool = False
    latent_field: bool = False
    decode_reference: bool = False

    def renders(self, name: str) -> list:
        """(views, height, width) of the render ``name`` in each stage (stages without it left out)."""
        return [(v, h, w) for stage in self.stages for n, v, h, w in stage if n == name]


class OptimizerOps:
    """The optimiser as ``after_backward`` sees it: change a parameter's rows together with its state.

    Each call returns the new parameter, which the caller stores on its module in the old one's place
    (see lift3d/utils/param_surgery.py for what happens to the moments and the gradient)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def extend(self, param: nn.Parameter, rows: torch.Tensor) -> nn.Parameter:
        return param_surgery.extend_parameter(self.optimizer, param, rows)

    def select(self, param: nn.Parameter, index: torch.Tensor) -> nn.Parameter:
        return param_surgery.select_rows(self.optimizer, param, index)

    def prune(self, param: nn.Parameter, keep: torch.Tensor) -> nn.Parameter:
        return param_surgery.prune_parameter(self.optimizer, param, keep)

    def replace(self, param: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
        return param_surgery.replace_parameter(self.optimizer, param, value)

    def set_lr(self, param: nn.Parameter, lr: float) -> None:
        """The learning rate of the group that holds ``param`` (a schedule per parameter, as 3DGS's means)."""
        param_surgery.find_group(self.optimizer, param)[0]["lr"] = lr


@dataclass
class StepContext:
    """One training step as the hooks see it.

    ``outputs``: the renderer's output dicts of this step by name (``reference``: the input's view, when a
    reference loss is on; ``guidance``: the random views); ``views``: the guidance views' cameras;
    ``reference_rgb`` / ``reference_mask``: the input composited on this step's reference background and
    its mask, (1, H, W, 3) / (1, H, W, 1) at the reference render's size (None without a reference
    render); ``weights``: every loss weight at this step; ``render``: the system's renderer
    (``render(cameras, bg_color=None, normals=False)``), for plugins that score views of their own;
    ``optimizer``: set for ``after_backward``."""
    step: int
    outputs: dict = field(default_factory=dict)
    views: Any = None
    reference_rgb: Optional[torch.Tensor] = None
    reference_mask: Optional[torch.Tensor] = None
    weights: dict = field(default_factory=dict)
    render: Optional[Callable] = None
    optimizer: Optional[OptimizerOps] = None


class Hooks:
    """The per-step hooks every plugin has (see the module docstring); all default to doing nothing."""

    #: the loss terms ``losses`` may return, with their default weights (``system.loss.lambda_<name>``)
    loss_defaults: dict = {}
    #: names of parameters and buffers whose first dimension changes during training (points that densify)
    resizable_parameters: tuple = ()

    def update_step(self, step: int) -> None:
        """Called by the system before every training step (schedules, resolution changes)."""

    def losses(self, ctx: StepContext) -> dict:
        return {}

    def after_backward(self, ctx: StepContext) -> None:
        """Between backward and the optimiser step: densify, prune, clip, schedule learning rates."""

    def memory_estimate(self, plan: MemoryPlan) -> dict:
        return {}


class Plugin(Hooks):
    """A configurable object that is not an ``nn.Module`` (guidance, data modules)."""

    Config: type = EmptyConfig

    def __init__(self, cfg: Any = None, path: str = ""):
        self.cfg = parse_config(type(self).Config, cfg, path)

    def param_groups(self, lr: float) -> list:
        state = self.trainable_state()
        params = [p for p in state.parameters() if p.requires_grad] if state is not None else []
        return [{"params": params, "lr": lr}] if params else []

    def trainable_state(self) -> Optional[nn.Module]:
        """A module this plugin trains (checkpointed and optimised by the system), or None."""
        return None

    @classmethod
    def declared_losses(cls, cfg: Any = None, path: str = "") -> dict:
        """The ``loss_defaults`` of this plugin configured by ``cfg``, before it is built (the system sets up
        its loss weights before the guidance loads): the class's, unless its terms depend on its config."""
        return dict(cls.loss_defaults)


class PluginModule(nn.Module, Hooks):
    """A configurable ``nn.Module`` whose parameters belong to the trained 3D model."""

    Config: type = EmptyConfig

    def __init__(self, cfg: Any = None, path: str = ""):
        super().__init__()
        self.cfg = parse_config(type(self).Config, cfg, path)

    def param_groups(self, lr: float) -> list:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}] if params else []
