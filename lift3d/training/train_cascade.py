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
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from lift3d.config import number_arg
from lift3d.errors import UserError
from lift3d.training.loop import TrainLoop, load_run_checkpoint, named_params, replace_model_folder
from lift3d.training.train_zero123 import encode_dataset
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
    p.add_argument("--sources", type=number_arg(int, ge=1), default=3, help="source views per object that get self-prompts")
    p.add_argument("--prompt-steps", type=number_arg(int, ge=1, le=1000), default=10)
    p.add_argument("--prompt-scale", type=number_arg(float, ge=0), default=3.0)
    p.add_argument("--steps", type=number_arg(int, ge=0), default=3000)
    p.add_argument("--max-minutes", type=number_arg(float, gt=0), default=None)
    p.add_argument("--batch-size", type=number_arg(int, ge=1), default=24)
    p.add_argument("--lr", type=number_arg(float, gt=0), default=1e-4)
    p.add_argument("--warmup", type=number_arg(int, ge=0), default=100)
    p.add_argument("--ema-decay", type=number_arg(float, ge=0, le=1), default=0.998, help="EMA of the refiner's weights (what is saved)")
    p.add_argument("--momentum", type=number_arg(float, ge=0, le=1), default=0.999, help="self-distillation: base <- m base + (1-m) refiner")
    p.add_argument("--coarse-prob", type=number_arg(float, ge=0, le=1), default=0.5, help="share of samples with a coarse-target token")
    p.add_argument("--coarse-source", choices=("sample", "estimate"), default="sample",
                   help="the coarse token: the base's DDIM view of the target (the paper; made once) or its "
                        "one-step estimate of the noisy target (online)")
    p.add_argument("--train-image-encoder", action="store_true",
                   help="train the refiner's image encoder too (it embeds the prompts; frozen in the paper's code)")
    p.add_argument("--ckpt-every", type=number_arg(int, ge=1), default=200)
    p.add_argument("--threads", type=number_arg(int, ge=1, le=4096), default=2)
    p.add_argument("--seed", type=number_arg(int, ge=0, lt=2 ** 32), default=0)
    p.add_argument("--limit-objects", type=number_arg(int, ge=1), default=None)
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
    from lift3d.zero123.sampling import sample

    n, s = len(data), args.sources
    first = targets_of(torch.arange(1), position_to_spherical(data.positions[:1, :s].reshape(-1, 3)))
    p = first.shape[1]
    key = {"base": weights_fingerprint(base), "what": name, "targets": first.tolist(), "sources": s,
           "steps": args.prompt_steps, "scale": args.prompt_scale, "seed": args.seed, "objects": list(data.ids)}
    path = os.path.join(args.out, f"{name}.pt")
    state = load_run_checkpoint(path) if os.path.lexists(path) else {}
    if not isinstance(state, dict) or state.get("key") != key:
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


@dataclass
class FrozenInputs:
    """What the refiner's batches are drawn from, computed once: the dataset's source latents
    (posterior mean/std (N, V, 4, h, w)), views (N, V, 3), self-prompts and coarse views (uint8) and
    the base's CLIP embeddings of sources (N, S, D), prompts (N, S, P, D) and coarse views (N, S, V, D;
    None when the image encoder trains or the coarse token is estimated online)."""

    images: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    views: torch.Tensor
    prompts: torch.Tensor
    coarse_views: Optional[torch.Tensor]
    src_emb: torch.Tensor
    prompt_emb: torch.Tensor
    coarse_emb: Optional[torch.Tensor]


@torch.no_grad()
def frozen_inputs(base, data, prompts, coarse_views, args) -> FrozenInputs:
    from lift3d.cameras import position_to_spherical
    from lift3d.zero123.cascade import embed

    def embed_all(images: torch.Tensor, lead: tuple) -> torch.Tensor:
        flat = images.reshape(-1, *images.shape[-3:]).float() / 255
        return torch.cat([embed(base, c) for c in flat.split(256)]).reshape(*lead, -1)

    mean, std = encode_dataset(base, data.images)
    sources = data.images[:, :args.sources]
    coarse_emb = None
    if coarse_views is not None and not args.train_image_encoder:  # else embedded at every step
        coarse_emb = embed_all(coarse_views, coarse_views.shape[:3])
    return FrozenInputs(data.images, mean, std, position_to_spherical(data.positions), prompts, coarse_views,
                        embed_all(sources, sources.shape[:2]), embed_all(prompts, prompts.shape[:3]), coarse_emb)


def refiner_loss(refiner, base, x: FrozenInputs, args, g: torch.Generator) -> torch.Tensor:
    """ε-prediction MSE of the refiner on one batch (see the module docstring, step 2)."""
    from lift3d.cameras import zero123_pose_vectors
    from lift3d.zero123.cascade import drop_embeddings, nearby_views, token_inputs

    b, (n, v_count), s = args.batch_size, x.images.shape[:2], args.sources
    obj = torch.randint(0, n, (b,), generator=g)
    src = torch.randint(0, s, (b,), generator=g)
    tgt = (src + torch.randint(1, v_count, (b,), generator=g)) % v_count
    src_view, tgt_view = x.views[obj, src], x.views[obj, tgt]
    prompt_views = torch.stack([nearby_views(v, args.offsets) for v in src_view])
    z0 = (x.mean[obj, tgt] + x.std[obj, tgt] * torch.randn(x.mean[obj, tgt].shape, generator=g)) * refiner.latent_scale
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, refiner.num_train_timesteps, (b,), generator=g)
    noisy = refiner.scheduler.add_noise(z0, noise, t)
    latent = x.mean[obj, src]
    input_emb, prompt_e = x.src_emb[obj, src], x.prompt_emb[obj, src]
    coarse = torch.zeros_like(input_emb)
    use = torch.rand(b, generator=g) < args.coarse_prob
    coarse_images = None if x.coarse_views is None else x.coarse_views[obj[use], src[use], tgt[use]]
    if args.train_image_encoder:  # every condition image through the refiner's encoder, with gradients
        n_prompts = x.prompts.shape[2]
        parts = [x.images[obj, src], x.prompts[obj, src].flatten(0, 1)] + [c for c in [coarse_images] if c is not None]
        e = encode_images(refiner, torch.cat(parts).float() / 255)
        input_emb, prompt_e = e[:b], e[b:b * (1 + n_prompts)].reshape(b, n_prompts, -1)
        if coarse_images is not None:
            coarse = coarse.index_put((use,), e[b * (1 + n_prompts):])
    elif coarse_images is not None:
        coarse[use] = x.coarse_emb[obj[use], src[use], tgt[use]]
    if x.coarse_views is None and use.any():
        with torch.no_grad():
            coarse[use] = coarse_estimates(base, noisy[use], t[use], latent[use], x.src_emb[obj[use], src[use]],
                                           zero123_pose_vectors(tgt_view[use], src_view[use]), refiner)
    embeddings, poses = token_inputs(input_emb, coarse, prompt_e, src_view, prompt_views, tgt_view)
    r = torch.rand(b, generator=g)
    embeddings = drop_embeddings(embeddings, (r < 2 * P_DROP))
    latent = latent * ~((r >= P_DROP) & (r < 3 * P_DROP))[:, None, None, None]
    pred = refiner.unet(torch.cat([noisy, latent], 1), t,
                        encoder_hidden_states=refiner.context_tokens(embeddings, poses)).sample
    return F.mse_loss(pred, noise)


def train_cascade(argv=None) -> int:
    """``lift3d train-cascade ...`` (wired in lift3d/cli.py). Returns the exit status."""
    from lift3d.training.data import MultiViewSet
    from lift3d.zero123 import Zero123Model
    from lift3d.zero123.cascade import CascadeLayout

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.model_out = args.model_out or os.path.join(args.out, "refiner")
    os.makedirs(args.out, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[train-cascade {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    ckpt_path = os.path.join(args.out, "ckpts", "last.ckpt")      # read first: a bad one fails before any work
    if args.resume:
        if not os.path.lexists(ckpt_path):
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
        ckpt = load_run_checkpoint(ckpt_path, ("refiner", "base"))
    base = Zero123Model.from_pretrained(args.base, torch_dtype=torch.float32)
    data = MultiViewSet(args.data, "train", limit=args.limit_objects)
    if base.image_size != data.size:
        raise UserError(f"the base takes {base.image_size} px images but {args.data} holds {data.size} px views")
    if args.sources >= data.images.shape[1]:
        raise UserError(f"--sources {args.sources} leaves no target views ({data.images.shape[1]} views per object)")
    log(f"{len(data)} objects x {data.images.shape[1]} views; {args.sources} sources x {len(args.offsets)} prompts each")
    prompts = make_prompts(base, data, args, log)
    coarse_views = make_coarse_views(base, data, args, log) if args.coarse_source == "sample" else None
    inputs = frozen_inputs(base, data, prompts, coarse_views, args)

    refiner = copy.deepcopy(base)
    names = ("unet", "projection") + (("image_encoder",) if args.train_image_encoder else ())
    loop = TrainLoop({name: getattr(refiner, name) for name in names}, lr=args.lr, warmup=args.warmup,
                     steps=args.steps, ema_decay=args.ema_decay, seed=args.seed, out=args.out,
                     ckpt_every=args.ckpt_every, max_minutes=args.max_minutes, desc="refiner")
    base_params = named_params({name: getattr(base, name) for name in names})
    if args.resume:
        for params, saved in ((loop.params, ckpt["refiner"]), (base_params, ckpt["base"])):
            for name, p in params.items():
                p.data.copy_(saved[name])
        loop.load_state(ckpt)
        log(f"resuming at step {loop.step}")

    @torch.no_grad()
    def distill() -> None:  # self-distillation: the base moves towards the refiner
        for name, p in base_params.items():
            p.lerp_(loop.params[name].detach(), 1 - args.momentum)

    def save() -> None:
        save_torch(ckpt_path, {"refiner": {k: p.detach() for k, p in loop.params.items()},
                               "base": {k: p.detach() for k, p in base_params.items()}, **loop.state(),
                               "args": vars(args)})

    loop.run(lambda g: refiner_loss(refiner, base, inputs, args, g), save, after_step=distill)
    log(f"refiner: {loop.step} steps in {loop.elapsed / 60:.1f} min, loss (last 100) {loop.mean_loss(100):.4f}")
    loop.ema.swap()
    refiner.eval().requires_grad_(False)
    replace_model_folder(refiner, args.model_out)
    CascadeLayout(nearby=args.offsets, base_model=args.base, coarse_source=args.coarse_source).save(args.model_out)
    log(f"saved the refiner to {args.model_out}")
    if args.base_out:
        base.eval().requires_grad_(False)
        replace_model_folder(base, args.base_out)
        log(f"saved the self-distilled base to {args.base_out}")
    return 0
