"""The Zero123++ model: a Stable-Diffusion-2 UNet that denoises six views of an object as one 3x2 tile,
conditioned on one image through *reference attention* and a CLIP image embedding.

What it computes, as the reference pipeline (SUDO-AI-3D/zero123plus ``diffusers-support/pipeline.py``) does:

- **Condition image**: RGBA composited on gray 127/255, then two preprocessings read from the folder's
  ``feature_extractor_vae`` / ``feature_extractor_clip`` configs (resize, centre crop, mean/std).
  The VAE one is encoded to a posterior *sample*, unscaled (no VAE scaling factor, no latent shift): the
  reference latent. The unconditional branch's reference latent is the encoding of an all-zero (normalised)
  image.
- **Prompt**: the text encoder's output for the empty prompt (the tokenizer pads to its maximum length);
  the conditional branch adds the CLIP image embedding times the per-token ``ramping_coefficients`` of
  ``model_index.json``; the unconditional one is the empty prompt alone.
- **Reference attention**: at every denoising call, the reference latent is noised to the same timestep
  with fresh noise (the Euler scheduler's ``add_noise`` then ``scale_model_input``, which is the DDPM
  forward process at t), and run through the UNet once while each self-attention layer (``attn1``) records
  its input; the denoising pass then lets each self-attention attend to its own tokens followed by the
  recorded ones (keys and values from both; queries from its own).
- **Output**: v-prediction with classifier-free guidance ``v_u + s (v_c − v_u)`` (no unconditional pass
  when ``s <= 1``); ε = √ᾱ v + √(1−ᾱ) x_t.
- **Latents**: images in [0, 1] -> [-1, 1] x 0.5/0.8 -> VAE -> x scaling factor -> (z − 0.22) x 0.75, and
  back; the six 320-px views are one 960x640 tile (3 rows, 2 columns, row-major), encoded as one image
  (the reference only ever decodes tiles; SDS here may encode its renders view by view: ``encode_views``).

The denoising input x_t is the DDPM-scaled latent √ᾱ z + √(1−ᾱ) ε: the Euler scheduler's
``scale_model_input`` of its own (z + σ ε) is exactly that, so SDS noise and the sampler's input agree.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.errors import UserError
from lift3d.utils.latent_model import LatentModelMixin

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "vision_encoder", "feature_extractor_clip",
         "feature_extractor_vae", "scheduler")
LATENT_SHIFT, LATENT_GAIN = 0.22, 0.75        # diffusion latent = (VAE latent x scaling factor − 0.22) x 0.75
IMAGE_GAIN = 0.5 / 0.8                       # VAE input = image in [-1, 1] x 0.625
GRAY = 127.0 / 255.0                         # the condition image's background
ROWS, COLS = 3, 2                            # the tile: 3 rows of 2 views, row-major
VIEWS = ROWS * COLS
AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)   # relative to the input view
VERSIONS = {  # elevations (absolute, alternating) and field of view (None: the input's) of the six views
    "v1.1": {"elevations": (30.0, -20.0), "fovy": None},
    "v1.2": {"elevations": (20.0, -10.0), "fovy": 30.0},
}


def tile(images: torch.Tensor) -> torch.Tensor:
    """(6N, C, h, w) views -> (N, C, 3h, 2w) tiles, view k at row k // 2, column k % 2."""
    b, c, h, w = images.shape
    if b % VIEWS:
        raise UserError(f"Zero123++ scores its 6 views as one tile; got {b} views (give a multiple of 6)")
    x = images.reshape(b // VIEWS, ROWS, COLS, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b // VIEWS, c, ROWS * h, COLS * w)


def untile(tiles: torch.Tensor) -> torch.Tensor:
    """(N, C, 3h, 2w) tiles -> (6N, C, h, w) views (the inverse of :func:`tile`)."""
    n, c, hh, ww = tiles.shape
    h, w = hh // ROWS, ww // COLS
    x = tiles.reshape(n, c, ROWS, h, COLS, w).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n * VIEWS, c, h, w)


def detect_version(path: str, version: str) -> str:
    """``version`` unless "auto": then the one named in the folder's path (``zero123plus-v1.1``, ``-v1.2``)."""
    if version != "auto":
        return version
    found = re.findall(r"v1[._-]?([12])(?![0-9])", os.path.basename(os.path.normpath(str(path))).lower()) or \
        re.findall(r"v1[._-]?([12])(?![0-9])", str(path).lower())
    if found:
        return f"v1.{found[-1]}"
    log.warning("Zero123++ version not named in %s; using v1.2's cameras (set system.guidance.prior.version)", path)
    return "v1.2"


# ---------------------------------------------------------------------------- reference attention


class _ReferenceState:
    """Shared by every self-attention layer: "record" stores its input, "attend" appends it to the keys."""

    def __init__(self):
        self.mode: Optional[str] = None
        self.cache: dict = {}


class ReferenceAttention:
    """An attention processor for a self-attention layer: records its input in the reference pass, and in
    the denoising pass computes the stock attention with keys/values from [own tokens, recorded tokens]."""

    def __init__(self, inner, state: _ReferenceState, name: str):
        self.inner, self.state, self.name = inner, state, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.state.mode == "record":
            self.state.cache[self.name] = source
        elif self.state.mode == "attend":
            source = torch.cat([source, self.state.cache.pop(self.name)], dim=1)
        return self.inner(attn, hidden_states, source, attention_mask, temb)


def install_reference_attention(unet) -> _ReferenceState:
    from diffusers.models.attention_processor import AttnProcessor2_0

    state = _ReferenceState()
    procs = {}
    for name in unet.attn_processors:
        inner = AttnProcessor2_0()
        procs[name] = ReferenceAttention(inner, state, name) if name.endswith("attn1.processor") else inner
    unet.set_attn_processor(procs)
    return state


# ---------------------------------------------------------------------------- the tile encoder's memory


class _Checkpointed(nn.Module):
    """A module whose activations are recomputed in the backward pass instead of held (same values)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.module, *args, use_reentrant=False, **kwargs)
        return self.module(*args, **kwargs)


def checkpoint_encoder(vae) -> None:
    """Recompute each resnet, downsampler and mid-block layer of the VAE encoder in backward (the same values):
    encoding a 960x640 tile and its backward peak at 3.3 GiB above the weights in float32 with this, 7.3 GiB
    without (5.2 with diffusers' per-block checkpointing; measured on a CPU)."""
    encoder = vae.encoder
    for block in encoder.down_blocks:
        block.resnets = nn.ModuleList(_Checkpointed(m) for m in block.resnets)
        if block.downsamplers is not None:
            block.downsamplers = nn.ModuleList(_Checkpointed(m) for m in block.downsamplers)
    mid = encoder.mid_block
    mid.resnets = nn.ModuleList(_Checkpointed(m) for m in mid.resnets)
    mid.attentions = nn.ModuleList(_Checkpointed(m) if m is not None else m for m in mid.attentions)


def encode_views(vae, tiles: torch.Tensor):
    """The VAE posterior of tiles (N, 3, 3h, 2w) from their six views encoded one at a time, each recomputed
    in backward (only its input is held), the moments tiled back. The encoder's activations then peak at one
    320-px view's instead of the 960x640 tile's; the posterior differs from the whole tile's only where the
    encoder's convolutions and mid-block attention would reach across a view's border
    (benchmarks/zero123plus_encoder.py measures both)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from torch.utils.checkpoint import checkpoint

    def moments(view):
        return vae.encode(view).latent_dist.parameters

    views = untile(tiles)
    if torch.is_grad_enabled():
        parts = [checkpoint(moments, v[None], use_reentrant=False) for v in views]
    else:
        parts = [moments(v[None]) for v in views]
    return DiagonalGaussianDistribution(tile(torch.cat(parts)))


# ---------------------------------------------------------------------------- the model


@dataclass
class Zero123PlusCondition:
    """The encoded condition, in branch order [unconditional, conditional]: prompt embeddings (2, L, D)
    and reference latents (2, 4, h, w), unscaled VAE posterior samples."""

    embeddings: torch.Tensor
    latents: torch.Tensor


class Zero123PlusModel(LatentModelMixin, nn.Module):
    def __init__(self, unet, vae, vision_encoder, scheduler, prompt_embeds: torch.Tensor, ramp: torch.Tensor,
                 vae_processor: dict, clip_processor: dict):
        super().__init__()
        self.unet, self.vae, self.vision_encoder = unet, vae, vision_encoder
        self.scheduler = scheduler          # the folder's scheduler (Euler ancestral): config and ᾱ
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)   # (1, L, D): E("")
        self.register_buffer("ramp", ramp, persistent=False)                     # (L,)
        self.vae_processor, self.clip_processor = vae_processor, clip_processor
        self.reference = install_reference_attention(unet)
        checkpoint_encoder(vae)
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None,
                        variant: Optional[str] = None) -> "Zero123PlusModel":
        """Load a Zero123++ diffusers folder (``sudo-ai/zero123plus-v1.1`` / ``-v1.2``) or hub id."""
        folder = _resolve(os.path.expanduser(str(path)), variant)
        model = _build(cls, folder, variant)
        model.source = folder
        return model.to(torch_dtype or torch.float32)

    # ------------------------------------------------------------------ properties
    # dtype, device, latent_scale, alphas_cumprod, num_train_timesteps: LatentModelMixin; its own encode/decode

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of one view (320 for the published models): the condition size of ``feature_extractor_vae``."""
        return processor_size(self.vae_processor)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "v_prediction"))

    # ------------------------------------------------------------------ condition

    def preprocess(self, images_01: torch.Tensor, processor: dict) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> a feature extractor's output: shortest edge resized (bicubic), centre
        crop, mean/std, as its ``preprocessor_config.json`` says."""
        x = images_01.float()
        if processor.get("do_resize", True):
            size = processor.get("size", {})
            if isinstance(size, dict) and "shortest_edge" in size:
                s = int(size["shortest_edge"])
                h, w = x.shape[-2:]
                target = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
            elif isinstance(size, dict):
                target = (int(size["height"]), int(size["width"]))
            else:
                target = (int(size), int(size))
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x.contiguous(), size=target, mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 1)
                x = torch.round(x * 255) / 255    # the reference resizes 8-bit images (PIL)
        if processor.get("do_center_crop", True):
            crop = processor.get("crop_size", {})
            ch, cw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., max(top, 0):max(top, 0) + ch, max(left, 0):max(left, 0) + cw]
        if processor.get("do_normalize", True):
            mean = torch.tensor(processor["image_mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(processor["image_std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    @staticmethod
    def on_gray(rgba: torch.Tensor) -> torch.Tensor:
        """(B, 4, H, W) straight-alpha RGBA in [0, 1] -> RGB on gray 127/255, in 8-bit steps as the
        reference's PIL composite."""
        rgb, alpha = rgba[:, :3], rgba[:, 3:4]
        return (torch.round((rgb * alpha + GRAY * (1 - alpha)) * 255) / 255).clamp(0, 1)

    @torch.no_grad()
    def encode_condition(self, rgb_01: torch.Tensor, posterior_noise: Optional[torch.Tensor] = None,
                         generator: Optional[torch.Generator] = None,
                         embeddings: Optional[torch.Tensor] = None) -> Zero123PlusCondition:
        """Encode one condition image (1, 3, H, W) in [0, 1] (on gray). ``posterior_noise`` (2, 4, h, w): the
        VAE posterior samples' noise for [the zero image, the condition] (drawn when not given).
        ``embeddings``: this image's prompt embeddings from an earlier call (they draw nothing), so the
        vision encoder is not needed again (:meth:`release_vision_encoder`)."""
        dev, dt = self.device, self.dtype
        vae_in = self.preprocess(rgb_01.to(dev), self.vae_processor).to(dt)
        if posterior_noise is None:   # drawn as the reference draws them: the condition's first
            shape = (1, 4, vae_in.shape[-2] // self.latent_factor, vae_in.shape[-1] // self.latent_factor)
            cond_noise = torch.randn(shape, generator=generator)
            posterior_noise = torch.cat([torch.randn(shape, generator=generator), cond_noise])
        latents = []
        for x, noise in zip((torch.zeros_like(vae_in), vae_in), posterior_noise):   # one at a time, as the reference
            dist = self.vae.encode(x).latent_dist
            latents.append(dist.mean + dist.std * noise[None].to(dev, dist.mean.dtype))
        latents = torch.cat(latents)
        if embeddings is not None:
            return Zero123PlusCondition(embeddings, latents)
        if self.vision_encoder is None:
            raise RuntimeError("the vision encoder was released: pass the condition's embeddings")
        clip_in = self.preprocess(rgb_01.to(dev), self.clip_processor).to(dt)
        image_embeds = self.vision_encoder(pixel_values=clip_in).image_embeds[:, None]      # (1, 1, D)
        base = self.prompt_embeds.to(dt)
        cond = base + image_embeds * self.ramp.to(dt)[None, :, None]
        return Zero123PlusCondition(torch.cat([base, cond]), latents)

    def release_vision_encoder(self) -> None:
        """Free the CLIP vision encoder (632 M parameters at the published size) once the condition's
        embeddings are kept: sampling again only redraws the condition's VAE posterior samples."""
        self.vision_encoder = None

    # ------------------------------------------------------------------ latents

    def encode(self, images_01: torch.Tensor, noise: Optional[torch.Tensor] = None,
               sample: bool = True, per_view: bool = False) -> torch.Tensor:
        """Tiles (B, 3, H, W) in [0, 1] -> diffusion latents (differentiable). ``noise``: the posterior
        sample's noise (else drawn); ``sample=False``: the posterior mean. ``per_view``: each of a tile's six
        views through the encoder on its own, recomputed in backward, and their posteriors tiled (a sixth of
        the encoder's memory; see :func:`encode_views`), else the tile as one image."""
        x = ((images_01.contiguous() * 2 - 1) * IMAGE_GAIN).to(self.dtype)
        dist = encode_views(self.vae, x) if per_view else self.vae.encode(x).latent_dist
        if not sample:
            z = dist.mean
        elif noise is None:
            z = dist.sample()
        else:
            z = dist.mean + dist.std * noise.to(dist.mean)
        return (z * self.latent_scale - LATENT_SHIFT) * LATENT_GAIN

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [0, 1] (not clamped; differentiable)."""
        z = (latents / LATENT_GAIN + LATENT_SHIFT) / self.latent_scale
        x = self.vae.decode(z.to(self.dtype)).sample.float() / IMAGE_GAIN
        return (x + 1) / 2

    # ------------------------------------------------------------------ denoiser

    def sigmas_at(self, t: torch.Tensor) -> torch.Tensor:
        """The Euler scheduler's σ(t) = √((1−ᾱ)/ᾱ) (float32, as it computes them), linearly interpolated
        at fractional timesteps as its ``set_timesteps`` does."""
        ac = self.scheduler.alphas_cumprod.float()
        table = (((1 - ac) / ac) ** 0.5).double()
        t = t.double().cpu().clamp(0, len(table) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(table) - 1)
        w = t - lo.double()
        return ((1 - w) * table[lo] + w * table[hi]).float()

    def alpha_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at timesteps ``t``: the schedule's own at integers, 1 / (1 + σ²) of the interpolated σ between them
        (the Euler scheduler's fractional timesteps)."""
        whole = t == t.round()
        table = self.alphas_cumprod[t.round().long().clamp(0, self.num_train_timesteps - 1)]
        if bool(whole.all()):
            return table
        between = (1 / (1 + self.sigmas_at(t).double() ** 2)).float().to(table.device)
        return torch.where(whole, table, between)

    def noisy_reference(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The reference latents at timesteps ``t`` (per row): (c + σ n) / √(σ² + 1), the scheduler's
        ``add_noise`` then ``scale_model_input``."""
        sigma = self.sigmas_at(t).to(latents.device).view(-1, 1, 1, 1)
        noisy = latents + noise.to(latents) * sigma.to(latents.dtype)
        return (noisy / ((sigma ** 2 + 1) ** 0.5)).to(latents.dtype)

    def model_output(self, noisy: torch.Tensor, t, condition: Zero123PlusCondition, guidance_scale: float,
                     reference_noise: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The guided UNet output (v for the published models) for scaled noisy tiles (N, 4, H, W) at
        timesteps ``t`` (N,) or scalar. ``reference_noise`` (B·N, 4, h, w), B = 2 branches with guidance
        (order [uncond, cond], each N rows), else 1: the reference latents' noise (drawn when not given)."""
        n = len(noisy)
        noisy = noisy.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(n).float()
        branches = [0, 1] if guidance_scale > 1 else [1]
        k = len(branches)
        ctx = condition.embeddings[branches].to(self.dtype).repeat_interleave(n, dim=0)
        ref = condition.latents[branches].to(self.dtype).repeat_interleave(n, dim=0)
        tt = t.repeat(k)
        if reference_noise is None:
            reference_noise = torch.randn(ref.shape, generator=generator, dtype=torch.float32)
        ref = self.noisy_reference(ref, tt, reference_noise.to(self.device))
        state = self.reference
        try:
            state.mode = "record"
            self.unet(ref, tt, encoder_hidden_states=ctx)
            state.mode = "attend"
            out = self.unet(noisy.repeat(k, 1, 1, 1), tt, encoder_hidden_states=ctx).sample.float()
        finally:
            state.mode, state.cache = None, {}
        if k == 1:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def to_epsilon(self, output: torch.Tensor, noisy: torch.Tensor, t) -> torch.Tensor:
        """ε from the model's output (v: ε = √ᾱ v + √(1−ᾱ) x_t) at timesteps ``t``."""
        if self.prediction_type == "epsilon":
            return output.float()
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(noisy)).float()
        a = self.alpha_at(t).view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * output.float() + (1 - a).sqrt() * noisy.float()
        if self.prediction_type == "sample":
            return (noisy.float() - a.sqrt() * output.float()) / (1 - a).sqrt()
        raise UserError(f"{self.source}: unknown scheduler prediction_type '{self.prediction_type}'")

    def predict_noise(self, noisy: torch.Tensor, t, condition: Zero123PlusCondition, guidance_scale: float,
                      reference_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """CFG ε̂ (float32) for scaled noisy tiles (N, 4, H, W) at timesteps ``t``."""
        out = self.model_output(noisy, t, condition, guidance_scale, reference_noise)
        return self.to_epsilon(out, noisy.to(self.device), t)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, condition: Zero123PlusCondition, steps: int = 28, guidance_scale: float = 4.0,
               generator: Optional[torch.Generator] = None, init: Optional[torch.Tensor] = None,
               strength: float = 1.0, tile_hw: Optional[tuple] = None) -> torch.Tensor:
        """One tile sampled with the Euler ancestral scheduler, ``trailing`` timesteps (the reference's
        recommended use); SDEdit from ``init`` (1, 3, H, W) tile images in [0, 1] at ``strength``.
        Returns the tile (1, 3, H, W) in [0, 1]."""
        from diffusers import EulerAncestralDiscreteScheduler

        scheduler = EulerAncestralDiscreteScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        s, f = self.image_size, self.latent_factor
        h, w = tile_hw or (ROWS * s // f, COLS * s // f)
        noise = torch.randn((1, 4, h, w), generator=generator, dtype=torch.float32)
        timesteps = scheduler.timesteps
        if init is None:
            latents = noise.to(self.device) * scheduler.init_noise_sigma
        else:
            start = min(int(round(steps * (1 - strength))), steps - 1)
            timesteps = timesteps[start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            clean = self.encode(init.to(self.device), sample=False).float()
            latents = scheduler.add_noise(clean, noise.to(self.device), timesteps[:1])
        for t in timesteps:
            x = scheduler.scale_model_input(latents, t)
            out = self.model_output(x, t, condition, guidance_scale, generator=generator)
            latents = scheduler.step(out.to(latents.dtype), t, latents, generator=generator).prev_sample
        return self.decode(latents.float()).clamp(0, 1)


def processor_size(processor: dict) -> int:
    crop = processor.get("crop_size") if processor.get("do_center_crop", True) else processor.get("size")
    if isinstance(crop, dict):
        return int(crop.get("height", crop.get("shortest_edge", 0)))
    return int(crop)


# ---------------------------------------------------------------------------- loading


def _resolve(path: str, variant: Optional[str]) -> str:
    if os.path.isdir(path):
        return path
    if os.path.lexists(path):
        raise UserError(f"Zero123++ model {path} is not a folder; give the diffusers folder (e.g. a download of "
                        "sudo-ai/zero123plus-v1.2)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        try:
            from huggingface_hub import snapshot_download

            names = [f"{s}.{variant}.{e}" if variant else f"{s}.{e}"
                     for s in ("diffusion_pytorch_model", "model", "pytorch_model") for e in ("safetensors", "bin")]
            return snapshot_download(path, allow_patterns=["*.json", "*.txt"] + [f"*/{n}" for n in names])
        except Exception as e:
            raise UserError(f"'{path}' is not a local folder and could not be downloaded from the Hugging Face hub "
                            f"({type(e).__name__}); download it and pass the folder") from None
    raise UserError(f"Zero123++ model not found: {path} (give a diffusers folder such as a download of "
                    "sudo-ai/zero123plus-v1.2, or its hub id)")


def missing_parts(folder: str) -> list:
    """What of the published layout ``folder`` lacks (folders, configs, weights), as short names."""
    missing = [] if os.path.isfile(os.path.join(folder, "model_index.json")) else ["model_index.json"]
    configs = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
               "vision_encoder": "config.json", "scheduler": "scheduler_config.json",
               "feature_extractor_clip": "preprocessor_config.json",
               "feature_extractor_vae": "preprocessor_config.json"}
    for part in PARTS:
        sub = os.path.join(folder, part)
        if not os.path.isdir(sub):
            missing.append(f"{part}/")
        elif part in configs and not os.path.isfile(os.path.join(sub, configs[part])):
            missing.append(f"{part}/{configs[part]}")
        elif part == "tokenizer" and not (os.path.isfile(os.path.join(sub, "vocab.json"))
                                          or os.path.isfile(os.path.join(sub, "tokenizer.json"))):
            missing.append("tokenizer/vocab.json")
    return missing


def _build(cls, folder: str, variant: Optional[str]):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from lift3d.utils.inputs import read_json_object
    from lift3d.zero123.folder import _read_weights
    from lift3d.zero123.model import _materialize

    missing = missing_parts(folder)
    if missing:
        raise UserError(f"{folder} is not a Zero123++ model folder: it lacks {', '.join(missing)} (the layout of "
                        "sudo-ai/zero123plus-v1.2: model_index.json, " + ", ".join(f"{p}/" for p in PARTS) + ")")

    def config(part, name="config.json"):
        return read_json_object(os.path.join(folder, part, name), f"{part} config",
                                "the model folder is damaged: re-download it")

    def weights(part, stems):
        return _read_weights(os.path.join(folder, part), stems, variant)

    def plain(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    index = read_json_object(os.path.join(folder, "model_index.json"), "model index",
                             "the model folder is damaged: re-download it")
    ramp = index.get("ramping_coefficients")
    try:
        unet = _materialize(lambda: UNet2DConditionModel.from_config(config("unet")),
                            weights("unet", ("diffusion_pytorch_model",)), f"{folder}: unet")
        vae = _materialize(lambda: AutoencoderKL.from_config(config("vae")),
                           weights("vae", ("diffusion_pytorch_model",)), f"{folder}: vae")
        text_cfg = config("text_encoder")
        text_cfg = text_cfg.get("text_config", text_cfg)
        text = _materialize(lambda: CLIPTextModel(CLIPTextConfig(**plain(text_cfg))),
                            weights("text_encoder", ("model", "pytorch_model")), f"{folder}: text_encoder")
        vision_cfg = config("vision_encoder")
        vision_cfg = vision_cfg.get("vision_config", vision_cfg)
        vision = _materialize(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**plain(vision_cfg))),
                              weights("vision_encoder", ("model", "pytorch_model")), f"{folder}: vision_encoder")
        scheduler = EulerAncestralDiscreteScheduler.from_config(config("scheduler", "scheduler_config.json"))
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"{folder}: invalid component: {str(e).strip().splitlines()[-1].strip()}") from None

    # The fixed parts must fit together: ramp per prompt token, CLIP embedding = UNet context width.
    d_ctx = unet.config.cross_attention_dim
    if vision.config.projection_dim != d_ctx or text.config.hidden_size != d_ctx:
        raise UserError(f"{folder}: the UNet's context is {d_ctx} wide, the text encoder gives "
                        f"{text.config.hidden_size} and the vision encoder {vision.config.projection_dim}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise UserError(f"{folder}: the UNet takes {unet.config.in_channels} channels, the VAE's latents have "
                        f"{vae.config.latent_channels}: not a Zero123++ UNet")
    length = int(tokenizer.model_max_length)
    if not isinstance(ramp, list) or len(ramp) != length:
        raise UserError(f"{folder}/model_index.json: ramping_coefficients must list {length} numbers (one per "
                        f"prompt token), found {len(ramp) if isinstance(ramp, list) else 'none'}")
    with torch.no_grad():
        tokens = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask if getattr(text.config, "use_attention_mask", False) else None
        prompt = text(tokens.input_ids, attention_mask=mask)[0]
    del text
    return cls(unet, vae, vision, scheduler, prompt, torch.tensor(ramp, dtype=torch.float32),
               config("feature_extractor_vae", "preprocessor_config.json"),
               config("feature_extractor_clip", "preprocessor_config.json"))
