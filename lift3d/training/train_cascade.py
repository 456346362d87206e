"""``lift3d train-cascade``: train a Cascade-Zero123 refiner from a Zero123 folder on a multi-view
dataset (the layout of lift3d/training/data.py), as the paper's method (lift3d/zero123/cascade.py):

1. **Self-prompts.** For the first ``--sources`` views of every training object, the base model
   generates the nearby views (DDIM, ``--prompt-steps``, CFG ``--prompt-scale``). They are computed
   once, before training, and kept in ``OUT/prompts.pt`` (resumable by chunks): generating them
   online for every batch, as the paper does on GPUs, would cost ~50x the training step on a CPU.
2. **The refiner** starts as a copy of the base. Per sample: a source view with its prompts, a
   different target view; context = input token, coarse-target token, one token per prompt. The
   coarse token is, with probability ``--coarse-prob``, a guess of the target by the base, else a
   zero embedding. ``--coarse-source sample`` (the paper): the base's DDIM view of the target, made
   once before training like the prompts (``OUT/coarse.pt``); ``estimate``: the base's one-step
   estimate x̂₀ of the same noisy target latent, made online. Only the source latent is
   concatenated. CFG dropout as the paper (p = 0.05): r < p: input and coarse embeddings zeroed;
   p <= r < 2p: those and the latent; 2p <= r < 3p: the latent only. The UNet and camera projection train (projection at 10x the learning rate, as
   Zero123); the VAE stays frozen, and so does the image encoder unless ``--train-image-encoder``
   (then every condition image is embedded by the refiner's own encoder at every step).
3. **Self-distillation**: after every step the base moves towards the refiner,
   base <- m * base + (1 - m) * refiner (``--momentum``), so online coarse estimates improve too.

Outputs: ``OUT/ckpts/last.ckpt`` (``--resume``), ``OUT/loss.csv``, the refiner (EMA weights) in
``--model-out`` (kxic layout + ``cascade.json``) and the distilled base in ``--base-out`` if given.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

from lift3d.errors import UserError
from lift3d.training.train_zero123 import (EMA, _replace_model_folder, _write_loss_csv, encode_dataset, lr_lambda,
                                           named_params, optimizer_step)
from lift3d.utils.io import save_torch

P_DROP = 0.05


def parse_args(argv):
    from lift3d.priors.zero123 import BUNDLED_MODEL

    p = argparse.ArgumentParser(prog="lift3d train-cascade", description=__doc__.splitlines()[0])
    p.add_argument("--base", default=BUNDLED_MODEL, help="the base Zero123 folder (default: the bundled mini model)")
    p.add_argument("--data", required=True, help="dataset root (layout: lift3d/training/data.py)")
    p.add_argument("--out", required=True, help="run folder: prompts, checkpoints, loss log")
    p.add_argument("--model-out", default=None, help="refiner folder (default OUT/refiner)")
    p.add_argument("--base-out", default=None, help="also save the self-distilled base here")
    p.add_argument("--nearby", default="0,45,0;0,-45,0;30,0,0",
                   help="self-prompt offsets 'Δelev,Δazim,Δdist;...' in degrees (default: the paper's)")
    p.add_argument("--sources", type=int, default=3, help="source views per object that get self-prompts")
    p.add_argument("--prompt-steps", type=int, default=10)
    p.add_argument("--prompt-scale", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.998, help="EMA of the refiner's weights (what is saved)")
    p.add_argument("--momentum", type=float, default=0.999, help="self-distillation: base <- m base + (1-m) refiner")
    p.add_argument("--coarse-prob", type=float, default=0.5, help="share of samples with a coarse-target token")
    p.add_argument("--coarse-source", choices=("sample", "estimate"), default="sample",
                   help="the coarse token: the base's DDIM view of the target (the paper; made once) or its "
                        "one-step estimate of the noisy target (online)")
    p.add_argument("--train-image-encoder", action="store_true",
                   help="train the refiner's image encoder too (it embeds the prompts; frozen in the paper's code)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-objects", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpts/last.ckpt")
    args = p.parse_args(argv)
    try:
        args.offsets = [[float(x) for x in item.split(",")] for item in args.nearby.split(";")]
    except ValueError:
        args.offsets = []
    if not args.offsets or any(len(o) != 3 for o in args.offsets):
        raise UserError(f"--nearby '{args.nearby}': give 'Δelev,Δazim,Δdist' triples separated by ';'")
    return args


@torch.no_grad()
def cached_base_views(base, data, args, name: str, targets_of, log, salt: int = 0) -> torch.Tensor:
    """The base model's DDIM views (N, S, P, 3, H, W) uint8 of the first S views of every object, at P
    target views per source view: ``targets_of(obj, views)`` maps object indices (k,) and their source
    views (k*S, 3) to targets (k*S, P, 3). Cached in OUT/{name}.pt and resumed from it, chunk by chunk."""
    from lift3d.cameras import position_to_spherical, zero123_pose_vectors
    from lift3d.zero123.cascade import weights_fingerprint
    from lift3d.zero123.nvs import sample

    n, s = len(data), args.sources
    first = targets_of(torch.arange(1), position_to_spherical(data.positions[:1, :s].reshape(-1, 3)))
    p = first.shape[1]
    key = {"base": weights_fingerprint(base), "what": name, "targets": first.tolist(), "sources": s,
           "steps": args.prompt_steps, "scale": args.prompt_scale, "seed": args.seed, "objects": list(data.ids)}
    path = os.path.join(args.out, f"{name}.pt")
    state = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else {}
    if state.get("key") != key:
        size = data.images.shape[-1]
        state = {"key": key, "done": 0, "images": torch.zeros(n, s, p, 3, size, size, dtype=torch.uint8)}
    t0, chunk = time.time(), max(1, 64 // (s * max(1, p // 3)))
    for start in range(state["done"], n, chunk):
        obj = torch.arange(start, min(n, start + chunk))
        src = data.images[obj, :s].reshape(-1, *data.images.shape[2:]).float() / 255          # (k*s, 3, H, W)
        views = position_to_spherical(data.positions[obj, :s].reshape(-1, 3))                 # (k*s, 3)
        targets = targets_of(obj, views)                                                       # (k*s, P, 3)
        pose = zero123_pose_vectors(targets, views[:, None]).reshape(-1, 4)
        cond = base.encode_condition(src.repeat_interleave(p, 0))
        g = torch.Generator().manual_seed(args.seed * 100003 + start + 7919 * salt)
        images = sample(base, cond, pose, args.prompt_steps, args.prompt_scale, eta=0.0, generator=g)
        state["images"][obj] = (images * 255).round().to(torch.uint8).reshape(len(obj), s, p, *images.shape[1:])
        state["done"] = int(obj[-1]) + 1
        save_torch(path, state)
        log(f"{name}: {state['done']}/{n} objects ({time.time() - t0:.0f} s)")
    return state["images"]


def make_prompts(base, data, args, log) -> torch.Tensor:
    """Self-prompts (N, S, P, 3, H, W) uint8: the base's views at the nearby offsets of each source view."""
    from lift3d.zero123.cascade import nearby_views

    return cached_base_views(base, data, args, "prompts",
                             lambda obj, views: torch.stack([nearby_views(v, args.offsets) for v in views]), log)


def make_coarse_views(base, data, args, log) -> torch.Tensor:
    """Coarse targets (N, S, V, 3, H, W) uint8, as the paper: the base's view of every dataset view of
    the object from each source view (the slot of the source itself is unused)."""
    from lift3d.cameras import position_to_spherical

    def targets_of(obj, views):
        return position_to_spherical(data.positions[obj]).repeat_interleave(args.sources, 0)  # (k*s, V, 3)

    return cached_base_views(base, data, args, "coarse", targets_of, log, salt=1)


def coarse_estimates(base, noisy, t, latent, emb_src, pose_src, refiner) -> torch.Tensor:
    """CLIP embeddings of the base's one-step estimates x̂₀ of ``noisy`` (no CFG: one UNet call)."""
    from lift3d.zero123.cascade import embed

    ctx = base.context_tokens(emb_src[:, None], pose_src[:, None])
    eps = base.unet(torch.cat([noisy, latent], 1), t, encoder_hidden_states=ctx).sample
    a = base.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
    return embed(refiner, base.decode(x0).clamp(0, 1))


def encode_images(model, images_01: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings (B, D) of images (B, 3, H, W) in [0, 1], with gradients (``embed`` has none)."""
    return model.image_encoder(pixel_values=model.clip_preprocess(images_01 * 2 - 1)).image_embeds


def train_cascade(argv=None) -> int:
    """``lift3d train-cascade ...`` (wired in lift3d/cli.py). Returns the exit status."""
    from tqdm import tqdm

    from lift3d.training.data import MultiViewSet
    from lift3d.zero123 import Zero123Model
    from lift3d.cameras import position_to_spherical, zero123_pose_vectors
    from lift3d.zero123.cascade import CascadeLayout, drop_embeddings, embed, nearby_views, token_inputs

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.model_out = args.model_out or os.path.join(args.out, "refiner")
    os.makedirs(args.out, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[train-cascade {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    base = Zero123Model.from_pretrained(args.base, torch_dtype=torch.float32)
    data = MultiViewSet(args.data, "train", limit=args.limit_objects)
    if base.image_size != data.size:
        raise UserError(f"the base takes {base.image_size} px images but {args.data} holds {data.size} px views")
    if args.sources >= data.images.shape[1]:
        raise UserError(f"--sources {args.sources} leaves no target views ({data.images.shape[1]} views per object)")
    log(f"{len(data)} objects x {data.images.shape[1]} views; {args.sources} sources x {len(args.offsets)} prompts each")
    prompts = make_prompts(base, data, args, log)
    coarse_views = make_coarse_views(base, data, args, log) if args.coarse_source == "sample" else None

    # Frozen encodings, computed once: source latents, CLIP embeddings of sources and prompts.
    mean, std = encode_dataset(base, data.images)
    with torch.no_grad():
        flat = data.images[:, :args.sources].reshape(-1, *data.images.shape[2:]).float() / 255
        src_emb = torch.cat([embed(base, c) for c in flat.split(256)]).reshape(len(data), args.sources, -1)
        flat = prompts.reshape(-1, *prompts.shape[3:]).float() / 255
        prompt_emb = torch.cat([embed(base, c) for c in flat.split(256)]).reshape(*prompts.shape[:3], -1)
        if coarse_views is not None and not args.train_image_encoder:  # else embedded at every step
            flat = coarse_views.reshape(-1, *coarse_views.shape[3:]).float() / 255
            coarse_emb = torch.cat([embed(base, c) for c in flat.split(256)]).reshape(*coarse_views.shape[:3], -1)
    views = position_to_spherical(data.positions)                                            # (N, V, 3)

    refiner = copy.deepcopy(base)
    names = ("unet", "projection") + (("image_encoder",) if args.train_image_encoder else ())
    trainable = {name: getattr(refiner, name) for name in names}
    params = named_params(trainable)
    base_params = named_params({name: getattr(base, name) for name in names})
    for module in trainable.values():
        module.train().requires_grad_(True)
    groups = [{"params": [p for k, p in params.items() if not k.startswith("projection.")], "lr": args.lr},
              {"params": list(refiner.projection.parameters()), "lr": 10 * args.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    ema = EMA(params, args.ema_decay)
    ckpt_path = os.path.join(args.out, "ckpts", "last.ckpt")
    step, elapsed, losses = 0, 0.0, []
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for name, p in params.items():
            p.data.copy_(ckpt["refiner"][name])
        for name, p in base_params.items():
            p.data.copy_(ckpt["base"][name])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        ema.shadow = {k: v.clone() for k, v in ckpt["ema"].items()}
        step, elapsed, losses = ckpt["step"], ckpt["elapsed"], ckpt["losses"]
        log(f"resuming at step {step}")

    n, v_count, s = len(data), data.images.shape[1], args.sources
    g = torch.Generator().manual_seed(args.seed * 1000 + step)
    t0 = time.time() - elapsed
    bar = tqdm(total=args.steps, initial=step, desc="refiner", mininterval=5)
    while step < args.steps and (args.max_minutes is None or time.time() - t0 < 60 * args.max_minutes):
        b = args.batch_size
        obj = torch.randint(0, n, (b,), generator=g)
        src = torch.randint(0, s, (b,), generator=g)
        tgt = (src + torch.randint(1, v_count, (b,), generator=g)) % v_count
        src_view, tgt_view = views[obj, src], views[obj, tgt]
        prompt_views = torch.stack([nearby_views(v, args.offsets) for v in src_view])
        z0 = (mean[obj, tgt] + std[obj, tgt] * torch.randn(mean[obj, tgt].shape, generator=g)) * refiner.latent_scale
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, refiner.num_train_timesteps, (b,), generator=g)
        noisy = refiner.scheduler.add_noise(z0, noise, t)
        latent = mean[obj, src]
        input_emb, prompt_e = src_emb[obj, src], prompt_emb[obj, src]
        coarse = torch.zeros_like(input_emb)
        use = torch.rand(b, generator=g) < args.coarse_prob
        coarse_images = None if coarse_views is None else coarse_views[obj[use], src[use], tgt[use]]
        if args.train_image_encoder:  # every condition image through the refiner's encoder, with gradients
            n_prompts = prompts.shape[2]
            parts = [data.images[obj, src], prompts[obj, src].flatten(0, 1)] + [x for x in [coarse_images] if x is not None]
            e = encode_images(refiner, torch.cat(parts).float() / 255)
            input_emb, prompt_e = e[:b], e[b:b * (1 + n_prompts)].reshape(b, n_prompts, -1)
            if coarse_images is not None:
                coarse = coarse.index_put((use,), e[b * (1 + n_prompts):])
        elif coarse_images is not None:
            coarse[use] = coarse_emb[obj[use], src[use], tgt[use]]
        if coarse_views is None and use.any():
            with torch.no_grad():
                coarse[use] = coarse_estimates(base, noisy[use], t[use], latent[use], src_emb[obj[use], src[use]],
                                               zero123_pose_vectors(tgt_view[use], src_view[use]), refiner)
        embeddings, poses = token_inputs(input_emb, coarse, prompt_e, src_view, prompt_views, tgt_view)
        r = torch.rand(b, generator=g)
        embeddings = drop_embeddings(embeddings, (r < 2 * P_DROP))
        latent = latent * ~((r >= P_DROP) & (r < 3 * P_DROP))[:, None, None, None]
        pred = refiner.unet(torch.cat([noisy, latent], 1), t,
                            encoder_hidden_states=refiner.context_tokens(embeddings, poses)).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, opt, sched, ema, params, step)
        with torch.no_grad():  # self-distillation into the base
            for name, p in base_params.items():
                p.lerp_(params[name].detach(), 1 - args.momentum)
        step += 1
        losses.append([step, loss.item()])
        bar.update(1)
        bar.set_postfix(loss=f"{sum(x[1] for x in losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
        last = step >= args.steps or (args.max_minutes is not None and time.time() - t0 >= 60 * args.max_minutes)
        if step % args.ckpt_every == 0 or last:
            save_torch(ckpt_path, {"refiner": {k: p.detach() for k, p in params.items()},
                                   "base": {k: p.detach() for k, p in base_params.items()},
                                   "opt": opt.state_dict(), "sched": sched.state_dict(), "ema": ema.shadow,
                                   "step": step, "elapsed": time.time() - t0, "losses": losses, "args": vars(args)})
            _write_loss_csv(args.out, losses)
    bar.close()
    log(f"refiner: {step} steps in {(time.time() - t0) / 60:.1f} min, loss (last 100) "
        f"{sum(x[1] for x in losses[-100:]) / max(1, len(losses[-100:])):.4f}")
    ema.swap()
    refiner.eval().requires_grad_(False)
    _replace_model_folder(refiner, args.model_out)
    CascadeLayout(nearby=args.offsets, base_model=args.base, coarse_source=args.coarse_source).save(args.model_out)
    log(f"saved the refiner to {args.model_out}")
    if args.base_out:
        base.eval().requires_grad_(False)
        _replace_model_folder(base, args.base_out)
        log(f"saved the self-distilled base to {args.base_out}")
    return 0

