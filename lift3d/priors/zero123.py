"""``zero123``: Zero-1-to-3 and Stable-Zero123 as a view-conditioned prior.

The model (``pretrained_model_name_or_path``: a kxic or bennyguo/ashawkey diffusers folder, an
original ``.ckpt`` or a hub id; empty: the bundled ``lift3d/assets/zero123-mini``) is loaded in
``prepare``. The reference view, composited on white at the model's resolution, is its condition; a
guidance view's relative pose is Zero123's 4-vector (``pose_variant: zero123``) or Stable-Zero123's
(``stable``: the condition's polar angle in the last slot).

With several photos (``prepare`` given a list of reference views) each guidance view is conditioned on the
photo whose camera looks from the nearest direction (:func:`lift3d.data.reference.nearest_reference`): its
relative pose is taken against that photo's camera and the UNet pass batches each view's own condition
(:meth:`Zero123Prior.condition_for`, :meth:`Zero123Prior.poses`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lift3d.cameras import Cameras, zero123_pose
from lift3d.config import domain
from lift3d.data.reference import nearest_reference, reference_list
from lift3d.errors import ConfigError, UserError
from lift3d.priors.latent import DTYPES, LatentDiffusionPrior, check_choice  # noqa: F401 (re-exported)
from lift3d.registry import register
from lift3d.utils.images import resize

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUNDLED_MODEL = os.path.join(ASSETS, "zero123-mini")


def resolve_model_path(path: str) -> str:
    """The user's model path, or the bundled small model when none is given."""
    if path:
        return path
    if os.path.isdir(BUNDLED_MODEL):
        return BUNDLED_MODEL
    raise UserError("no Zero123 model given and the bundled lift3d/assets/zero123-mini is not installed; set "
                    "system.guidance.pretrained_model_name_or_path=PATH (a diffusers folder or an original .ckpt)")


@register("zero123", "prior")
class Zero123Prior(LatentDiffusionPrior):
    @dataclass
    class Config:
        pretrained_model_name_or_path: str = ""   # empty: the bundled lift3d/assets/zero123-mini
        variant: Optional[str] = None          # weight-file variant of a diffusers folder, e.g. "fp16"
        use_ema: bool = True                   # .ckpt: use its EMA weights when present
        dtype: str = "float32"                 # float32 | float16 (float16 only on CUDA)
        pose_variant: str = "zero123"          # zero123 | stable (Stable-Zero123: condition polar angle in slot 4)
        # Views per UNet pass (each a CFG pair): the pass's activations grow with it (~0.1 GiB a view at
        # 32^2 latents on the full model). 0: the whole batch in one pass.
        unet_chunk: int = domain(4, ge=0)

    def __init__(self, cfg: Any = None, path: str = "system.guidance.prior"):
        super().__init__(cfg, path)
        check_choice(path, "pose_variant", self.cfg.pose_variant, ("zero123", "stable"))
        check_choice(path, "dtype", self.cfg.dtype, tuple(DTYPES))
        if self.cfg.unet_chunk < 0:
            raise ConfigError(f"{path}.unet_chunk must be 0 (one pass) or a number of views, got {self.cfg.unet_chunk}")
        self.model = None

    # ------------------------------------------------------------------ set-up

    def load_model(self, path: str, device: torch.device):
        from lift3d.zero123.model import Zero123Model

        return Zero123Model.from_pretrained(path, torch_dtype=self.load_dtype(device), variant=self.cfg.variant,
                                            use_ema=self.cfg.use_ema).to(device)

    def prepare(self, reference, context) -> None:
        self.context = context
        self.model = self.load_model(resolve_model_path(self.cfg.pretrained_model_name_or_path),
                                     torch.device(context.device))
        self.set_reference(reference)

    def reference_image(self, reference) -> torch.Tensor:
        """The reference view composited on white at the model's resolution, (1, 3, S, S) in [0, 1]."""
        image = reference.rgb.permute(2, 0, 1)[None].float().contiguous()  # not a channels-last view (GroupNorm)
        return resize(image, self.image_size, mode="bicubic", antialias=True).clamp(0, 1)

    def set_reference(self, reference) -> None:
        """Encode the reference view, or each of several (a list: the primary first)."""
        views = reference_list(reference)
        self.condition = self.model.encode_condition(self.reference_image(views[0]).to(self.model.device))
        self.reference_camera = views[0].camera
        self.reference_cameras = Cameras.cat([v.camera.with_size(1, 1) for v in views])
        self.conditions = self.condition
        if len(views) > 1:
            from lift3d.zero123.model import Zero123Condition

            others = [self.model.encode_condition(self.reference_image(v).to(self.model.device)) for v in views[1:]]
            self.conditions = Zero123Condition(torch.cat([self.condition.embedding] + [c.embedding for c in others]),
                                               torch.cat([self.condition.latent] + [c.latent for c in others]))

    def nearest(self, cameras: Cameras) -> Optional[torch.Tensor]:
        """Each view's photo (B,): the one whose camera looks from the nearest direction; None with one photo."""
        if len(self.reference_cameras) == 1:
            return None
        return nearest_reference(cameras, self.reference_cameras)

    def condition_for(self, cameras: Cameras):
        """The encoded condition of each view (its nearest photo's), batched; the photo's with one photo."""
        pick = self.nearest(cameras)
        if pick is None:
            return self.condition
        from lift3d.zero123.model import Zero123Condition

        pick = pick.to(self.conditions.embedding.device)
        return Zero123Condition(self.conditions.embedding[pick], self.conditions.latent[pick])

    # ------------------------------------------------------------------ the model

    @property
    def image_size(self) -> int:
        return self.model.image_size

    # ------------------------------------------------------------------ memory, before loading

    def weight_paths(self) -> list:
        return [resolve_model_path(self.cfg.pretrained_model_name_or_path)]

    def part_config(self, part: str) -> dict:
        """``vae`` or ``unet`` config.json of a diffusers folder, without loading it; Stable Diffusion's
        (all published Zero123 models') for a .ckpt or a hub id."""
        from lift3d.preflight import SD_CONFIGS

        from lift3d.utils.inputs import read_json_object

        folder = os.path.expanduser(self.weight_paths()[0])
        path = os.path.join(folder, part, "config.json")
        if os.path.isdir(folder) and os.path.lexists(path):
            return read_json_object(path, f"{part} config", f"the model folder {folder} is damaged: re-download or "
                                    "re-convert it", keys=("block_out_channels",))
        return SD_CONFIGS[part]

    def memory_estimate(self, plan) -> dict:
        """The weights, the UNet pass on ``unet_chunk`` guidance views (both CFG halves), and the decoder
        with gradients when a latent reference render is decoded (lift3d/preflight.py: the measured rates)."""
        from lift3d.preflight import unet_gib, weights_gib

        vae, unet = self.part_config("vae"), self.part_config("unet")
        f = self.latent_factor
        worst = 0.0
        for views, h, w in plan.renders("guidance"):
            latent = h * w if plan.latent_field else (int(vae.get("sample_size", 256)) // f) ** 2
            worst = max(worst, unet_gib(unet, min(views, self.cfg.unet_chunk or views), latent))
        parts = {"model": (sum(weights_gib(p, self.cfg.variant) for p in self.weight_paths()), None),
                 "unet": (worst, f"system.guidance.unet_chunk (now {self.cfg.unet_chunk})")}
        if plan.latent_field:
            parts["vae"] = self.reference_decoder_estimate(plan, vae)
        return parts

    def poses(self, cameras: Cameras) -> torch.Tensor:
        """Zero123 relative pose (B, 4) of each guidance view w.r.t. the reference view (with several photos,
        w.r.t. its nearest photo's camera)."""
        stable = self.cfg.pose_variant == "stable"
        pick = self.nearest(cameras)
        condition = self.reference_camera if pick is None else self.reference_cameras[pick.cpu()]
        return zero123_pose(cameras, condition.to(cameras.device), stable=stable)

    def predict_noise(self, noisy, t, cameras, guidance_scale, render=None) -> torch.Tensor:
        """CFG ε̂ of the views, ``unet_chunk`` views per UNet pass (the same ε̂ as one pass)."""
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(len(noisy))
        n = self.cfg.unet_chunk or len(noisy)
        return torch.cat([self.noise_chunk(noisy[i:i + n], t[i:i + n], cameras[i:i + n], guidance_scale,
                                           _views(render, i, i + n, len(noisy)))
                          for i in range(0, len(noisy), n)])

    def noise_chunk(self, noisy, t, cameras, guidance_scale, render) -> torch.Tensor:
        """One UNet pass: :meth:`predict_noise` for a few views."""
        return self.model.predict_noise(noisy, t, self.condition_for(cameras), self.poses(cameras), guidance_scale)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.model.unet

    def conditional_noise(self, noisy, t, cameras, drop_pose=None) -> torch.Tensor:
        """ε_c of the views (one UNet pass, no CFG). A dropped camera is a zero pose vector before the
        projection: the CLIP embedding stays, so the model still sees the object, from no stated view.
        Without gradients ``unet_chunk`` views a pass, as :meth:`predict_noise`."""
        pose = self.poses(cameras)
        if drop_pose is not None:
            pose = pose.masked_fill(drop_pose.to(pose.device).reshape(-1, 1), 0.0)
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(len(noisy))
        n = len(noisy) if torch.is_grad_enabled() else (self.cfg.unet_chunk or len(noisy))
        parts = [slice(i, i + n) for i in range(0, len(noisy), n)]
        return torch.cat([self.model.conditional_noise(noisy[s], t[s], self.condition_for(cameras[s]), pose[s])
                          for s in parts])

    @torch.no_grad()
    def generate(self, cameras: Cameras, seeds, steps: int = 50, guidance_scale: float = 3.0, eta: float = 1.0,
                 init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
        """Novel views (B, 3, S, S) in [0, 1] of the reference at ``cameras``, one DDIM run per view with its
        own seed: view i equals ``lift3d nvs --seed seeds[i] --n-samples 1`` at its relative pose. With
        ``init`` (B, 3, S, S) images, SDEdit from them at ``strength``."""
        from lift3d.zero123.sampling import ddim

        latent_hw = tuple(self.condition.latent.shape[-2:])
        poses, out = self.poses(cameras), []
        for i, seed in enumerate(seeds):
            c = self.condition_for(cameras[i:i + 1])
            eps = lambda x, t, p=poses[i:i + 1], c=c: self.model.predict_noise(x, t, c, p, guidance_scale)  # noqa: E731
            start = None if init is None else init[i:i + 1]
            out.append(ddim(self.model, eps, 1, latent_hw, steps, eta, torch.Generator().manual_seed(int(seed)),
                            init=start, strength=strength).float().cpu())
        return torch.cat(out)


def _views(render: Optional[dict], start: int, stop: int, batch: int) -> Optional[dict]:
    """The render's per-view tensors for views start..stop-1 (other entries as they are)."""
    if render is None:
        return None
    return {k: v[start:stop] if torch.is_tensor(v) and v.dim() and len(v) == batch else v for k, v in render.items()}
