"""``eschernet``: EscherNet (kxhit/EscherNet) as a view-conditioned prior, 4-DoF or 6-DoF.

Every reference view (one photo or several, ``lift3d.data.reference.reference_list``; the first is the
primary one) conditions the model with its camera; any number of guidance views are denoised together
as EscherNet's target views, attending each other (``views_per_pass`` of them per UNet pass). It serves
SDS, SJC and VSD (``guidance_type: score-distillation``, ``prior_type: eschernet``) and generate-then-
reconstruct (``guidance_type: multiview``: all ring views generated jointly). The distillation methods draw
a timestep per view; EscherNet was trained with one per object, and the views of a pass still attend each
other at their own noise levels.

Cameras. lift3d's world is z-up and its cameras look at the origin from (elevation, azimuth, distance)
with OpenGL/Blender axes (``c2w``: -z forward, +y up), which is the frame EscherNet's training renders
used (Blender, z up, ``track_to -Z, up Y``). A camera maps to EscherNet's pose as
- 6-DoF: its world-to-camera matrix ``inv(c2w)``, with the translation in EscherNet's units;
- 4-DoF: ``(θ, φ, ρ, 0)`` with polar angle θ = 90° − elevation, azimuth φ = lift3d's azimuth (radians;
  atan2(y, x) of the position), ρ = π (ln r − ln 1.5) / (ln 2.2 − ln 1.5), r clamped to [1.5, 2.2]
  (``dataset.get_pose`` of the reference code).
EscherNet's units: its training cameras were 1.5 to 2.2 from an object inside the unit cube. lift3d's
distances are multiplied by ``reference_radius / d_primary`` (d_primary: the primary reference's
distance), so the primary reference sits ``reference_radius`` from the object; ``reference_radius: 0``
uses lift3d's distances as they are. Only relative poses reach the attention (4-DoF: differences of the
vectors; 6-DoF: ``P_key P_query⁻¹``), so the choice of azimuth origin does not matter, the scale does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lift3d.cameras import Cameras
from lift3d.config import domain
from lift3d.errors import ConfigError, UserError
from lift3d.priors.latent import DTYPES, LatentDiffusionPrior, check_choice
from lift3d.registry import register
from lift3d.utils.images import resize

VARIANTS = ("auto", "4dof", "6dof")
TRAINED_SIZE = 256          # EscherNet's images (32x32 latents)


def escher_poses(cameras: Cameras, variant: str, scale: float) -> torch.Tensor:
    """EscherNet poses of ``cameras`` (B, 4) for 4-DoF or (B, 4, 4) for 6-DoF (float64), lift3d's
    distances multiplied by ``scale`` (see the module docstring)."""
    from lift3d.eschernet.cape import pose_4dof, pose_6dof

    c2w = cameras.c2w.double().clone()
    c2w[:, :3, 3] *= scale
    return pose_4dof(c2w[:, :3, 3]) if variant == "4dof" else pose_6dof(c2w)


@register("eschernet", "prior")
class EscherNetPrior(LatentDiffusionPrior):
    @dataclass
    class Config:
        pretrained_model_name_or_path: str = ""   # a folder in the kxic/eschernet-4dof|6dof layout, or a hub id
        variant: str = "auto"                     # auto (from the path: 4dof/6dof) | 4dof | 6dof
        dtype: str = "float32"                    # float32 | float16 (float16 only on CUDA)
        image_size: int = domain(0, ge=0)         # 0: 256 as trained, or the VAE's sample size when smaller
        reference_radius: float = domain(1.5, ge=0)  # EscherNet distance of the primary reference; 0: unscaled
        # Target views per UNet pass: they attend each other (joint self-attention, activations grow with
        # the square of the count at the top level). 0: the whole batch in one pass.
        views_per_pass: int = domain(0, ge=0)

    def __init__(self, cfg: Any = None, path: str = "system.guidance.prior"):
        super().__init__(cfg, path)
        check_choice(path, "variant", self.cfg.variant, VARIANTS)
        check_choice(path, "dtype", self.cfg.dtype, tuple(DTYPES))
        if self.cfg.views_per_pass < 0 or self.cfg.image_size < 0 or self.cfg.reference_radius < 0:
            raise ConfigError(f"{path}.views_per_pass, image_size and reference_radius must be >= 0")
        self.model = None

    # ------------------------------------------------------------------ set-up

    def model_path(self) -> str:
        if not self.cfg.pretrained_model_name_or_path:
            raise UserError("no EscherNet model given: set system.guidance.prior.pretrained_model_name_or_path=PATH "
                            "(a folder in the kxic/eschernet-4dof or -6dof layout, or that hub id)")
        return self.cfg.pretrained_model_name_or_path

    def prepare(self, reference, context) -> None:
        from lift3d.eschernet.model import EscherNetModel

        self.context = context
        device = torch.device(context.device)
        self.model = EscherNetModel.from_pretrained(self.model_path(), self.cfg.variant,
                                                    self.load_dtype(device)).to(device)
        self.set_reference(reference)

    def reference_image(self, view) -> torch.Tensor:
        """A reference view composited on white at the model's resolution, (1, 3, S, S) in [0, 1]: an antialiased
        bilinear resize, as eval_eschernet.py's ``transforms.Resize`` of the PIL image."""
        image = view.rgb.permute(2, 0, 1)[None].float().contiguous()
        return resize(image, self.image_size, mode="bilinear", antialias=True).clamp(0, 1)

    def set_reference(self, reference) -> None:
        """Encode all reference views (one or a list; the first is the primary one) with their cameras."""
        from lift3d.data.reference import reference_list

        views = reference_list(reference)
        images = torch.cat([self.reference_image(v) for v in views]).to(self.model.device)
        self.condition = self.model.encode_references(images)
        self.reference_cameras = Cameras.cat([v.camera.to("cpu") for v in views])
        primary = float(self.reference_cameras[0:1].distance[0])
        self.scale = self.cfg.reference_radius / primary if self.cfg.reference_radius > 0 else 1.0
        self.reference_poses = escher_poses(self.reference_cameras, self.model.variant, self.scale)

    def poses(self, cameras: Cameras) -> torch.Tensor:
        return escher_poses(cameras.to("cpu"), self.model.variant, self.scale)

    # ------------------------------------------------------------------ the model

    @property
    def image_size(self) -> int:
        if self.cfg.image_size:
            return self.cfg.image_size
        vae = self.model.vae.config.sample_size if self.model is not None else \
            self.part_config("vae").get("sample_size")
        return min(TRAINED_SIZE, int(vae or TRAINED_SIZE))

    def predict_noise(self, noisy, t, cameras, guidance_scale, render=None) -> torch.Tensor:
        """CFG ε̂ of the views, ``views_per_pass`` target views denoised together per UNet pass."""
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(len(noisy))
        n = self.cfg.views_per_pass or len(noisy)
        poses = self.poses(cameras)
        return torch.cat([self.model.predict_noise(noisy[i:i + n], t[i:i + n], self.condition, poses[i:i + n],
                                                   self.reference_poses, guidance_scale).to(noisy.device)
                          for i in range(0, len(noisy), n)])

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.model.unet

    def conditional_noise(self, noisy, t, cameras, drop_pose=None) -> torch.Tensor:
        """ε of the conditional branch (no CFG), the views denoised together (method vsd). Views whose
        ``drop_pose`` is set are denoised together without the condition: EscherNet's unconditional branch
        (zero reference tokens, cameras kept), as it was trained to drop its condition."""
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(len(noisy))
        poses = self.poses(cameras)
        drop = torch.zeros(len(noisy), dtype=torch.bool) if drop_pose is None else drop_pose.reshape(-1).cpu().bool()
        out = torch.zeros(noisy.shape, dtype=torch.float32, device=noisy.device)
        for mask, context in ((~drop, self.condition), (drop, torch.zeros_like(self.condition))):
            if mask.any():
                idx = mask.nonzero().flatten()
                eps = self.model.conditional_noise(noisy[idx.to(noisy.device)], t[idx.to(t.device)], context,
                                                   poses[idx], self.reference_poses)
                out = out.index_put((idx.to(noisy.device),), eps.to(noisy.device))
        return out

    @torch.no_grad()
    def generate(self, cameras: Cameras, seeds, steps: int = 50, guidance_scale: float = 3.0, eta: float = 1.0,
                 init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
        """Novel views (B, 3, S, S) in [0, 1] at ``cameras``, generated together as EscherNet's target views
        (``views_per_pass`` per DDIM run; the initial noise and DDIM's of each run drawn from the seed of
        its first view). With ``init`` images, SDEdit from them at ``strength``."""
        from lift3d.zero123.sampling import ddim

        s = self.image_size // self.latent_factor
        poses, n, out = self.poses(cameras), self.cfg.views_per_pass or len(cameras), []
        for i in range(0, len(cameras), n):
            p = poses[i:i + n]
            eps = lambda x, t, p=p: self.model.predict_noise(  # noqa: E731
                x, t, self.condition, p, self.reference_poses, guidance_scale)
            start = None if init is None else init[i:i + n]
            out.append(ddim(self.model, eps, len(p), (s, s), steps, eta, torch.Generator().manual_seed(int(seeds[i])),
                            init=start, strength=strength).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ memory, before loading

    def part_config(self, part: str) -> dict:
        """``part``/config.json of a local model folder without loading it; the published shapes otherwise."""
        from lift3d.eschernet.folder import folder_config
        from lift3d.preflight import SD_CONFIGS

        found = folder_config(self.cfg.pretrained_model_name_or_path, part) \
            if self.cfg.pretrained_model_name_or_path else None
        return found or SD_CONFIGS[part]

    def memory_estimate(self, plan) -> dict:
        """The weights, and a UNet pass on ``views_per_pass`` guidance views (both CFG halves; the joint
        attention's scores at the top level grow with the square of the views), plus the decoder with
        gradients when a latent reference render is decoded (lift3d/preflight.py's measured rates)."""
        from lift3d.preflight import GIB, unet_gib, weights_gib

        vae, unet = self.part_config("vae"), self.part_config("unet")
        f = self.latent_factor
        heads = unet.get("attention_head_dim", 8)
        heads = max(heads) if isinstance(heads, (list, tuple)) else int(heads)
        worst = 0.0
        for views, h, w in plan.renders("guidance"):
            latent = h * w if plan.latent_field else (min(TRAINED_SIZE, int(vae.get("sample_size", 256))) // f) ** 2
            n = min(views, self.cfg.views_per_pass or views)
            scores = 2 * heads * (n * latent) ** 2 * 4 / GIB   # fp32 scores of the top self-attention, CFG pair
            worst = max(worst, unet_gib(unet, n, latent) + scores)
        path = self.cfg.pretrained_model_name_or_path
        parts = {"model": (weights_gib(path) if path else 0.0, None),
                 "unet": (worst, f"system.guidance.prior.views_per_pass (now {self.cfg.views_per_pass})")}
        if plan.latent_field:
            parts["vae"] = self.reference_decoder_estimate(plan, vae)
        return parts
