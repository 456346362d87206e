"""The published EscherNet folder (``kxic/eschernet-4dof``, ``kxic/eschernet-6dof``): reading it into
parts, assembling the model, writing one.

The layout is what the reference pipeline's ``save_pretrained`` writes::

    model_index.json        Zero1to3StableDiffusionPipeline (no safety checker, no feature extractor)
    unet/                   config.json + diffusion_pytorch_model.{safetensors,bin}: a Stable-Diffusion UNet,
                            4 input channels, cross-attention width = the image encoder's last width
    vae/                    config.json + diffusion_pytorch_model.{safetensors,bin}
    image_encoder/          config.json (ConvNeXt-V2) + model.safetensors or pytorch_model.bin
    scheduler/              scheduler_config.json (the training DDPM schedule; sampled with DDIM)

The two published models have the same shapes and differ in how their attention reads cameras, which
the folder does not record: ``variant: auto`` takes it from the path (``4dof`` / ``6dof`` in a folder
name or hub id) and asks for it otherwise.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from lift3d.errors import UserError

PARTS = ("unet", "vae", "image_encoder", "scheduler")
MODEL_INDEX = {
    "_class_name": "Zero1to3StableDiffusionPipeline", "feature_extractor": [None, None],
    "image_encoder": ["CN_encoder", "CN_encoder"], "requires_safety_checker": True, "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["unet_2d_condition", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"]}


def read_parts(path: str) -> dict:
    """The parts of the EscherNet model at ``path`` (a folder or a hub id): (config, state dict) for
    the UNet, VAE and image encoder, and the scheduler config."""
    from lift3d.zero123.folder import _read_json, _read_weights, _rename_legacy_vae_attention

    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        if os.path.lexists(path):
            raise UserError(f"EscherNet model {path} is not a folder; give the model folder (kxic/eschernet-4dof "
                            "or -6dof layout)")
        if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            path = _download(path)
        else:
            raise UserError(f"EscherNet model not found: {path} (give a model folder or a Hugging Face id such as "
                            "kxic/eschernet-6dof)")
    missing = [f"{p}/" for p in PARTS if not os.path.isdir(os.path.join(path, p))]
    if missing:
        raise UserError(f"{path} is not a complete EscherNet model folder: it lacks {', '.join(missing)} (expected "
                        "unet/, vae/, image_encoder/ and scheduler/ as in kxic/eschernet-6dof)")
    parts = {}
    for name, stems in (("unet", ("diffusion_pytorch_model",)), ("vae", ("diffusion_pytorch_model",)),
                        ("image_encoder", ("model", "pytorch_model"))):
        sub = os.path.join(path, name)
        parts[name] = (_read_json(os.path.join(sub, "config.json")), _read_weights(sub, stems, None))
    _rename_legacy_vae_attention(parts["vae"][1])
    parts["scheduler"] = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    parts["path"] = path
    return parts


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        names = [f"{s}.{e}" for s in ("diffusion_pytorch_model", "model", "pytorch_model")
                 for e in ("safetensors", "bin")]
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.txt"] + [f"*/{n}" for n in names])
    except Exception as e:
        raise UserError(f"'{repo_id}' is not a local path and could not be downloaded from the Hugging Face hub "
                        f"({type(e).__name__}); download it and pass the folder") from None


def detect_variant(path: str, variant: str) -> str:
    """``variant`` (4dof | 6dof), or for ``auto`` the one a path names."""
    if variant in ("4dof", "6dof"):
        return variant
    if variant != "auto":
        raise UserError(f"EscherNet variant must be auto, 4dof or 6dof, got '{variant}'")
    # The innermost folder name that names one of them (a hub snapshot: .../models--kxic--eschernet-6dof/snapshots/H)
    for part in reversed(os.path.normpath(str(path)).lower().split(os.sep)):
        named = set(re.findall(r"([46])-?dof", part))
        if len(named) == 1:
            return f"{named.pop()}dof"
    raise UserError(f"cannot tell from {path} whether it is the 4-DoF or the 6-DoF EscherNet model; set "
                    "system.guidance.prior.variant=4dof or 6dof")


def assemble(cls, parts: dict, variant: str, dtype: torch.dtype, source: str):
    """An :class:`~lift3d.eschernet.model.EscherNetModel` from loaded parts."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ConvNextV2Config, ConvNextV2Model

    from lift3d.zero123.model import _materialize

    variant = detect_variant(parts.get("path", source), variant)
    unet_cfg, unet_sd = parts["unet"]
    vae_cfg, vae_sd = parts["vae"]
    enc_cfg, enc_sd = parts["image_encoder"]
    if enc_cfg.get("model_type", "convnextv2") != "convnextv2":
        raise UserError(f"{source}: image_encoder is a '{enc_cfg.get('model_type')}' model; EscherNet's is a "
                        "ConvNeXt-V2 (model_type convnextv2)")
    try:
        unet = _materialize(lambda: UNet2DConditionModel.from_config(unet_cfg), unet_sd, f"{source}: unet")
        vae = _materialize(lambda: AutoencoderKL.from_config(vae_cfg), vae_sd, f"{source}: vae")
        config = ConvNextV2Config(**{k: v for k, v in enc_cfg.items() if not k.startswith("_")
                                     and k not in ("architectures", "model_type", "transformers_version")})
        enc_sd = {k.removeprefix("convnextv2."): v for k, v in enc_sd.items()}
        encoder = _materialize(lambda: ConvNextV2Model(config), enc_sd, f"{source}: image_encoder")
        scheduler = DDIMScheduler.from_config(parts["scheduler"])
    except (ValueError, TypeError) as e:  # a config.json the model classes reject
        raise UserError(f"{source}: invalid component config: {str(e).splitlines()[-1].strip()}") from None
    latent = vae.config.latent_channels
    if unet.config.in_channels != latent:
        raise UserError(f"{source}: the UNet takes {unet.config.in_channels} input channels; EscherNet's takes "
                        f"{latent} (the noisy latent only): is this a Zero123 model? (use prior zero123)")
    width = encoder.config.hidden_sizes[-1]
    if unet.config.cross_attention_dim != width:
        raise UserError(f"{source}: the UNet's cross-attention width is {unet.config.cross_attention_dim} but the "
                        f"image encoder gives {width}-d tokens")
    model = cls(unet, vae, encoder, scheduler, variant).to(dtype)
    model.source = source
    return model


def write_folder(model, out_dir: str) -> None:
    """Write ``model`` in the published layout (safetensors), atomically; ``out_dir`` must not exist or
    be empty."""
    from lift3d.zero123.folder import atomic_folder

    with atomic_folder(out_dir) as tmp:
        model.unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        model.vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
        encoder = model.image_encoder
        encoder.config.architectures = ["CN_encoder"]
        encoder.save_pretrained(os.path.join(tmp, "image_encoder"), safe_serialization=True)
        from diffusers import DDPMScheduler

        DDPMScheduler.from_config(model.scheduler.config).save_pretrained(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(MODEL_INDEX, f, indent=2)


def folder_config(path: str, part: str) -> Optional[dict]:
    """``part``/config.json of a local folder, without loading anything (None when not there)."""
    from lift3d.utils.inputs import read_json_object

    config = os.path.join(os.path.expanduser(str(path)), part, "config.json")
    if not os.path.isfile(config):
        return None
    return read_json_object(config, f"{part} config", "the model folder is damaged: re-download it")
