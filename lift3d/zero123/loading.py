"""Where a Zero123-family model comes from: a path or hub id -> the model's parts.

Every source is turned into the same parts (see :mod:`lift3d.zero123.folder`), which
:meth:`lift3d.zero123.model.Zero123Model.from_parts` assembles, so the formats cannot drift apart:
- a diffusers folder, kxic or bennyguo/ashawkey layout (:mod:`lift3d.zero123.folder`);
- an original ``.ckpt``, converted in memory (:mod:`lift3d.zero123.ldm_checkpoint`; its ldm YAML,
  when found, gives what the weights' shapes cannot tell);
- a Hugging Face hub id (downloaded into the local cache, then read as a folder).
This module builds no model: it does not import :mod:`lift3d.zero123.model`.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Optional

from lift3d.errors import UserError
from lift3d.utils.inputs import file_kind
from lift3d.zero123 import ldm_checkpoint
from lift3d.zero123.folder import PROJECTION_DIRS, read_folder


def read_parts(path: str, variant: Optional[str] = None, use_ema: bool = True,
               ldm_config: Optional[str] = None) -> dict:
    """The parts of the model at ``path`` (folder, ``.ckpt`` or hub id). ``ldm_config``: the ldm
    YAML of an original ``.ckpt`` (default: found next to it, see :func:`ldm_checkpoint.find_config`)."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return ldm_checkpoint.read_parts(path, use_ema, ldm_config)
    if ldm_config:
        raise UserError(f"--config {ldm_config} applies to an original .ckpt only; {path} is not a checkpoint file")
    if os.path.isdir(path):
        return read_folder(path, variant)
    if os.path.lexists(path):       # there, but a FIFO, a socket, a symbolic-link loop, ...
        raise UserError(f"Zero123 model {path} is {file_kind(path)}; give a diffusers model folder or an original "
                        ".ckpt file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.endswith((".ckpt", ".pt", ".pth")):
        return read_folder(_download(path, variant), variant)
    raise UserError(f"Zero123 model not found: {path} (give a diffusers model folder, an original .ckpt "
                    "file, or a Hugging Face id such as kxic/zero123-xl)")


def _download(repo_id: str, variant: Optional[str]) -> str:
    """Fetch the configs and the weights of one variant (not every variant the repository holds)."""
    try:
        from huggingface_hub import snapshot_download

        def fetch(v):
            names = [f"{s}.{v}.{e}" if v else f"{s}.{e}" for s in ("diffusion_pytorch_model", "model", "pytorch_model")
                     for e in ("safetensors", "bin")]
            return snapshot_download(repo_id, allow_patterns=["*.json", "*.txt"] + [f"*/{n}" for n in names])

        folder = fetch(variant)
        if variant:  # components without that variant fall back to their plain weights
            subs = [os.path.join(folder, d) for d in ("unet", "vae", "image_encoder", *PROJECTION_DIRS)]
            if any(os.path.isdir(d) and not glob.glob(os.path.join(d, f"*.{variant}.*")) for d in subs):
                folder = fetch(None)
        return folder
    except Exception as e:
        raise UserError(f"'{repo_id}' is not a local path and could not be downloaded from the Hugging Face hub "
                        f"({type(e).__name__}); download it and pass the folder") from None
