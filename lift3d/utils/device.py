"""The one device picker of lift3d: a device name from a config or command line -> torch.device."""

from __future__ import annotations

import torch

from lift3d.errors import UserError


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, ``mps``.
    Raises :class:`UserError` (one line) for an unknown name or a CUDA device without CUDA."""
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but no CUDA device is available; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{name}' requested but MPS is not available; use cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device '{name}'; use auto, cpu, cuda or cuda:N")
    return device
