"""The system contract: everything the runner calls on a system, and nothing else.

The runner (``lift3d/runner.py``) owns the trial folder, the loop, checkpoints, seeds and the data
module's random views; a system owns the model, its losses and what it shows and exports:

- ``setup(data, context, train)``: once, before anything else; ``data`` is the data module
  (``reference_view()``, ``val_views()``, ``test_views()``, ``gt_mesh``), ``context`` the device,
  trial folder and seed; ``train`` says whether a training run (and its guidance) follows;
- ``configure_optimizer()``: after the weights are in place (restored or fresh);
- each step: ``update_step(step)``; ``training_step(views, step)`` -> ``{"loss": total, "loss_x": ...}``;
  the runner back-propagates ``loss``; ``on_after_backward(optimizer, step)`` (densify/prune hooks run
  here), then the optimiser steps;
- ``validation_images()``: a list of (H, W, 3) images in [0, 1], or of ``(label, image)`` pairs,
  saved as one labelled strip;
- ``test_frames()``: the turntable as (H, W, 3) images in [0, 1] (image-to-3d: RGB | normal | opacity);
- ``summary_images()``: rows of ``(label, image)`` pairs for ``save/summary.png`` (an image may be
  None: a blank cell), written once training ends;
- ``export(out_dir)``: writes the result, returns ``{kind: path}``;
- ``metrics(exported, protocol)``: given ``export``'s paths, the JSON of ``lift3d eval`` against the
  run's ground truth, or None when there is none.

Checkpoints hold ``state_dict()``. A module may list in ``resizable_parameters`` the parameters and
buffers whose first dimension changes during training (points that densify, their statistics);
``load_state_dict`` resizes them to the checkpoint's shape first, so a resumed run gets its count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lift3d.plugin import PluginModule


@dataclass
class RunContext:
    device: torch.device
    trial_dir: Optional[str] = None
    seed: int = 0


class BaseSystem(PluginModule):
    # The paths export() wrote ({"obj", "glb", ...}), or None before export: the turntable and the summary show
    # the exported mesh. The runner fills it from the trial's export/ for --test.
    exported: Optional[dict] = None

    def setup(self, data, context: RunContext, train: bool) -> None:
        self.data, self.context = data, context

    def configure_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def training_step(self, views, step: int) -> dict:
        raise NotImplementedError

    def on_after_backward(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called between ``loss.backward()`` and ``optimizer.step()``."""

    def validation_images(self) -> list:
        return []

    def test_frames(self) -> list:
        return []

    def summary_images(self) -> list:
        return []

    def export(self, out_dir: str) -> dict:
        return {}

    def metrics(self, exported: dict, protocol: str) -> Optional[dict]:
        return None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name, value in state_dict.items():
            owner_name, _, attr = name.rpartition(".")
            try:
                owner = self.get_submodule(owner_name) if owner_name else self
            except AttributeError:
                continue  # an unexpected key: super() names it
            current = getattr(owner, attr, None)
            if attr not in getattr(owner, "resizable_parameters", ()) or not torch.is_tensor(current) \
                    or current.shape == value.shape:
                continue
            empty = torch.empty(value.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(owner, attr, nn.Parameter(empty, requires_grad=current.requires_grad))
            else:
                owner.register_buffer(attr, empty, persistent=attr not in owner._non_persistent_buffers_set)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
