"""A learnable background that depends only on the ray direction.

Two forms (``kind``):
- ``envmap``: a low-resolution latitude-longitude texture (rows = elevation from +z down to -z,
  columns = azimuth from -180 to 180 degrees, wrapping around), read bilinearly; SJC/3drec's learned
  background is a texture this small (4x4);
- ``mlp``: a small MLP of the direction and a few sin/cos frequencies of it (threestudio's
  neural environment map).
RGB backgrounds (3 channels) go through a sigmoid; latent ones (4 channels) are raw.

Learning rate: ``param_groups(lr)`` returns this module's parameters with ``cfg.lr`` when it is set
(3drec trains its background at 1e-4), else with the system's ``lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.config import domain
from lift3d.errors import ConfigError
from lift3d.plugin import PluginModule
from lift3d.registry import register


@register("learned", "background")
class LearnedBackground(PluginModule):
    @dataclass
    class Config:
        n_channels: int = domain(3, ge=1)
        kind: str = "envmap"                    # envmap | mlp
        envmap_size: list = domain([4, 8], ge=1, length=2)   # rows (elevation), columns (azimuth)
        init: list = domain([])                 # initial values per channel; default grey 0.5 (RGB) / 0 (latent)
        mlp_neurons: int = domain(32, ge=1)
        mlp_frequencies: int = domain(2, ge=0)
        lr: Optional[float] = domain(None, gt=0)  # None: the system's learning rate

    def __init__(self, cfg=None, path: str = "system.background"):
        super().__init__(cfg, path)
        c = self.cfg
        if c.init and len(c.init) != c.n_channels:
            raise ConfigError(f"{path}.init has {len(c.init)} values but n_channels is {c.n_channels}")
        init = torch.tensor([float(v) for v in c.init] if c.init else
                            [0.5 if self.rgb else 0.0] * c.n_channels)
        if self.rgb:
            init = torch.logit(init.clamp(1e-4, 1 - 1e-4))  # raw values whose sigmoid is the init
        if c.kind == "envmap":
            rows, cols = (int(v) for v in c.envmap_size)
            self.texture = nn.Parameter(init.view(1, -1, 1, 1).repeat(1, 1, rows, cols))
        elif c.kind == "mlp":
            n_in = 3 + 6 * c.mlp_frequencies
            self.mlp = nn.Sequential(nn.Linear(n_in, c.mlp_neurons), nn.ReLU(inplace=True),
                                     nn.Linear(c.mlp_neurons, c.n_channels))
            with torch.no_grad():   # start as the constant init colour
                self.mlp[-1].weight.zero_()
                self.mlp[-1].bias.copy_(init)
        else:
            raise ConfigError(f"{path}.kind must be envmap or mlp, got '{c.kind}'")

    @property
    def rgb(self) -> bool:
        return self.cfg.n_channels == 3

    @property
    def n_channels(self) -> int:
        return self.cfg.n_channels

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": self.cfg.lr if self.cfg.lr is not None else lr}]

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) ray directions -> (B, H, W, C)."""
        shape = dirs.shape[:-1]
        d = F.normalize(dirs.reshape(-1, 3), dim=-1)
        raw = self._envmap(d) if self.cfg.kind == "envmap" else self._mlp(d)
        out = torch.sigmoid(raw) if self.rgb else raw
        return out.view(*shape, self.n_channels)

    def _envmap(self, d: torch.Tensor) -> torch.Tensor:
        cols = self.texture.shape[-1]
        # Pad one column on each side from the other end so that azimuth wraps without a seam.
        tex = torch.cat([self.texture[..., -1:], self.texture, self.texture[..., :1]], -1)
        u = torch.atan2(d[:, 1], d[:, 0]) / math.pi * cols / (cols + 2)      # [-1, 1] over the real columns
        v = -torch.asin(d[:, 2].clamp(-1, 1)) / (math.pi / 2)               # +z (up) is the top row
        grid = torch.stack([u, v], -1).view(1, -1, 1, 2)
        out = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.view(self.n_channels, -1).t()

    def _mlp(self, d: torch.Tensor) -> torch.Tensor:
        freqs = 2.0 ** torch.arange(self.cfg.mlp_frequencies, device=d.device, dtype=d.dtype)
        x = (d[:, None, :] * freqs[:, None]).reshape(len(d), -1)
        return self.mlp(torch.cat([d, torch.sin(x), torch.cos(x)], -1))
