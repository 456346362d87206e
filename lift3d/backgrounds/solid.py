"""A constant background: every ray sees the same C values (white by default).

For a 4-channel latent field give 4 values, e.g. the latent of a white image (3drec blends over a
"white" latent whose channel means are roughly 2.29, 1.45, 0.00, -1.18).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lift3d.config import domain
from lift3d.errors import ConfigError
from lift3d.plugin import PluginModule
from lift3d.registry import register


@register("solid-color", "background")
class SolidColorBackground(PluginModule):
    @dataclass
    class Config:
        color: list = domain([1.0, 1.0, 1.0])     # RGB in [0, 1], or 4 latent values

    def __init__(self, cfg=None, path: str = "system.background"):
        super().__init__(cfg, path)
        try:
            self.color = [float(v) for v in self.cfg.color]
        except (TypeError, ValueError):
            raise ConfigError(f"{path}.color must be a list of numbers, got {self.cfg.color!r}") from None
        if not self.color:
            raise ConfigError(f"{path}.color must have 3 (RGB) or 4 (latent) values, got none")

    @property
    def n_channels(self) -> int:
        return len(self.color)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) ray directions -> (B, H, W, C)."""
        color = torch.tensor(self.color, dtype=dirs.dtype, device=dirs.device)
        return color.expand(*dirs.shape[:-1], self.n_channels)
