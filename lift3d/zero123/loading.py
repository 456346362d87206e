"""Loading and saving Zero123-family models.

Every source is first turned into the same parts: for the UNet, VAE and CLIP image encoder a
(config, diffusers/transformers-named state dict) pair, plus the camera projection's weight and
bias and a scheduler config. One builder then makes the model from those parts, so the three
formats cannot drift apart:
- a diffusers folder in the kxic layout (``cc_projection/``, weights ``projection.*``);
- a diffusers folder in the bennyguo/ashawkey layout (``clip_camera_projection/``, ``proj.*``),
  fp16 or fp32, with or without ``variant`` files (``*.fp16.safetensors``);
- an original ``.ckpt`` (converted in memory, see :mod:`lift3d.zero123.ldm_checkpoint`);
- a Hugging Face hub id (downloaded into the local cache, then read as a folder).
Modules are created on the meta device and take the loaded tensors directly, so a 3 GB UNet is
neither randomly initialised nor held twice.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from typing import Optional

import torch

from lift3d.errors import UserError

log = logging.getLogger(__name__)

PROJECTION_DIRS = {"cc_projection": "projection", "clip_camera_projection": "proj"}  # folder -> weight prefix
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "timestep_spacing": "leading"}
FEATURE_EXTRACTOR = {  # CLIP ViT-L/14 preprocessing, for other tools reading our folders (we use our own)
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": {"shortest_edge": 224},
    "image_processor_type": "CLIPImageProcessor", "feature_extractor_type": "CLIPFeatureExtractor"}


# ---------------------------------------------------------------------------- sources


def load(path: str, torch_dtype: Optional[torch.dtype] = None, variant: Optional[str] = None, use_ema: bool = True):
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        from lift3d.zero123 import ldm_checkpoint

        parts = ldm_checkpoint.split(ldm_checkpoint.read_state_dict(path), path, use_ema)
    elif os.path.isdir(path):
        parts = read_folder(path, variant)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.endswith((".ckpt", ".pt", ".pth")):
        parts = read_folder(_download(path, variant), variant)
    else:
        raise UserError(f"Zero123 model not found: {path} (give a diffusers model folder, an original .ckpt "
                        "file, or a Hugging Face id such as kxic/zero123-xl)")
    return build(parts, torch_dtype or torch.float32, path)


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
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


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
            sd.update(load_file(path) if path.endswith(".safetensors")
                      else torch.load(path, map_location="cpu", weights_only=True))
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


# ---------------------------------------------------------------------------- building


def _materialize(make, state_dict: dict, what: str):
    """Create a module on the meta device and give it ``state_dict``'s tensors; refuse a mismatch."""
    with torch.device("meta"):
        module = make()
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        details = "; ".join(s for s in (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"wrong shapes (e.g. {shapes[0]})" if shapes else "") if s)
        raise UserError(f"{what}: weights do not match the model its config describes: {details}")
    module.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers are in no checkpoint; the only one in these models is CLIP's position ids.
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if attr != "position_ids":
                raise RuntimeError(f"{what}: buffer {name} has no value after loading")
            setattr(owner, attr, torch.arange(buf.shape[-1]).expand(buf.shape))
    return module


def build(parts: dict, dtype: torch.dtype, source: str = "<parts>"):
    """A :class:`Zero123Model` from loaded parts (see module docstring)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lift3d.zero123.model import Zero123Model

    unet_cfg, unet_sd = parts["unet"]
    vae_cfg, vae_sd = parts["vae"]
    clip_cfg, clip_sd = parts["image_encoder"]
    proj = parts["projection"]
    try:
        unet = _materialize(lambda: UNet2DConditionModel.from_config(unet_cfg), unet_sd, f"{source}: unet")
        vae = _materialize(lambda: AutoencoderKL.from_config(vae_cfg), vae_sd, f"{source}: vae")
        clip_config = CLIPVisionConfig(**{k: v for k, v in clip_cfg.items() if not k.startswith("_")})
        clip = _materialize(lambda: CLIPVisionModelWithProjection(clip_config), clip_sd, f"{source}: image_encoder")
    except (ValueError, TypeError) as e:  # a config.json the model classes reject
        raise UserError(f"{source}: invalid component config: {str(e).splitlines()[-1].strip()}") from None

    # The pieces must fit together as Zero123: 8-channel UNet, projection (D + 4) -> D = context size.
    latent = vae.config.latent_channels
    if unet.config.in_channels != 2 * latent:
        raise UserError(f"{source}: the UNet takes {unet.config.in_channels} input channels; a Zero123 UNet takes "
                        f"{2 * latent} (noisy latent + condition latent): is this a plain Stable Diffusion model?")
    d_ctx, d_clip = unet.config.cross_attention_dim, clip.config.projection_dim
    if tuple(proj["weight"].shape) != (d_ctx, d_clip + 4) or tuple(proj["bias"].shape) != (d_ctx,):
        raise UserError(f"{source}: camera projection has shape {tuple(proj['weight'].shape)}, expected "
                        f"({d_ctx}, {d_clip + 4}) = UNet context x (CLIP embedding {d_clip} + 4 pose values)")
    projection = _materialize(lambda: torch.nn.Linear(d_clip + 4, d_ctx), proj, f"{source}: camera projection")

    scheduler = DDIMScheduler.from_config(parts.get("scheduler") or SCHEDULER)
    model = Zero123Model(unet, vae, clip, projection, scheduler).to(dtype)
    model.source = source
    return model


# ---------------------------------------------------------------------------- saving


def save(model, out_dir: str) -> None:
    """Write ``model`` as a kxic-layout diffusers folder of safetensors, atomically (temp folder,
    then rename). ``out_dir`` must not exist or be empty."""
    from safetensors.torch import save_file

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"output {out_dir} already exists and is not an empty folder; choose a new folder")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
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
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def convert_ckpt(in_path: str, out_dir: str, use_ema: bool = True, half: bool = False) -> str:
    """``lift3d convert-ckpt``: an original Zero123 ``.ckpt`` -> kxic-layout diffusers folder.
    Returns ``out_dir``. ``half`` stores fp16 weights (half the size)."""
    if not os.path.isfile(in_path):
        raise UserError(f"checkpoint not found: {in_path}")
    model = load(in_path, torch_dtype=torch.float16 if half else torch.float32, use_ema=use_ema)
    save(model, out_dir)
    return out_dir


def convert_ckpt_main(argv: list[str]) -> int:
    """``lift3d convert-ckpt IN.ckpt OUT_DIR``."""
    import argparse

    p = argparse.ArgumentParser(prog="lift3d convert-ckpt", description="Convert an original Zero123 .ckpt to a "
                                "diffusers folder (kxic layout, safetensors).")
    p.add_argument("checkpoint", help="original Zero123 / Stable-Zero123 .ckpt")
    p.add_argument("out_dir", help="new output folder")
    p.add_argument("--no-ema", action="store_true", help="use the raw UNet weights even if EMA weights are present")
    p.add_argument("--half", action="store_true", help="store fp16 weights")
    a = p.parse_args(argv)
    out = convert_ckpt(a.checkpoint, a.out_dir, use_ema=not a.no_ema, half=a.half)
    print(f"wrote {out}")
    return 0
