"""Base classes for plugins: a typed ``Config`` parsed on construction, and a per-step hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lift3d.config import parse_config


@dataclass
class EmptyConfig:
    pass


class Plugin:
    """A configurable object that is not an ``nn.Module`` (guidance, data modules)."""

    Config: type = EmptyConfig

    def __init__(self, cfg: Any = None, path: str = ""):
        self.cfg = parse_config(type(self).Config, cfg, path)

    def update_step(self, step: int) -> None:
        """Called by the system before every training step (schedules, resolution changes)."""


class PluginModule(nn.Module):
    """A configurable ``nn.Module`` whose parameters belong to the trained 3D model."""

    Config: type = EmptyConfig

    def __init__(self, cfg: Any = None, path: str = ""):
        super().__init__()
        self.cfg = parse_config(type(self).Config, cfg, path)

    def update_step(self, step: int) -> None:
        """Called by the system before every training step."""
