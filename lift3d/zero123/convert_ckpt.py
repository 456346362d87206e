"""``lift3d convert-ckpt IN.ckpt OUT_DIR``: an original Zero123 ``.ckpt`` -> kxic-layout diffusers
folder of safetensors. The UNet's attention head count comes from the checkpoint's ldm YAML
(``--config``, else found next to the checkpoint: see :func:`lift3d.zero123.ldm_checkpoint.find_config`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from lift3d.errors import UserError
from lift3d.zero123.model import Zero123Model


def convert_ckpt(in_path: str, out_dir: str, use_ema: bool = True, half: bool = False,
                 ldm_config: Optional[str] = None) -> str:
    """Convert ``in_path`` and write ``out_dir``; returns ``out_dir``. ``half`` stores fp16 weights
    (half the size); ``ldm_config``: the checkpoint's ldm YAML (default: found next to it)."""
    if not os.path.isfile(in_path):
        raise UserError(f"checkpoint not found: {in_path}")
    model = Zero123Model.from_pretrained(in_path, torch_dtype=torch.float16 if half else torch.float32,
                                         use_ema=use_ema, ldm_config=ldm_config)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str]) -> int:
    """``lift3d convert-ckpt IN.ckpt OUT_DIR [--config LDM.yaml]``."""
    import argparse

    from lift3d.zero123.ldm_checkpoint import UNET_HEADS, find_config

    p = argparse.ArgumentParser(prog="lift3d convert-ckpt", description="Convert an original Zero123 .ckpt to a "
                                "diffusers folder (kxic layout, safetensors).")
    p.add_argument("checkpoint", help="original Zero123 / Stable-Zero123 .ckpt")
    p.add_argument("out_dir", help="new output folder")
    p.add_argument("--config", default=None,
                   help="the checkpoint's ldm YAML, for the UNet head count (default: IN.yaml, config.yaml or the "
                        f"only *.yaml next to the checkpoint; without one Zero123's {UNET_HEADS} heads are assumed)")
    p.add_argument("--no-ema", action="store_true", help="use the raw UNet weights even if EMA weights are present")
    p.add_argument("--half", action="store_true", help="store fp16 weights")
    a = p.parse_args(argv)
    config = a.config or (find_config(a.checkpoint) if os.path.isfile(a.checkpoint) else None)
    out = convert_ckpt(a.checkpoint, a.out_dir, use_ema=not a.no_ema, half=a.half, ldm_config=config)
    print(f"wrote {out} (UNet attention heads: " + (f"from {config})" if config else
          f"{UNET_HEADS} assumed, no ldm config found; pass --config to set them)"))
    return 0
