"""Novel views from a Zero123 model by DDIM: used for the trainer's sample grids and the NVS benchmark."""

from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def ddim_views(model, cond_01: torch.Tensor, poses: torch.Tensor, steps: int = 50, guidance_scale: float = 3.0,
               eta: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Views (B, 3, H, W) in [0, 1] of condition images ``cond_01`` (B, 3, H, W) at relative poses (B, 4)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    condition = model.encode_condition(cond_01)
    h, w = condition.latent.shape[-2:]
    x = torch.randn(len(cond_01), condition.latent.shape[1], h, w, generator=generator).to(model.device, model.dtype)
    for t in scheduler.timesteps:
        eps = model.predict_noise(x, t, condition, poses, guidance_scale)
        x = scheduler.step(eps.to(x.dtype), t, x, eta=eta, generator=generator).prev_sample
    return model.decode(x).clamp(0, 1)
