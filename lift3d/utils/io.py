"""Atomic file output: write to a temporary file beside the target, then rename over it.

A run killed mid-write never leaves a truncated checkpoint, image or JSON behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # keep the extension: some writers pick the format by it
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json_if_any(path: str) -> Any:
    """The JSON in ``path``, or None when there is no such file or it cannot be read as JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_torch(path: str, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_image(path: str, image) -> None:
    """Save an (H, W, C) float array in [0, 1] or a uint8 array as PNG/JPG."""
    import imageio.v3 as iio
    import numpy as np

    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image)


# --------------------------------------------------------------------------- reading checkpoints

_KNOWN_NOT_TORCH = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
                    b"{": "a JSON file", b"#": "a text file"}


class UnsafeCheckpoint(Exception):
    """``torch.load(weights_only=True)`` refused globals of the file (``names``); nothing was run."""

    def __init__(self, path: str, names: list, reason: str):
        super().__init__(f"refusing to load {path}: it holds pickled objects other than weights "
                         f"({', '.join(names) or reason}), and lift3d never runs pickled code")
        self.names = names


def load_torch(path: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, quietly (torch's warnings do not reach the user).

    Raises :class:`UserError` (one line) for a missing file or one that is not a torch checkpoint
    (random bytes, an image, a truncated file), and :class:`UnsafeCheckpoint` for a checkpoint whose
    pickle needs globals the restricted unpickler refuses.
    """
    import pickle
    import warnings

    import torch

    from lift3d.errors import UserError

    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save: zip, or a legacy pickle
        kind = next((v for k, v in _KNOWN_NOT_TORCH.items() if head.startswith(k)), "empty" if not head else None)
        raise UserError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint ({kind or 'its first bytes are ' + repr(head)}); "
                        "pass a .ckpt written by torch.save")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            try:
                names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except Exception:
                names = []
            if not names:   # a legacy (non-zip) file: torch names the refused global in its message
                names = re.findall(r"GLOBAL ([\w.]+)", str(e))[:1]
            if names:
                raise UnsafeCheckpoint(path, names, "") from None
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise UserError(f"cannot read checkpoint {path}: it is damaged or not a PyTorch checkpoint (the restricted "
                            f"unpickler stopped at: {detail.group(1).strip() if detail else _first_line(e)})") from None
        except Exception as e:  # truncated zips, random bytes behind a plausible header (IndexError, EOFError...)
            raise UserError(f"cannot read checkpoint {path}: it is damaged or not a PyTorch checkpoint "
                            f"({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:160] if text else type(e).__name__)


def remove_orphans(folder: str) -> list:
    """Delete the temporary files of :func:`atomic_path` that a killed writer left under ``folder``
    (call it only while no other writer uses the folder: see ``runner.TrialLock``). Returns their paths."""
    removed = []
    for base, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".tmp-"):
                path = os.path.join(base, name)
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed
