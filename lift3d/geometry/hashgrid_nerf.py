"""A NeRF field: multiresolution hash encoding + two small MLPs (threestudio's ``implicit-volume``).

density  = activation(density_mlp(enc(x)) + bias(x)), activation softplus or exp;
features = feature_mlp(enc(x)), through a sigmoid for RGB (3 channels), raw for 4-channel latents.

The density bias shapes the initial field (so the first renders show an object, not fog):
``blob_magic3d``: scale * (1 - |x| / std) (Magic3D); ``blob_dreamfusion``: scale * exp(-|x|^2 / (2 std^2));
or a number (a constant bias). The defaults are threestudio's; tests use much smaller tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.config import domain
from lift3d.errors import ConfigError
from lift3d.geometry.base import BaseGeometry
from lift3d.geometry.hash_encoding import make_hash_encoding
from lift3d.registry import register


def _mlp(n_in: int, n_out: int, neurons: int, hidden_layers: int) -> nn.Sequential:
    layers, width = [], n_in
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, neurons), nn.ReLU(inplace=True)]
        width = neurons
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


@register("hashgrid-nerf", "geometry")
class HashGridNeRF(BaseGeometry):
    # Bytes a volume render holds for backward per sample (forward + backward of a 2^21-sample render, CPU, fp32):
    # 16 levels x 8 corners plus the MLP's activations.
    bytes_per_sample = 3300

    @dataclass
    class Config(BaseGeometry.Config):
        n_feature_dims: int = 3                 # 3 = RGB in [0, 1]; 4 = Stable-Diffusion latents
        n_levels: int = domain(16, ge=1)
        n_features_per_level: int = domain(2, ge=1)
        log2_hashmap_size: int = domain(19, ge=1, le=30)
        base_resolution: int = domain(16, ge=1)
        per_level_scale: float = domain(1.447269237440378, ge=1)
        hash_backend: str = "auto"              # auto | torch | tcnn (tcnn needs tinycudann + CUDA)
        mlp_neurons: int = domain(64, ge=1)
        mlp_hidden_layers: int = domain(1, ge=0)             # threestudio VanillaMLP: Linear-ReLU-Linear
        density_activation: str = "softplus"    # softplus | exp
        density_bias: str = "blob_magic3d"      # blob_magic3d | blob_dreamfusion | a number, e.g. "-1.0"
        density_blob_scale: float = domain(10.0, ge=0)
        density_blob_std: float = domain(0.5, gt=0)

    def __init__(self, cfg=None, path: str = "system.geometry"):
        super().__init__(cfg, path)
        c = self.cfg
        if c.n_feature_dims not in (3, 4):
            raise ConfigError(f"{path}.n_feature_dims must be 3 (RGB) or 4 (latent), got {c.n_feature_dims}")
        if c.density_activation not in ("softplus", "exp"):
            raise ConfigError(f"{path}.density_activation must be softplus or exp, got '{c.density_activation}'")
        if c.density_bias not in ("blob_magic3d", "blob_dreamfusion"):
            try:
                float(c.density_bias)
            except ValueError:
                raise ConfigError(f"{path}.density_bias must be blob_magic3d, blob_dreamfusion or a number, "
                                  f"got '{c.density_bias}'") from None
        if c.hash_backend not in ("auto", "torch", "tcnn"):
            raise ConfigError(f"{path}.hash_backend must be auto, torch or tcnn, got '{c.hash_backend}'")
        self.n_feature_dims = c.n_feature_dims
        self.encoding = make_hash_encoding(
            c.hash_backend, n_levels=c.n_levels, n_features_per_level=c.n_features_per_level,
            log2_hashmap_size=c.log2_hashmap_size, base_resolution=c.base_resolution,
            per_level_scale=c.per_level_scale)
        n_enc = self.encoding.n_output_dims
        self.density_mlp = _mlp(n_enc, 1, c.mlp_neurons, c.mlp_hidden_layers)
        self.feature_mlp = _mlp(n_enc, c.n_feature_dims, c.mlp_neurons, c.mlp_hidden_layers)

    def _encode(self, points: torch.Tensor) -> torch.Tensor:
        r = self.cfg.radius
        return self.encoding((points + r) / (2 * r))

    def _density_bias(self, points: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.density_bias == "blob_magic3d":
            return c.density_blob_scale * (1 - points.norm(dim=-1) / c.density_blob_std)
        if c.density_bias == "blob_dreamfusion":
            return c.density_blob_scale * torch.exp(-(points ** 2).sum(-1) / (2 * c.density_blob_std ** 2))
        return torch.full_like(points[:, 0], float(c.density_bias))

    def _density(self, enc: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        raw = self.density_mlp(enc)[:, 0] + self._density_bias(points)
        if self.cfg.density_activation == "softplus":
            return F.softplus(raw)
        return torch.exp(raw.clamp(max=15.0))   # a cap keeps early blobs from overflowing

    def forward(self, points: torch.Tensor) -> dict:
        enc = self._encode(points)
        features = self.feature_mlp(enc)
        if self.n_feature_dims == 3:
            features = torch.sigmoid(features)
        return {"density": self._density(enc, points), "features": features}

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self._density(self._encode(points), points)
