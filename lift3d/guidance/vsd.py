"""``vsd``: variational score distillation (ProlificDreamer) over a view-conditioned prior.

A LoRA on the prior's own UNet (peft, adapter ``vsd``) models the distribution of the field's current renders.
The one UNet serves both models: with the adapter disabled it is exactly the frozen prior, enabled it is the
LoRA model, so no second copy of the weights is held. The LoRA model is conditioned like the prior (Zero123:
the reference image and the view's relative pose, Stable-Zero123's pose included), on the conditional branch
alone.

Each step, for the renders' latents z (B views):
- t ~ U[t_min, t_max] per view, z_t = sqrt(ᾱ_t) z + sqrt(1 − ᾱ_t) ε;
- ε_prior: the frozen prior with classifier-free guidance (``guidance_scale``); ε_lora: the LoRA model, with
  guidance over its camera condition at ``lora_guidance_scale`` (1: the conditional prediction alone);
- grad = w(t) (ε_prior − ε_lora), w(t) = 1 − ᾱ_t (NaN guard, optional clipping); the guidance applies it as
  SDS's is applied (distillation.py);
- the LoRA loss (``losses`` hook, ``system.loss.lambda_lora``): the standard diffusion loss on the same
  latents, detached, at fresh t ~ U[0, T) (``lora_timesteps`` draws per view), each view's camera dropped
  with probability ``lora_camera_dropout`` (a zero pose vector; threestudio drops the whole batch's at once) so
  that its camera-free branch, which ``lora_guidance_scale`` ≠ 1 uses, is trained too;
  target ε, or v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) z with ``lora_prediction: v_prediction`` (its output is then turned
  into ε for the gradient: ε = sqrt(1 − ᾱ) z_t + sqrt(ᾱ) v).

The LoRA's parameters are the guidance's trainable state (lift3d/plugin.py): optimised at ``lora_lr`` by the
system's optimiser, checkpointed with the field (``guidance_state.*``) and resumed with their optimiser state.
threestudio's ``stable-diffusion-vsd-guidance`` defaults: LoRA rank 4 on every attention projection, its
guidance scale 1.0, camera dropout 0.1, one timestep sample; ``prolificdreamer.yaml`` trains it at 1e-4 with
AdamW (the LoRA here defaults to 1e-3: lift3d's runs are hundreds of steps, not 25 000).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.cameras import Cameras
from lift3d.config import domain
from lift3d.errors import ConfigError, UserError
from lift3d.guidance.method import DistillationMethod
from lift3d.registry import register

ADAPTER = "vsd"
PREDICTIONS = ("epsilon", "v_prediction")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]   # every attention projection, as threestudio's LoRA


class LoraState(nn.Module):
    """The LoRA's parameters under checkpointable names: the very tensors of the prior's UNet, so loading a
    checkpoint into this module loads them into the UNet."""

    def __init__(self, params: dict):
        super().__init__()
        self.weights = nn.ParameterDict({name.replace(".", "-"): p for name, p in params.items()})


@register("vsd", "method")
class VSD(DistillationMethod):
    @dataclass
    class Config(DistillationMethod.Config):
        lora_rank: int = domain(4, ge=1)
        lora_lr: float = domain(1e-3, gt=0)        # the LoRA's learning rate (the field's: system.optimizer.lr)
        lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))  # UNet modules (name endings) with a LoRA
        lora_guidance_scale: float = domain(1.0, ge=0)   # CFG over the LoRA model's camera condition; 1: off
        lora_camera_dropout: float = domain(0.1, ge=0, le=1)
        lora_prediction: str = "epsilon"           # epsilon | v_prediction: what the LoRA model is trained to predict
        lora_timesteps: int = domain(1, ge=1)      # fresh timesteps per view in the LoRA loss
        lora_views: int = domain(0, ge=0)          # views of the step the LoRA trains on (memory); 0: all

    loss_defaults = {"lora": 1.0}

    def __init__(self, cfg: Any = None, path: str = "system.guidance.method"):
        super().__init__(cfg, path)
        self.path = path
        if self.cfg.lora_prediction not in PREDICTIONS:
            raise ConfigError(f"{path}.lora_prediction is '{self.cfg.lora_prediction}'; use one of "
                              f"{', '.join(PREDICTIONS)}")
        if not self.cfg.lora_targets or not all(isinstance(n, str) and n for n in self.cfg.lora_targets):
            raise ConfigError(f"{path}.lora_targets must be a list of module names, got {self.cfg.lora_targets}")
        self.prior = None
        self.state: Optional[LoraState] = None
        self._batch = None   # (latents, cameras) of this step's renders, for the LoRA loss

    # ------------------------------------------------------------------ the LoRA

    def prepare(self, prior, context) -> None:
        """Put the LoRA on the prior's UNet (peft), float32 whatever the UNet's dtype, off by default."""
        try:
            from peft import LoraConfig
        except ImportError:
            raise UserError("method vsd needs peft: pip install peft") from None
        try:
            unet = prior.denoiser
        except NotImplementedError as e:
            raise UserError(str(e)) from None
        c = self.cfg
        config = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_rank, target_modules=list(c.lora_targets),
                            init_lora_weights="gaussian")  # A ~ N(0, 1/r), B = 0: the LoRA model starts as the prior
        # Its own seed, so that adding it leaves the run's random stream where it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(getattr(context, "seed", 0)))
            try:
                if ADAPTER not in (getattr(unet, "peft_config", None) or {}):   # prepared once per loaded prior
                    unet.add_adapter(config, adapter_name=ADAPTER)
            except ValueError as e:   # no module matches lora_targets
                raise UserError(f"{self.path}.lora_targets: {str(e).splitlines()[0]}") from None
        params = {n: p for n, p in unet.named_parameters() if f".{ADAPTER}." in n and "lora_" in n}
        for p in params.values():
            p.data = p.data.float()   # Adam on float16 weights loses small updates; peft casts inputs to them
        self.prior, self.unet, self.lora_params = prior, unet, list(params.values())
        self.state = LoraState(params)
        self._enable(False)

    def _enable(self, on: bool) -> None:
        self.unet.enable_adapters() if on else self.unet.disable_adapters()
        # peft freezes a disabled adapter; the optimiser and a backward pass still to come need them trainable.
        for p in self.lora_params:
            p.requires_grad_(True)

    @contextlib.contextmanager
    def lora(self):
        """The LoRA model inside the block; the frozen prior, exactly, outside it."""
        self._enable(True)
        try:
            yield
        finally:
            self._enable(False)

    def trainable_state(self) -> Optional[nn.Module]:
        return self.state

    def param_groups(self, lr: float) -> list:
        return [{"params": self.lora_params, "lr": self.cfg.lora_lr}] if self.state is not None else []

    def lora_noise(self, prior, noisy: torch.Tensor, t: torch.Tensor, cameras) -> torch.Tensor:
        """ε of the LoRA model (as ε whatever it predicts), with CFG over its camera condition."""
        with self.lora():
            out = prior.conditional_noise(noisy, t, cameras)
            s = self.cfg.lora_guidance_scale
            if s != 1.0:
                free = prior.conditional_noise(noisy, t, cameras, drop_pose=torch.ones(len(noisy), dtype=torch.bool))
                out = free + s * (out - free)
        if self.cfg.lora_prediction == "v_prediction":
            a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
            out = (1 - a).sqrt() * noisy.float() + a.sqrt() * out
        return out

    # ------------------------------------------------------------------ per step

    def __call__(self, prior, z: torch.Tensor, cameras, render: dict, step: int) -> dict:
        if self.state is None:
            raise RuntimeError("method vsd was called before prepare()")
        t_min, t_max = self.step_range(prior, step)
        t = torch.randint(t_min, t_max + 1, (len(z),), device=z.device)
        alpha = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn(z.shape, device=z.device)   # not randn_like: the same draw whatever z's memory layout
        noisy = alpha.sqrt() * z.float() + (1 - alpha).sqrt() * noise
        eps_prior = prior.predict_noise(noisy, t, cameras, self.cfg.guidance_scale, render)
        eps_lora = self.lora_noise(prior, noisy, t, cameras)
        grad = self.finish_grad((1 - alpha) * (eps_prior - eps_lora), step)
        self._batch = (z.detach(), cameras)
        return {"grad": grad, "guidance_grad_norm": grad.norm(), "guidance_t": t.float().mean()}

    def losses(self, ctx) -> dict:
        """The LoRA's diffusion loss on this step's renders (detached: it trains the LoRA only)."""
        if self._batch is None:   # the guidance did not run this step
            return {}
        z, cameras = self._batch
        self._batch = None
        if self.cfg.lora_views:
            z, cameras = z[:self.cfg.lora_views], cameras[:self.cfg.lora_views]
        n = self.cfg.lora_timesteps
        z = z.float().repeat(n, 1, 1, 1)
        cameras = Cameras.cat([cameras] * n) if n > 1 else cameras
        prior = self.prior
        t = torch.randint(0, prior.num_train_timesteps, (len(z),), device=z.device)
        alpha = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn(z.shape, device=z.device)
        noisy = alpha.sqrt() * z + (1 - alpha).sqrt() * noise
        drop = torch.rand(len(z), device=z.device) < self.cfg.lora_camera_dropout
        with self.lora():
            pred = prior.conditional_noise(noisy, t, cameras, drop_pose=drop)
        target = noise if self.cfg.lora_prediction == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * z
        return {"lora": F.mse_loss(pred.float(), target)}

    # ------------------------------------------------------------------ memory

    def memory_estimate(self, plan, prior=None) -> dict:
        """The LoRA training pass: the UNet's activations held for backward on the views it trains on (each
        ``lora_timesteps`` times). The LoRA's weights, gradients and Adam moments are small (rank 4 on the
        published UNet: 0.8 M parameters, 13 MB), and the LoRA model's ε pass runs without gradients after the
        prior's, so the prior's ``unet`` part bounds it."""
        from lift3d.preflight import unet_gib

        part_config = getattr(prior, "part_config", None)
        if part_config is None:
            return {}
        unet, vae = part_config("unet"), part_config("vae")
        size = int(vae.get("sample_size", 256)) // prior.latent_factor
        worst = 0.0
        for views, h, w in plan.renders("guidance"):
            latent = h * w if plan.latent_field else size ** 2
            n = min(views, self.cfg.lora_views or views) * self.cfg.lora_timesteps
            worst = max(worst, unet_gib(unet, n, latent, grad=True))
        return {"lora": (worst, f"{self.path}.lora_views (now {self.cfg.lora_views or 'all'})")}
