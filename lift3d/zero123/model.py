"""The Zero123 model: a Stable-Diffusion UNet with 8 input channels conditioned on one image and
a relative camera pose, plus its VAE, CLIP image encoder, camera projection and noise schedule.

Conditioning follows the original (cvlab-columbia/zero123, ldm ``LatentDiffusion`` with
``conditioning_key: hybrid``):
- cross-attention context: ``projection(cat(clip_image_embedding, pose))``, one token (B, 1, D);
- channel concat: the condition image's VAE latent **unscaled** (``latent_dist.mode()``);
- classifier-free guidance: the unconditional half has a zero context token (zeros *after* the
  projection) and a zero concat latent; the batch order is [uncond, cond];
- CLIP preprocessing: bicubic resize with ``align_corners=True`` from [-1, 1], then CLIP mean/std.

Images are (B, 3, H, W); ``*_01`` arguments are in [0, 1] composited on white. Latents fed to the
UNet ("scaled") are VAE latents times ``latent_scale`` (0.18215). Images entering the VAE or CLIP are
made contiguous first: a channels-last view changes CPU float32 GroupNorm results by ~1e-3.

Loading follows diffusers: :mod:`lift3d.zero123.loading` reads any source into *parts* (configs and
state dicts, no modules) and :meth:`Zero123Model.from_parts` assembles the model from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.errors import UserError
from lift3d.utils.latent_model import ScaledVAEMixin
from lift3d.zero123 import folder, loading

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "timestep_spacing": "leading"}  # Zero123's DDIM schedule


@dataclass
class Zero123Condition:
    """The encoded condition image: CLIP embedding (B, 1, D) and unscaled VAE latent (B, 4, h, w)."""

    embedding: torch.Tensor
    latent: torch.Tensor


class Zero123Model(ScaledVAEMixin, nn.Module):
    def __init__(self, unet, vae, image_encoder, projection: nn.Linear, scheduler):
        super().__init__()
        self.unet, self.vae, self.image_encoder, self.projection = unet, vae, image_encoder, projection
        self.scheduler = scheduler  # a diffusers DDIMScheduler: not a module, holds no weights
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None, variant: Optional[str] = None,
                        use_ema: bool = True, ldm_config: Optional[str] = None) -> "Zero123Model":
        """Load a kxic or bennyguo/ashawkey diffusers folder, an original ``.ckpt`` (``ldm_config``:
        its ldm YAML, default: found next to it) or a hub id."""
        parts = loading.read_parts(path, variant=variant, use_ema=use_ema, ldm_config=ldm_config)
        return cls.from_parts(parts, torch_dtype or torch.float32, source=os.path.expanduser(str(path)))

    @classmethod
    def from_parts(cls, parts: dict, dtype: torch.dtype = torch.float32, source: str = "<parts>") -> "Zero123Model":
        """Assemble the model from loaded parts (see :mod:`lift3d.zero123.folder`). Modules are
        created on the meta device and take the loaded tensors directly, so a 3 GB UNet is neither
        randomly initialised nor held twice."""
        return _build(cls, parts, dtype, source)

    def save_pretrained(self, out_dir: str) -> None:
        """Write a diffusers folder in the kxic layout (``cc_projection/``), safetensors weights."""
        folder.write_folder(self, out_dir)

    # ------------------------------------------------------------------ properties
    # latent_scale, alphas_cumprod, num_train_timesteps, encode, decode: ScaledVAEMixin

    @property
    def dtype(self) -> torch.dtype:
        return self.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    @property
    def image_size(self) -> int:
        """Side of the images the model was trained on (256 for Zero123)."""
        return int(self.vae.config.sample_size)

    # ------------------------------------------------------------------ encoders

    def clip_preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> CLIP input, exactly as ldm's FrozenCLIPImageEmbedder (kornia resize,
        bicubic, align_corners=True, no antialias)."""
        size = int(self.image_encoder.config.image_size)
        x = F.interpolate(images.contiguous(), size=(size, size), mode="bicubic", align_corners=True)
        x = (x + 1) / 2
        mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_condition(self, images_01: torch.Tensor) -> Zero123Condition:
        """Encode condition images (B, 3, H, W) in [0, 1] (H = W = ``image_size`` as trained)."""
        x = (images_01.contiguous() * 2 - 1).to(self.device, self.dtype)
        embedding = self.image_encoder(pixel_values=self.clip_preprocess(x)).image_embeds[:, None]
        latent = self.vae.encode(x).latent_dist.mode()  # unscaled, as the original
        return Zero123Condition(embedding, latent)

    # ------------------------------------------------------------------ denoiser

    def context(self, condition: Zero123Condition, pose: torch.Tensor) -> torch.Tensor:
        """Cross-attention token (B, 1, D) for relative poses (B, 4) = projection(clip ⊕ pose)."""
        embedding = condition.embedding.expand(len(pose), -1, -1)
        return self.context_tokens(embedding, pose[:, None])

    def context_tokens(self, embeddings: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        """One token per condition image: projection(clip ⊕ pose) for embeddings (B, K, D) and
        poses (B, K, 4) -> (B, K, D). K = 1 for Zero123; Cascade-Zero123's refiner uses several."""
        embeddings = embeddings.to(self.device, self.dtype)
        return self.projection(torch.cat([embeddings, poses.to(embeddings)], dim=-1))

    def cfg_batch(self, noisy: torch.Tensor, condition: Zero123Condition, pose: torch.Tensor):
        """UNet inputs for classifier-free guidance, order [uncond, cond]:
        (2B, 8, h, w) noisy latents ⊕ concat latent, and (2B, 1, D) contexts."""
        cond_ctx = self.context(condition, pose)
        return self.guidance_batch(noisy, condition.latent, cond_ctx, torch.zeros_like(cond_ctx))

    def guidance_batch(self, noisy: torch.Tensor, concat_latent: torch.Tensor, context: torch.Tensor,
                       uncond_context: torch.Tensor):
        """[uncond, cond] UNet inputs for any context: the unconditional half gets ``uncond_context``
        and a zero concat latent."""
        concat = concat_latent.to(noisy.dtype).expand(len(noisy), -1, -1, -1)
        latents = torch.cat([noisy, noisy])
        concat = torch.cat([torch.zeros_like(concat), concat])
        return torch.cat([latents, concat], dim=1), torch.cat([uncond_context, context])

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, condition: Zero123Condition,
                      pose: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """CFG noise prediction ε_u + s (ε_c − ε_u) for scaled noisy latents (B, 4, h, w) at
        timesteps ``t`` (B,) or scalar. Returns float32."""
        noisy = noisy.to(self.device, self.dtype)
        return self.guided_noise(noisy, t, *self.cfg_batch(noisy, condition, pose), guidance_scale)

    def conditional_noise(self, noisy: torch.Tensor, t: torch.Tensor, condition: Zero123Condition,
                          pose: torch.Tensor) -> torch.Tensor:
        """The conditional branch alone, ε_c (one UNet pass, no CFG; differentiable w.r.t. trainable
        adapters on the UNet, e.g. VSD's LoRA). Returns float32."""
        noisy = noisy.to(self.device, self.dtype)
        concat = condition.latent.to(noisy.dtype).expand(len(noisy), -1, -1, -1)
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(noisy))
        ctx = self.context(condition, pose)
        return self.unet(torch.cat([noisy, concat], dim=1), t, encoder_hidden_states=ctx).sample.float()

    def guided_noise(self, noisy: torch.Tensor, t, unet_in: torch.Tensor, ctx: torch.Tensor,
                     guidance_scale: float) -> torch.Tensor:
        """Run the UNet on a [uncond, cond] batch from :meth:`guidance_batch` and combine."""
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(noisy))
        eps = self.unet(unet_in, torch.cat([t, t]), encoder_hidden_states=ctx).sample.float()
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------- assembling


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


def _build(cls, parts: dict, dtype: torch.dtype, source: str):
    """:meth:`Zero123Model.from_parts`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

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
    model = cls(unet, vae, clip, projection, scheduler).to(dtype)
    model.source = source
    return model
