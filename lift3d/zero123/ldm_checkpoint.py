"""Reading an original Zero123 ``.ckpt`` (a PyTorch-Lightning checkpoint of ldm's LatentDiffusion).

- The file is unpickled with ``torch.load(weights_only=True)``. Lightning checkpoints also hold
  non-tensor objects (callback classes used as dict keys, hyper-parameter containers, numpy
  scalars) that the restricted unpickler refuses. We only need ``state_dict``, so every such
  global is mapped to an inert stand-in class: nothing from the file is ever imported or run.
- EMA weights (``model_ema.<name without dots>``) replace the UNet weights when the checkpoint has
  a complete set, as Zero123's own sampling (``ema_scope``) does.
- Component configs (UNet, VAE, CLIP) are inferred from tensor shapes. The UNet's attention head
  count, which shapes cannot tell, comes from the checkpoint's ldm YAML
  (``model.params.unet_config.params.num_heads``, or ``num_head_channels`` = channels per head)
  when one is found (:func:`find_config`); otherwise Zero123's 8 heads are assumed, with a warning.
  The other hyper-parameters shapes cannot tell (group-norm groups, latent scale) are Zero123's.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Optional, Union

import torch

from lift3d.errors import UserError
from lift3d.utils.io import UnsafeCheckpoint, load_torch
from lift3d.zero123 import ldm_to_diffusers

log = logging.getLogger(__name__)

UNET, VAE, PROJ = "model.diffusion_model.", "first_stage_model.", "cc_projection."
CLIP = "cond_stage_model.model.visual."
EMA = "model_ema."

# Settings of Zero123's ldm config (sd-objaverse-finetune-c_concat-256.yaml) that shapes do not reveal.
UNET_HEADS = 8  # assumed when no ldm YAML is found
LATENT_SCALE = 0.18215
IMAGE_SIZE = 256


class _Inert:
    """Stand-in for any non-tensor global in a checkpoint: accepts anything, does nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def read_state_dict(path: str) -> dict:
    """The ``state_dict`` of a Lightning/ldm checkpoint, loaded without executing pickled code."""
    try:
        ckpt = _load(path)
    except UnsafeCheckpoint as e:
        # Some global the restricted unpickler refuses: stub them all and retry once.
        log.info("checkpoint %s: ignoring non-tensor objects %s", path, ", ".join(e.names))
        try:
            with torch.serialization.safe_globals([(_Inert, name) for name in e.names]):
                ckpt = _load(path)
        except Exception as retry:
            raise UserError(f"{e}; not even its weights can be read without them ({str(retry).splitlines()[0][:120]}): "
                            "re-save its state_dict with a trusted torch.load and "
                            "torch.save({'state_dict': sd}, NEW.ckpt)") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(isinstance(k, str) and k.startswith(UNET) for k in sd):
        raise UserError(f"{path} is not an original Zero123 checkpoint: expected a state_dict with "
                        f"{UNET}*, {VAE}*, {CLIP}* and {PROJ}* keys")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _load(path: str):
    # mmap: only the pages we convert are read (the EMA copy doubles the file size)
    return load_torch(path, mmap=True)


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.a.b.weight`` -> ``model_ema.diffusion_modelabweight`` (LitEma naming)."""
    return EMA + ("diffusion_model." + unet_key[len(UNET):]).replace(".", "")


def take(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def unet_weights(sd: dict, use_ema: bool) -> dict:
    """ldm UNet weights (prefix removed), from the EMA copy when it is complete."""
    keys = [k for k in sd if k.startswith(UNET)]
    has_ema = sum(k.startswith(EMA) for k in sd) > 100  # decay/num_updates alone do not count
    if use_ema and has_ema:
        missing = [k for k in keys if ema_key(k) not in sd]
        if not missing:
            log.info("using the checkpoint's EMA weights")
            return {k[len(UNET):]: sd[ema_key(k)] for k in keys}
        log.warning("checkpoint has an incomplete EMA copy (%d of %d missing); using the raw weights",
                    len(missing), len(keys))
    return {k[len(UNET):]: sd[k] for k in keys}


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def find_config(ckpt_path: str) -> Optional[str]:
    """The ldm YAML of a checkpoint, looked for next to it in this order: ``<stem>.yaml`` (e.g.
    ``105000.yaml`` for ``105000.ckpt``), ``config.yaml``, else the folder's only ``*.yaml``
    (as Zero123's release: ``sd-objaverse-finetune-c_concat-256.yaml``). None if none applies."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    for candidate in (os.path.splitext(os.path.abspath(ckpt_path))[0] + ".yaml", os.path.join(folder, "config.yaml")):
        if os.path.isfile(candidate):
            return candidate
    found = sorted(glob.glob(os.path.join(folder, "*.yaml")))
    return found[0] if len(found) == 1 else None


def unet_heads(config_path: Optional[str], channels: list[int], ckpt_path: str = "") -> Union[int, list[int]]:
    """The UNet attention heads (diffusers ``attention_head_dim``: an int, or one count per level)
    from an ldm YAML's ``model.params.unet_config.params``; Zero123's 8 with a warning without one."""
    if not config_path:
        log.warning("%s: no ldm config (.yaml) found next to the checkpoint; assuming Zero123's %d UNet attention "
                    "heads (give the YAML with --config if the model differs)", ckpt_path or "checkpoint", UNET_HEADS)
        return UNET_HEADS
    import yaml

    from lift3d.utils.inputs import require_file

    require_file(config_path, "ldm config", "pass the checkpoint's ldm YAML with --config")
    try:
        with open(config_path) as f:
            params = yaml.safe_load(f)["model"]["params"]["unet_config"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the UNet settings (model.params.unet_config.params) of ldm config "
                        f"{config_path}: {type(e).__name__} {e}") from None
    head_channels, heads = int(params.get("num_head_channels", -1)), int(params.get("num_heads", -1))
    if head_channels > 0:  # ldm: heads = channels // num_head_channels at every level
        if any(c % head_channels for c in channels):
            raise UserError(f"{config_path}: num_head_channels {head_channels} does not divide the UNet widths {channels}")
        result = [c // head_channels for c in channels]
    elif heads > 0:
        result = heads
    else:
        raise UserError(f"{config_path}: unet_config.params sets neither num_heads nor num_head_channels")
    log.info("%s: UNet attention heads %s from %s", ckpt_path or "checkpoint", result, config_path)
    return result


def unet_config(sd: dict, heads: Union[int, list[int]] = UNET_HEADS) -> dict:
    """A diffusers UNet2DConditionModel config matching ldm UNet weights (prefix removed), with
    ``heads`` attention heads (per level if a list)."""
    conv_in = sd["input_blocks.0.0.weight"]
    blocks = _indices(sd, r"input_blocks\.(\d+)\.")[1:]
    channels, attention, per_level, count = [], [], None, 0
    for b in blocks:
        if f"input_blocks.{b}.0.op.weight" in sd:  # downsampler closes a level
            per_level, count = count, 0
            continue
        if count == 0:
            channels.append(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0])
            attention.append(f"input_blocks.{b}.1.proj_in.weight" in sd)
        count += 1
    per_level = per_level or count
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    depth = len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    return {
        "sample_size": IMAGE_SIZE // 8, "in_channels": conv_in.shape[1], "out_channels": sd["out.2.weight"].shape[0],
        "block_out_channels": channels, "layers_per_block": per_level,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": context_dim, "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": sd["middle_block.1.proj_in.weight"].ndim == 2,
    }


def vae_config(sd: dict) -> dict:
    """A diffusers AutoencoderKL config matching ldm first-stage weights (prefix removed)."""
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    channels = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "block_out_channels": channels, "layers_per_block": len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "latent_channels": sd["post_quant_conv.weight"].shape[0], "sample_size": IMAGE_SIZE,
        "scaling_factor": LATENT_SCALE,
    }


def clip_config(sd: dict) -> dict:
    """A transformers CLIPVisionConfig (as kwargs) matching OpenAI ``visual.*`` weights."""
    width, _, patch, _ = sd["conv1.weight"].shape
    positions = sd["positional_embedding"].shape[0]
    return {
        "hidden_size": width, "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": len(_indices(sd, r"transformer\.resblocks\.(\d+)\.")),
        "num_attention_heads": max(1, width // 64),  # OpenAI's rule for vision towers
        "image_size": patch * round((positions - 1) ** 0.5), "patch_size": patch,
        "projection_dim": sd["proj"].shape[1], "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }


def read_parts(path: str, use_ema: bool = True, config_path: Optional[str] = None) -> dict:
    """The model parts (see :mod:`lift3d.zero123.folder`) of the original checkpoint at ``path``;
    ``config_path``: its ldm YAML (default: :func:`find_config`)."""
    if config_path:
        from lift3d.utils.inputs import require_file

        require_file(config_path, "ldm config", "pass the checkpoint's ldm YAML with --config")   # before the weights
    return split(read_state_dict(path), path, use_ema, config_path or find_config(path))


def split(sd: dict, path: str, use_ema: bool = True, config_path: Optional[str] = None) -> dict:
    """Per-component (config, diffusers-named state dict) from a full ldm state dict."""
    missing = [p + "*" for p in (UNET, VAE, CLIP, PROJ) if not any(k.startswith(p) for k in sd)]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: expected an original Zero123 checkpoint "
                        "(UNet, first-stage VAE, CLIP image encoder and cc_projection)")
    try:
        unet_ldm, vae_ldm, clip_openai = unet_weights(sd, use_ema), take(sd, VAE), take(sd, CLIP)
        unet_cfg = unet_config(unet_ldm)
        unet_cfg["attention_head_dim"] = unet_heads(config_path, unet_cfg["block_out_channels"], path)
        configs = {"unet": unet_cfg, "vae": vae_config(vae_ldm), "image_encoder": clip_config(clip_openai)}
    except KeyError as e:
        raise UserError(f"{path} does not have the layout of a Zero123 checkpoint (no {e.args[0]})") from None
    unet, rest_u = ldm_to_diffusers.ldm_unet_to_diffusers(unet_ldm, configs["unet"])
    vae, rest_v = ldm_to_diffusers.ldm_vae_to_diffusers(vae_ldm, configs["vae"])
    clip, rest_c = ldm_to_diffusers.openai_clip_visual_to_hf(clip_openai)
    for name, rest in (("UNet", rest_u), ("VAE", rest_v), ("CLIP", rest_c)):
        if rest:
            log.warning("%s: %d unconverted %s keys ignored (e.g. %s)", path, len(rest), name, rest[0])
    return {"unet": (configs["unet"], unet), "vae": (configs["vae"], vae),
            "image_encoder": (configs["image_encoder"], clip), "projection": take(sd, PROJ)}
