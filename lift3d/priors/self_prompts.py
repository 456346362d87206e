"""The Cascade-Zero123 self-prompts on disk: the base model's nearby views of one input, cached by
everything they depend on (input image, base weights, views, sampler settings, seed), in the trial
folder (so a resume reuses them) and in a shared cache (so a re-run of the same input does too)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from typing import Optional

import torch

from lift3d.utils import io

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    root = os.environ.get("LIFT3D_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lift3d")
    return os.path.join(root, "self_prompts")


def cache_key(meta: dict) -> str:
    """The cache key of a set of prompts: a hash of everything but the model's path."""
    return hashlib.sha256(repr(sorted((k, v) for k, v in meta.items() if k != "base_model")).encode()).hexdigest()[:16]


def image_digest(image_01: torch.Tensor) -> str:
    return hashlib.sha256((image_01 * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()


def load_prompts(folder: Optional[str], key: str, n: int) -> Optional[torch.Tensor]:
    """The cached prompts (n, 3, S, S) in ``folder`` if they are complete and have this key."""
    if not folder or not os.path.isfile(os.path.join(folder, "prompts.json")):
        return None
    from lift3d.errors import UserError
    from lift3d.utils.inputs import read_json_object

    try:
        meta = read_json_object(os.path.join(folder, "prompts.json"), "self-prompt cache")
    except UserError:           # a damaged cache is made again
        return None
    paths = [os.path.join(folder, f"prompt_{i:02d}.png") for i in range(n)]
    if meta.get("key") != key or not all(os.path.isfile(p) for p in paths):
        return None
    from lift3d.utils.images import load_image

    return torch.cat([load_image(p, None) for p in paths])


def save_prompts(folder: str, images: torch.Tensor, views: torch.Tensor, meta: dict) -> None:
    from lift3d.utils.images import image_grid

    for i, img in enumerate(images):
        io.save_image(os.path.join(folder, f"prompt_{i:02d}.png"), img.permute(1, 2, 0))
    io.save_image(os.path.join(folder, "prompts.png"), image_grid([img.permute(1, 2, 0) for img in images]))
    io.write_json(os.path.join(folder, "prompts.json"), {**meta, "views": views.tolist()})  # last: marks complete


def copy_prompts(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src), key=lambda n: n == "prompts.json"):  # the json last
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def cached_prompts(meta: dict, n: int, folders: list, generate) -> torch.Tensor:
    """The prompts from the first folder that holds them (copied into the first folder, the trial's,
    when found elsewhere), or ``generate()``'s, saved to every folder. ``meta`` gains its ``key``."""
    meta["key"] = key = cache_key(meta)
    for folder in folders:
        images = load_prompts(folder, key, n)
        if images is not None:
            log.info("self-prompts: reusing %s", folder)
            if folder != folders[0] and folders[0]:
                copy_prompts(folder, folders[0])
            return images
    images, views = generate()
    images = (images.float().cpu() * 255).round() / 255      # what the PNGs hold: a resume sees the same
    for folder in folders:
        if folder:
            save_prompts(folder, images, views, meta)
    return images
