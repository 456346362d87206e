"""Random-weight Zero123++ folders in the published layout (``sudo-ai/zero123plus-v1.x``), for tests and memory
benchmarks: no weights can be downloaded here.

``write_random_zero123plus(out_dir, version, size, seed)`` writes ``model_index.json`` (with
``ramping_coefficients``), ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` (a byte-level vocabulary with no
merges: enough for the empty prompt), ``vision_encoder/``, ``feature_extractor_clip/``, ``feature_extractor_vae/``
and ``scheduler/``, all weights as safetensors. Each weight depends only on ``seed``, its name and its shape
(:func:`reseed`), not on the libraries' initialisers.

- ``"tiny"``: 32-px views (a 96x64 tile, 12x8 latents), 32-wide context, runs in milliseconds;
- ``"full"``: the published shapes (SD-2 UNet 866 M, VAE 84 M, OpenCLIP-H text 340 M, CLIP-H vision 632 M,
  320-px views); ~8 GB of RAM in float32.

The schedulers are Euler ancestral with v-prediction and the linear beta schedule (Zero123++'s report: it
replaces Stable Diffusion's scaled-linear one), the same for both versions: what the published folders' own
``scheduler/scheduler_config.json`` say could not be read here, and a loaded model uses those.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

UNET = {
    "tiny": dict(sample_size=12, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True),
    "full": dict(sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
}
VAE = {
    "tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=32),
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=768),
}
TEXT = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, projection_dim=32, hidden_act="gelu"),
    "full": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, projection_dim=1024, hidden_act="gelu"),
}
VISION = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=32, hidden_act="gelu"),
    "full": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
}
VIEW_SIZE = {"tiny": 32, "full": 320}
SCHEDULERS = {   # the report's linear schedule; no timestep_spacing (diffusers' default, "linspace": the README
    "v1.1": {"beta_schedule": "linear"},   # has users switch to "trailing")
    "v1.2": {"beta_schedule": "linear"},
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _processor(size: int, mean, std) -> dict:
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(mean),
            "image_std": list(std), "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
            "image_processor_type": "CLIPImageProcessor", "feature_extractor_type": "CLIPFeatureExtractor"}


def scheduler_config(version: str) -> dict:
    return {"_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "prediction_type": "v_prediction", "steps_offset": 1, "trained_betas": None,
            **SCHEDULERS[version]}


def _byte_symbols() -> list:
    """The 256 printable stand-ins of byte-level BPE for the bytes 0..255 (GPT-2/CLIP's table, in its order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    codes = {}
    for b in range(256):
        if b in keep:
            codes[b] = b
        else:
            codes[b] = 256 + extra
            extra += 1
    order = keep + [b for b in range(256) if b not in keep]
    for b in order:
        out.append(chr(codes[b]))
    return out


def write_tokenizer(folder: str, max_length: int = 77) -> None:
    """A CLIP tokenizer with the byte symbols alone (no merges); "!" is id 0 and the pad token, as SD-2's."""
    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
                   "errors": "replace", **special}, f)


def _json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def reseed(module: torch.nn.Module, seed: int) -> None:
    """Give every tensor of ``module`` values that depend only on ``seed``, its name and its shape (not on the
    library's initialisers): matrices N(0, 1/fan-in), biases N(0, 0.02²), norm scales 1 + N(0, 0.1²)."""
    import zlib

    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            x = torch.randn(tensor.shape, generator=g)
            if tensor.dim() >= 2:
                x = x / tensor[0].numel() ** 0.5
            elif name.endswith("bias") or "norm" not in name:
                x = x * 0.02
            else:
                x = 1 + 0.1 * x
            tensor.copy_(x)


def write_random_zero123plus(out_dir: str, version: str = "v1.2", size: str = "tiny", seed: int = 0) -> str:
    """Write a random-weight Zero123++ ``version`` folder at ``out_dir`` (replaced if there). Returns it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    if version not in SCHEDULERS:
        raise ValueError(f"version must be one of {', '.join(SCHEDULERS)}")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET[size])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **VAE[size])
    # The byte-level tokenizer below has 514 tokens; the full-size text encoder keeps CLIP's 49408 rows.
    text_cfg = CLIPTextConfig(vocab_size=514 if size == "tiny" else 49408, layer_norm_eps=1e-5, bos_token_id=512,
                              eos_token_id=513, pad_token_id=0, **TEXT[size])
    text = CLIPTextModel(text_cfg)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(layer_norm_eps=1e-5, **VISION[size]))
    for i, module in enumerate((unet, vae, text, vision)):
        reseed(module, seed * 10 + i)
    ramp = (torch.rand(77, generator=torch.Generator().manual_seed(seed + 1)) * 2).tolist()
    unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
    for name, model in (("text_encoder", text), ("vision_encoder", vision)):
        os.makedirs(os.path.join(tmp, name))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, name, "model.safetensors"), metadata={"format": "pt"})
        _json(os.path.join(tmp, name, "config.json"),
              {"architectures": [type(model).__name__], **model.config.to_dict()})
    write_tokenizer(os.path.join(tmp, "tokenizer"))
    view = VIEW_SIZE[size]
    _json(os.path.join(tmp, "feature_extractor_vae", "preprocessor_config.json"),
          _processor(view, [0.5] * 3, [0.5] * 3))
    _json(os.path.join(tmp, "feature_extractor_clip", "preprocessor_config.json"),
          _processor(VISION[size]["image_size"], CLIP_MEAN, CLIP_STD))
    _json(os.path.join(tmp, "scheduler", "scheduler_config.json"), scheduler_config(version))
    _json(os.path.join(tmp, "model_index.json"), {
        "_class_name": "Zero123PlusPipeline", "_diffusers_version": "0.20.2",
        "feature_extractor_clip": ["transformers", "CLIPImageProcessor"],
        "feature_extractor_vae": ["transformers", "CLIPImageProcessor"],
        "ramping_coefficients": ramp, "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "vision_encoder": ["transformers", "CLIPVisionModelWithProjection"]})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
