"""DDIM sampling with a Zero123-family model, and the relative pose of a view given as offsets.

Views are given relative to the input image: ``elevation`` degrees up (the Zero123 demo's
polar-angle slider with the opposite sign: Δpolar = −elevation), ``azimuth`` degrees from +x towards
+y (camera moving counter-clockwise seen from above), ``radius`` change of camera distance. DDIM
defaults are the demo's (50 steps, CFG 3.0, η = 1.0); ldm's uniform DDIM steps are diffusers'
"leading" spacing with ``steps_offset=1`` (t = 1, 21, ..., 981 for 50 steps).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def relative_pose(elevation: float, azimuth: float, radius: float = 0.0, n: int = 1, stable: bool = False,
                  condition_elevation: float = 0.0) -> torch.Tensor:
    """Zero123 pose vectors (n, 4) for a view ``elevation``/``azimuth`` degrees and ``radius`` away
    from the input view. Stable-Zero123 puts the input view's polar angle in the last slot."""
    d_polar, d_az = math.radians(-elevation), math.radians(azimuth)
    last = math.radians(90.0 - condition_elevation) if stable else radius
    return torch.tensor([[d_polar, math.sin(d_az), math.cos(d_az), last]] * n)


@torch.no_grad()
def sample(model, condition, pose: torch.Tensor, steps: int = 50, scale: float = 3.0, eta: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDIM samples for ``pose`` (B, 4): images (B, 3, H, W) in [0, 1]."""
    return ddim(model, lambda x, t: model.predict_noise(x, t, condition, pose, scale), len(pose),
                tuple(condition.latent.shape[-2:]), steps, eta, generator)


@torch.no_grad()
def ddim(model, eps_fn, n: int, latent_hw: tuple, steps: int = 50, eta: float = 1.0,
         generator: Optional[torch.Generator] = None, init: Optional[torch.Tensor] = None,
         strength: float = 1.0) -> torch.Tensor:
    """DDIM with any noise predictor ``eps_fn(latents, t)`` (Zero123's or Cascade's); decodes with
    ``model``'s VAE. Returns (n, 3, H, W) in [0, 1]. With ``init`` (n, 3, H, W) images in [0, 1], SDEdit:
    their latents noised to the ``strength`` share of the schedule and denoised from there."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = torch.randn((n, 4, *latent_hw), generator=generator).to(model.device, model.dtype)
    timesteps = scheduler.timesteps
    if init is None:
        latents = latents * scheduler.init_noise_sigma
    else:
        timesteps = timesteps[min(int(round(steps * (1 - strength))), steps - 1):]
        clean = model.encode(init.to(model.device, model.dtype), sample=False)
        latents = scheduler.add_noise(clean, latents, timesteps[:1])
    for t in timesteps:
        eps = eps_fn(latents, t)
        latents = scheduler.step(eps.to(latents.dtype), t, latents, eta=eta, generator=generator).prev_sample
    return model.decode(latents).clamp(0, 1)
