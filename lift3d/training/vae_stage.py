"""The VAE stages of ``lift3d train-zero123`` (from scratch only).

1. ``train_vae``: the whole autoencoder on the training views (MSE + L1 + a chroma term + a tiny
   KL term), then the latent scaling factor is set to 1 / std of the training latents (how SD's
   0.18215 was chosen).
2. ``train_decoder`` (optional, ``--decoder-steps``): the decoder alone, the encoder frozen. The
   latent space the diffusion model learns does not move, so this stage may run after the
   diffusion stage, or beside it (``--decoder-only``), and only sharpens what the model's latents
   decode to. It writes ``OUT/ckpts/decoder.ckpt``; the final model takes the decoder from there.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from lift3d.training.loop import load_run_checkpoint, out_of_time
from lift3d.utils.io import save_torch


def _reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, chroma_weight: float) -> torch.Tensor:
    """MSE + L1, plus ``chroma_weight`` x the MSE of each pixel's colour minus its grey level.

    Colour is a few percent of the plain loss on mostly-white views, and a small VAE fits
    shape and shading first and colour last or never; the chroma term makes it learn colour early.
    """
    loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
    if chroma_weight:
        loss = loss + chroma_weight * F.mse_loss(recon - recon.mean(1, keepdim=True), x - x.mean(1, keepdim=True))
    return loss


def train_vae(model, data, args, ckpt: dict, save, log) -> None:
    """Stage 1, resuming from ``ckpt``; ``save(**update)`` writes the run checkpoint."""
    from tqdm import tqdm

    vae = model.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    if ckpt.get("stage") == "vae" and "opt" in ckpt:
        opt.load_state_dict(ckpt["opt"])
    step, elapsed = ckpt.get("vae_step", 0), ckpt.get("vae_elapsed", 0.0)
    images = data.images.reshape(-1, *data.images.shape[2:])
    g = torch.Generator().manual_seed(args.seed + step)
    t0 = time.time() - elapsed
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae", mininterval=5)
    while step < args.vae_steps and not out_of_time(t0, args.vae_minutes):
        x = images[torch.randint(0, len(images), (args.vae_batch_size,), generator=g)].float() / 127.5 - 1
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(g)).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = _reconstruction_loss(recon, x, args.vae_chroma_weight) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        ckpt.setdefault("vae_losses", []).append([step, loss.item()])
        if step % args.ckpt_every == 0:
            save(stage="vae", vae_step=step, vae_elapsed=time.time() - t0, opt=opt.state_dict())
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD's recipe: scale latents to unit variance
        sample = images[torch.randperm(len(images), generator=g)[:256]].float() / 127.5 - 1
        z = torch.cat([vae.encode(c).latent_dist.sample(g) for c in sample.split(32)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    ckpt.update(vae_step=step, vae_elapsed=time.time() - t0)
    log(f"vae: {step} steps in {ckpt['vae_elapsed'] / 60:.1f} min, last loss {ckpt['vae_losses'][-1][1]:.4f}, "
        f"scaling_factor {vae.config.scaling_factor:.4f}")
    ckpt.pop("opt", None)  # the VAE's optimizer state is done with
    save(stage="diffusion", step=0)


def decoder_state(vae) -> dict:
    return {f"{part}.{k}": v for part in ("post_quant_conv", "decoder")
            for k, v in getattr(vae, part).state_dict().items()}


def load_decoder(vae, path: str) -> int:
    """Load a ``decoder.ckpt`` into ``vae`` (if the file exists); returns its step count."""
    if not os.path.lexists(path):
        return 0
    state = load_run_checkpoint(path, ("weights", "step"))
    for part in ("post_quant_conv", "decoder"):
        getattr(vae, part).load_state_dict({k[len(part) + 1:]: v for k, v in state["weights"].items()
                                            if k.startswith(part + ".")})
    return int(state["step"])


def train_decoder(vae, images: torch.Tensor, args, log) -> None:
    """Stage 3: the decoder on the frozen encoder's latents (``mode()``), resumable from
    ``OUT/ckpts/decoder.ckpt``. ``images``: (M, 3, S, S) uint8 training views on white."""
    from tqdm import tqdm

    path = os.path.join(args.out, "ckpts", "decoder.ckpt")
    load_decoder(vae, path)       # checks the file
    state = load_run_checkpoint(path) if os.path.lexists(path) else {}
    vae.eval().requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    step, losses = int(state.get("step", 0)), list(state.get("losses", []))
    g = torch.Generator().manual_seed(args.seed + 17 + step)
    t0 = time.time() - float(state.get("elapsed", 0.0))
    bar = tqdm(total=args.decoder_steps, initial=step, desc="decoder", mininterval=5)
    while step < args.decoder_steps and not out_of_time(t0, args.decoder_minutes):
        x = images[torch.randint(0, len(images), (args.vae_batch_size,), generator=g)].float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        loss = _reconstruction_loss(vae.decode(z).sample, x, args.vae_chroma_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append([step, loss.item()])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step >= args.decoder_steps or out_of_time(t0, args.decoder_minutes)
        if step % args.ckpt_every == 0 or done:
            save_torch(path, {"weights": decoder_state(vae), "opt": opt.state_dict(), "step": step,
                              "elapsed": time.time() - t0, "losses": losses})
    bar.close()
    vae.eval().requires_grad_(False)
    log(f"decoder: {step} steps in {(time.time() - t0) / 60:.1f} min")
