"""The on-disk diffusers folder of a Zero123-family model: reading it into parts, writing a model.

Two layouts are read:
- kxic (``cc_projection/``, weights ``projection.*``), what lift3d writes;
- bennyguo/ashawkey (``clip_camera_projection/``, ``proj.*``), fp16 or fp32, with or without
  ``variant`` files (``*.fp16.safetensors``).
The parts are what :meth:`lift3d.zero123.model.Zero123Model.from_parts` assembles: for the UNet,
VAE and CLIP image encoder a (config, diffusers/transformers-named state dict) pair, the camera
projection's ``weight`` and ``bias``, and a scheduler config (or None).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
from typing import Optional

from lift3d.errors import UserError
from lift3d.utils.inputs import require_file
from lift3d.utils.io import load_torch

log = logging.getLogger(__name__)

PROJECTION_DIRS = {"cc_projection": "projection", "clip_camera_projection": "proj"}  # folder -> weight prefix
FEATURE_EXTRACTOR = {  # CLIP ViT-L/14 preprocessing, for other tools reading our folders (we use our own)
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": {"shortest_edge": 224},
    "image_processor_type": "CLIPImageProcessor", "feature_extractor_type": "CLIPFeatureExtractor"}



def read_folder(folder: str, variant: Optional[str] = None) -> dict:
    """Parts of a diffusers Zero123 folder (either layout)."""
    projection_dirs = [d for d in PROJECTION_DIRS if os.path.isdir(os.path.join(folder, d))]
    missing = [d for d in ("unet", "vae", "image_encoder") if not os.path.isdir(os.path.join(folder, d))]
    if missing or not projection_dirs:
        what = ", ".join(missing + ([] if projection_dirs else ["cc_projection (or clip_camera_projection)"]))
        raise UserError(f"{folder} is not a Zero123 model folder: it lacks {what} (expected unet/, vae/, "
                        "image_encoder/ and cc_projection/ or clip_camera_projection/, or an original .ckpt)")
    parts = {}
    for name in ("unet", "vae"):
        sub = os.path.join(folder, name)
        parts[name] = (_read_json(os.path.join(sub, "config.json")),
                       _read_weights(sub, ("diffusion_pytorch_model",), variant))
    sub = os.path.join(folder, "image_encoder")
    clip_cfg = _read_json(os.path.join(sub, "config.json"))
    clip_cfg = clip_cfg.get("vision_config", clip_cfg)  # a full CLIPConfig nests it
    parts["image_encoder"] = (clip_cfg, _read_weights(sub, ("model", "pytorch_model"), variant))
    _rename_legacy_vae_attention(parts["vae"][1])

    proj_dir = projection_dirs[0]
    weights = _read_weights(os.path.join(folder, proj_dir), ("diffusion_pytorch_model",), variant)
    prefix = PROJECTION_DIRS[proj_dir]
    parts["projection"] = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    if set(parts["projection"]) != {"weight", "bias"}:
        raise UserError(f"{folder}/{proj_dir} should hold {prefix}.weight and {prefix}.bias, found {sorted(weights)}")
    scheduler_json = os.path.join(folder, "scheduler", "scheduler_config.json")
    parts["scheduler"] = _read_json(scheduler_json) if os.path.isfile(scheduler_json) else None
    return parts


def _read_json(path: str) -> dict:
    from lift3d.utils.inputs import read_json_object

    return read_json_object(path, "model config", "the model folder is damaged: re-download or re-convert it")


def _weights_files(folder: str, stems, variant: Optional[str]) -> list[str]:
    """The weight file(s) of one component: the requested variant, else the plain file, else any variant."""
    wanted = [variant, None] if variant else [None]
    for v in wanted:
        for stem in stems:
            for ext in ("safetensors", "bin"):
                name = os.path.join(folder, f"{stem}.{v}.{ext}" if v else f"{stem}.{ext}")
                if os.path.isfile(name):
                    if v != variant:
                        log.info("%s: no '%s' variant, using %s", folder, variant, os.path.basename(name))
                    return [name]
                if os.path.isfile(name + ".index.json"):  # sharded
                    shards = sorted(set(_read_json(name + ".index.json")["weight_map"].values()))
                    return [os.path.join(folder, s) for s in shards]
    for stem in stems:  # e.g. a folder that only has *.fp16.safetensors and no variant was asked for
        others = sorted(glob.glob(os.path.join(folder, f"{stem}.*.safetensors")))
        if others:
            log.info("%s: using variant file %s", folder, os.path.basename(others[0]))
            return others[:1]
    name = f"{stems[0]}.{variant}" if variant else stems[0]
    raise UserError(f"no weights in {folder}: expected {name}.safetensors (or .bin)")


def _read_weights(folder: str, stems, variant: Optional[str]) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for path in _weights_files(folder, stems, variant):
        try:
            sd.update(load_file(require_file(path, "weights")) if path.endswith(".safetensors") else load_torch(path))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None
    return sd


def _rename_legacy_vae_attention(sd: dict) -> None:
    """diffusers < 0.14 saved the VAE mid attention as query/key/value/proj_attn."""
    legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    for key in list(sd):
        m = re.match(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            sd[f"{m[1]}.{legacy[m[2]]}.{m[3]}"] = sd.pop(key)


# ---------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_folder(out_dir: str):
    """A temporary folder to write a model into (the ``with`` block), renamed to ``out_dir`` when the block
    succeeds and removed either way, so a failed write leaves nothing behind. ``out_dir`` must not exist or
    be empty. (EscherNet's :func:`lift3d.eschernet.folder.write_folder` writes through it too.)"""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"output {out_dir} already exists and is not an empty folder; choose a new folder")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_folder(model, out_dir: str) -> None:
    """Write ``model`` as a kxic-layout diffusers folder of safetensors, atomically (temp folder,
    then rename). ``out_dir`` must not exist or be empty."""
    from safetensors.torch import save_file

    with atomic_folder(out_dir) as tmp:
        model.unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        model.vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
        model.image_encoder.save_pretrained(os.path.join(tmp, "image_encoder"))
        model.scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        proj_dir = os.path.join(tmp, "cc_projection")
        os.makedirs(proj_dir)
        weights = {f"projection.{k}": v.detach().contiguous().cpu() for k, v in model.projection.state_dict().items()}
        save_file(weights, os.path.join(proj_dir, "diffusion_pytorch_model.safetensors"))
        d_out, d_in = model.projection.weight.shape
        _write_json(os.path.join(proj_dir, "config.json"),
                    {"_class_name": "CCProjection", "in_channel": d_in, "out_channel": d_out})
        _write_json(os.path.join(tmp, "feature_extractor", "preprocessor_config.json"), FEATURE_EXTRACTOR)
        _write_json(os.path.join(tmp, "model_index.json"), {
            "_class_name": "Zero1to3StableDiffusionPipeline",
            "cc_projection": ["pipeline_zero1to3", "CCProjection"],
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]})


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
