"""Atomic file output: write to a temporary file beside the target, then rename over it.

A run killed mid-write never leaves a truncated checkpoint, image or JSON behind, and a write that fails (a
full disk, a read-only folder) raises :class:`WriteFailed`, naming the file, with its previous version intact.
Writes inside :func:`all_or_nothing` stand or fall together (an export's files).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Optional

from lift3d.errors import UserError


class WriteFailed(UserError):
    """``path`` could not be written (``reason``: what the system said); its previous version, if any, is intact."""

    def __init__(self, path: str, reason: str, kept: Optional[str] = None):
        self.path, self.reason = path, reason
        if kept is None:
            kept = "its previous version is kept" if os.path.exists(path) else "nothing was written there"
        super().__init__(f"cannot write {path}: {reason}; {kept}")


# The files written inside the innermost all_or_nothing block: [(path, hard link to its previous version or None)].
_group: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("lift3d_write_group", default=None)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Writes inside this block stand or fall together: when it raises (a full disk at the third file, Ctrl-C),
    every file it wrote gets its previous content back, or is removed if it had none. Files are replaced as
    they are written (the block may read them back); the previous versions wait as hard links, which take no
    space. A nested block is part of the outer one."""
    if _group.get() is not None:
        yield
        return
    written: list = []
    token = _group.set(written)
    try:
        yield
    except BaseException:
        for path, backup in reversed(written):
            with contextlib.suppress(OSError):
                if backup:
                    os.replace(backup, path)
                else:
                    os.remove(path)
        raise
    else:
        for _, backup in written:
            if backup:
                with contextlib.suppress(OSError):
                    os.remove(backup)
    finally:
        _group.reset(token)


def _replace(tmp: str, path: str) -> None:
    """``os.replace(tmp, path)``, keeping ``path``'s previous version for the enclosing all_or_nothing block."""
    written = _group.get()
    if written is not None:
        backup = None
        if os.path.isfile(path):
            backup = os.path.join(os.path.dirname(path), f".tmp-keep-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
            try:
                os.link(path, backup)
            except OSError:          # a file system without hard links: a copy
                shutil.copyfile(path, backup)
        written.append((path, backup))
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success rename it to ``path``. An OSError of the
    write (ENOSPC, EROFS, ...) becomes :class:`WriteFailed` naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        suffix = os.path.splitext(path)[1]  # keep the extension: some writers pick the format by it
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        yield tmp
        _replace(tmp, path)
    except OSError as e:
        if e.filename and e.filename not in (tmp, path) and not folder.startswith(os.path.abspath(e.filename)):
            raise                  # another file's problem (an input that vanished), not this write's
        raise WriteFailed(path, e.strerror or _first_line(e)) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def append_text(path: str, text: str) -> None:
    """Append ``text`` to ``path``; when that fails the file is cut back to what it held (WriteFailed)."""
    data = memoryview(text.encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise WriteFailed(path, e.strerror or _first_line(e), "its earlier lines are kept") from None


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json_if_any(path: str) -> Any:
    """The JSON in ``path``, or None when there is no such file or it cannot be read as JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# What torch.save's zip writer raises (a RuntimeError) when the disk fills: "unexpected pos 576 vs 534",
# "file write failed", "PytorchStreamWriter failed writing file data/0".
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed|inline_container")


def save_torch(path: str, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if not _TORCH_WRITE_FAILED.search(str(e)):
                raise
            raise WriteFailed(path, _write_failure(tmp, e)) from None


def _write_failure(tmp: str, e: BaseException) -> str:
    """What stopped a write whose library said only ``e``: a full disk when the folder has no space left."""
    try:
        st = os.statvfs(os.path.dirname(tmp))
        full = st.f_bavail * st.f_frsize < 1 << 20
    except (OSError, AttributeError):
        full = False
    return "No space left on device" if full else _first_line(e)


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
    # Encoded in memory, then written: a writer failing half-way through its own file object complains
    # again from __del__, as a traceback.
    write_bytes(path, iio.imwrite("<bytes>", image, extension=os.path.splitext(path)[1] or ".png"))


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

    from lift3d.utils.inputs import require_file

    require_file(path, "checkpoint")      # a folder, a FIFO, a link loop: named for what it is
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
