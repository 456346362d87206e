"""Multiresolution hash encoding (Instant-NGP) in plain PyTorch.

Level l is a grid of R_l = floor(base_resolution * per_level_scale**l) cells per axis, so
R_l + 1 vertices per axis. Each vertex owns ``n_features_per_level`` learnable numbers, stored in
a table of at most 2**log2_hashmap_size rows:
- coarse levels, where (R_l + 1)**3 fits in the table, index vertices densely
  (x + (R+1) * (y + (R+1) * z)), so they have no collisions;
- finer levels hash the vertex: (x * 1) xor (y * 2654435761) xor (z * 805459861), modulo the
  table size (a power of two, so a bit mask).
A point's feature at a level is the trilinear blend of its cell's 8 vertex features; the levels'
features are concatenated.

Why a loop over levels rather than one (N, levels, 8) gather: on CPU the per-level loop with
int32 index math measured about 4x faster (reference/cpu-measurements.md §3). Each level has its
own parameter so that backward only touches that level's table.

This is our own layout (not bit-compatible with tiny-cuda-nn's tables). When ``tinycudann`` is
importable and the encoding is built for CUDA, :func:`make_hash_encoding` uses tcnn's HashGrid
instead, behind the same ``forward(x01) -> (N, n_output_dims)`` interface.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# Primes of the spatial hash. The y prime does not fit an int32: store its two's-complement value;
# int32 products wrap modulo 2**32, so the low bits (all that the table mask keeps) are unchanged.
PRIMES = (1, 2654435761, 805459861)
_PRIMES_I32 = tuple(p - (1 << 32) if p >= (1 << 31) else p for p in PRIMES)


def level_resolutions(n_levels: int, base_resolution: int, per_level_scale: float) -> list[int]:
    # A tiny epsilon keeps e.g. 16 * 2.0**3 from flooring to 127 through rounding error.
    return [int(math.floor(base_resolution * per_level_scale ** level + 1e-6)) for level in range(n_levels)]


class HashEncoding(nn.Module):
    """``forward(x01 (N, 3) in [0, 1]) -> (N, n_levels * n_features_per_level)``."""

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 19,
                 base_resolution: int = 16, per_level_scale: float = 1.447269237440378, init_scale: float = 1e-4):
        super().__init__()
        self.n_levels, self.n_features_per_level = n_levels, n_features_per_level
        self.table_size = 1 << log2_hashmap_size
        self.resolutions = level_resolutions(n_levels, base_resolution, per_level_scale)
        self.dense = [(r + 1) ** 3 <= self.table_size for r in self.resolutions]
        sizes = [(r + 1) ** 3 if d else self.table_size for r, d in zip(self.resolutions, self.dense)]
        # Small uniform init as in Instant-NGP: the MLP first sees (almost) zero features.
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(size, n_features_per_level).uniform_(-init_scale, init_scale)) for size in sizes)

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def corner_rows(self, level: int, cell: torch.Tensor) -> torch.Tensor:
        """Table rows (N, 8) int64 of the 8 vertices of integer cells (N, 3) int32, corner
        c = dx + 2 dy + 4 dz. Each axis is multiplied once (N, 3, 2), then the 8 combinations are
        formed by broadcasting, which is cheaper than hashing (N, 8, 3) vertices."""
        c = torch.stack([cell, cell + 1], -1)                                  # (N, 3, 2)
        if self.dense[level]:
            n = self.resolutions[level] + 1
            x, y, z = c[:, 0], c[:, 1] * n, c[:, 2] * (n * n)
            rows = z[:, :, None, None] + y[:, None, :, None] + x[:, None, None, :]
        else:
            x, y, z = (c[:, axis] * _PRIMES_I32[axis] for axis in range(3))
            rows = (z[:, :, None, None] ^ y[:, None, :, None] ^ x[:, None, None, :]) & (self.table_size - 1)
        return rows.reshape(-1, 8).long()

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x01 = x01.float().clamp(0.0, 1.0)
        out = []
        for level, res in enumerate(self.resolutions):
            pos = x01 * res
            # Clamp so that x01 == 1 falls in the last cell rather than past the last vertex.
            cell = pos.floor().clamp(max=res - 1)
            frac = pos - cell                                                  # (N, 3) in [0, 1]
            feats = self.tables[level][self.corner_rows(level, cell.to(torch.int32))]   # (N, 8, F)
            # Trilinear weights, the outer product of per-axis (1 - f, f), in the same corner order.
            w = torch.stack([1.0 - frac, frac], -1)                            # (N, 3, 2)
            w = (w[:, 2, :, None, None] * w[:, 1, None, :, None] * w[:, 0, None, None, :]).reshape(-1, 8)
            out.append(torch.einsum("nc,ncf->nf", w, feats))
        return torch.cat(out, -1)


class _TcnnHashEncoding(nn.Module):
    """tiny-cuda-nn's fused HashGrid (CUDA only), same interface as :class:`HashEncoding`."""

    def __init__(self, tcnn, n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale):
        super().__init__()
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features_per_level,
            "log2_hashmap_size": log2_hashmap_size, "base_resolution": base_resolution,
            "per_level_scale": per_level_scale})
        self.n_output_dims = n_levels * n_features_per_level

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.encoding(x01.clamp(0.0, 1.0)).float()


def make_hash_encoding(backend: str = "auto", **kwargs) -> nn.Module:
    """``backend``: "torch", "tcnn", or "auto" (tcnn when importable and CUDA is available)."""
    if backend in ("auto", "tcnn"):
        tcnn = None
        if torch.cuda.is_available():
            try:
                import tinycudann as tcnn  # noqa: F811 - optional, never installed on CPU machines
            except ImportError:
                tcnn = None
        if tcnn is not None:
            kwargs.pop("init_scale", None)
            return _TcnnHashEncoding(tcnn, **kwargs)
        if backend == "tcnn":
            from lift3d.errors import ConfigError
            raise ConfigError("hash_backend 'tcnn' needs tinycudann and a CUDA device; set hash_backend=torch or auto")
    return HashEncoding(**kwargs)
