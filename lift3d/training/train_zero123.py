"""``lift3d train-zero123``: train a Zero123-architecture model on a multi-view dataset.

From scratch (``--size mini``), in two stages, both resumable from ``OUT/ckpts/last.ckpt``:
1. the VAE alone (reconstruction + a tiny KL term); its latent scaling factor is then set to
   1 / std of the training latents, as Stable Diffusion's 0.18215 was chosen;
2. the diffusion model: UNet + camera projection + image encoder (trained jointly, since it is
   not a pretrained CLIP), the VAE frozen and the dataset's latents computed once;
3. optionally (``--decoder-steps``) the VAE decoder alone on the frozen encoder's latents, which
   leaves the latent space unchanged (``--decoder-only`` runs it beside stage 2); see
   :mod:`lift3d.training.vae_stage`.
Fine-tuning (``--from-pretrained FOLDER``, any format the wrapper loads) skips stage 1 and keeps
the VAE and the pretrained CLIP frozen.

Conditioning as in Zero123 (see :func:`conditioning`); ε-prediction MSE; AdamW with the camera
projection at 10x the learning rate; an EMA of the trained weights is what gets saved.
Outputs: ``OUT/ckpts/last.ckpt``, ``OUT/samples/*.png`` (input | GT | model at +90° and +180°),
``OUT/loss.csv``, and the final model folder (``--model-out``, kxic diffusers layout).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from lift3d.config import number_arg
from lift3d.errors import UserError
from lift3d.training.loop import TrainLoop, load_run_checkpoint, named_params, replace_model_folder
from lift3d.training.vae_stage import load_decoder, train_decoder, train_vae
from lift3d.utils.io import save_torch

P_DROP_IMAGE_EMBEDDING = 0.10     # r < 0.10: zero the CLIP embedding (before the projection)
P_DROP_LATENT = (0.05, 0.15)      # 0.05 <= r < 0.15: zero the concat latent (so 5% drop both)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lift3d train-zero123", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset root (layout: lift3d/training/data.py)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, sample grids, loss log")
    p.add_argument("--model-out", default=None, help="final model folder (default OUT/model)")
    p.add_argument("--make-data", action="store_true", help="generate the procedural/pybullet dataset into --data first")
    p.add_argument("--n-procedural", type=number_arg(int, ge=0), default=600)
    p.add_argument("--n-urdf", type=number_arg(int, ge=0), default=300)
    p.add_argument("--size", default="mini", choices=["mini", "tiny"], help="architecture preset when training from scratch")
    p.add_argument("--from-pretrained", default=None, help="fine-tune this Zero123 model instead of training from scratch")
    p.add_argument("--vae-steps", type=number_arg(int, ge=0), default=1500)
    p.add_argument("--vae-minutes", type=number_arg(float, gt=0), default=None, help="stop the VAE stage after this much wall time")
    p.add_argument("--decoder-steps", type=number_arg(int, ge=0), default=0, help="decoder-only refinement steps after the diffusion stage")
    p.add_argument("--decoder-minutes", type=number_arg(float, gt=0), default=None)
    p.add_argument("--decoder-only", action="store_true",
                   help="run only the decoder stage on OUT/ckpts/last.ckpt's VAE (may run beside the diffusion stage)")
    p.add_argument("--steps", type=number_arg(int, ge=0), default=20000, help="diffusion steps")
    p.add_argument("--max-minutes", type=number_arg(float, gt=0), default=None, help="stop the diffusion stage after this much wall time")
    p.add_argument("--batch-size", type=number_arg(int, ge=1), default=32)
    p.add_argument("--vae-batch-size", type=number_arg(int, ge=1), default=16)
    p.add_argument("--lr", type=number_arg(float, gt=0), default=2e-4)
    p.add_argument("--vae-lr", type=number_arg(float, gt=0), default=1e-3)
    p.add_argument("--kl-weight", type=number_arg(float, ge=0), default=1e-6)
    p.add_argument("--vae-chroma-weight", type=number_arg(float, ge=0), default=10.0,
                   help="weight of the colour (pixel minus its grey level) MSE in the VAE loss")
    p.add_argument("--ema-decay", type=number_arg(float, ge=0, le=1), default=0.999)
    p.add_argument("--warmup", type=number_arg(int, ge=0), default=200)
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                   help="after the warm-up: cosine decay to 10%% at --steps, or constant")
    p.add_argument("--sample-every", type=number_arg(int, ge=0), default=1000, help="sample-grid interval in steps (0: never)")
    p.add_argument("--ckpt-every", type=number_arg(int, ge=1), default=250)
    p.add_argument("--threads", type=number_arg(int, ge=1, le=4096), default=2,
                   help="torch threads; use 1 on a machine whose cores are busy with other jobs (much faster there)")
    p.add_argument("--seed", type=number_arg(int, ge=0, lt=2 ** 32), default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpts/last.ckpt")
    p.add_argument("--export-only", action="store_true",
                   help="write --model-out from OUT/ckpts/last.ckpt (EMA weights) and exit, e.g. during a run")
    p.add_argument("--limit-objects", type=number_arg(int, ge=1), default=None, help="use only the first N training objects")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- conditioning


def pair_poses(positions: torch.Tensor, obj: torch.Tensor, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zero123 relative poses (B, 4) from camera positions (N, V, 3): ``lift3d.cameras.zero123_pose``."""
    from lift3d.cameras import Cameras, look_at, zero123_pose

    def cams(view):
        return Cameras(look_at(positions[obj, view]), torch.zeros(len(obj)), 1, 1)

    return zero123_pose(cams(target), cams(cond))


def conditioning(model, cond_01: torch.Tensor, cond_latent: torch.Tensor, pose: torch.Tensor, r: torch.Tensor):
    """Training-time context (B, 1, D) and concat latent (B, 4, h, w), with Zero123's CFG dropout
    driven by ``r`` ~ U[0, 1) per sample: the CLIP embedding is zeroed *before* the projection
    (the pose still enters), the unscaled condition latent is zeroed independently."""
    embedding = model.image_encoder(pixel_values=model.clip_preprocess(cond_01 * 2 - 1)).image_embeds[:, None]
    embedding = embedding * (r >= P_DROP_IMAGE_EMBEDDING).to(embedding.dtype)[:, None, None]
    context = model.projection(torch.cat([embedding, pose[:, None].to(embedding.dtype)], -1))
    lo, hi = P_DROP_LATENT
    keep = ~((r >= lo) & (r < hi))
    return context, cond_latent * keep.to(cond_latent.dtype)[:, None, None, None]


def diffusion_loss(model, cond_01, cond_latent, target_mean, target_std, pose, generator=None):
    """ε-prediction MSE for one batch; target latents sampled from the VAE posterior and scaled."""
    b = len(cond_01)
    z0 = (target_mean + target_std * torch.randn(target_mean.shape, generator=generator)) * model.latent_scale
    noise = torch.randn(z0.shape, generator=generator)
    t = torch.randint(0, model.num_train_timesteps, (b,), generator=generator)
    noisy = model.scheduler.add_noise(z0, noise, t)
    r = torch.rand(b, generator=generator)
    context, latent = conditioning(model, cond_01, cond_latent, pose, r)
    pred = model.unet(torch.cat([noisy, latent], 1), t, encoder_hidden_states=context).sample
    return F.mse_loss(pred, noise)


# --------------------------------------------------------------------------- checkpoints


def model_state(model) -> dict:
    return {f"{name}.{k}": v for name in ("unet", "vae", "image_encoder", "projection")
            for k, v in getattr(model, name).state_dict().items()}


def load_model_state(model, state: dict, path: str = "the checkpoint") -> None:
    for name in ("unet", "vae", "image_encoder", "projection"):
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        try:
            getattr(model, name).load_state_dict(sub)
        except RuntimeError as e:
            raise UserError(f"{path} does not fit this model ({name}: {str(e).splitlines()[0][:120]}); pass the "
                            "--size / --from-pretrained the run was started with") from None


# --------------------------------------------------------------------------- stages


@torch.no_grad()
def encode_dataset(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, V, 4, h, w) of every view, unscaled."""
    flat = images.reshape(-1, *images.shape[2:])
    means, stds = [], []
    for chunk in flat.split(64):
        dist = model.vae.encode(chunk.float() / 127.5 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    shape = images.shape[:2] + means[0].shape[1:]
    return torch.cat(means).reshape(shape), torch.cat(stds).reshape(shape)


def train_diffusion(model, data, heldout, args, ckpt: dict, trainable: dict, log) -> None:
    """Stage 2 (see the module docstring), resuming from ``ckpt``; leaves the EMA weights in ``model``."""
    loop = TrainLoop(trainable, lr=args.lr, warmup=args.warmup, steps=args.steps, schedule=args.lr_schedule,
                     ema_decay=args.ema_decay, seed=args.seed, out=args.out, ckpt_every=args.ckpt_every,
                     max_minutes=args.max_minutes, desc="diffusion")
    resumable = ckpt.get("stage") == "diffusion" and "opt" in ckpt
    loop.load_state(ckpt if resumable else {k: v for k, v in ckpt.items() if k in ("step", "elapsed", "losses")})
    ckpt["losses"] = loop.losses
    log("encoding the dataset with the frozen VAE ...")
    mean, std = encode_dataset(model, data.images)
    n, v = data.images.shape[:2]

    def batch_loss(g):
        obj = torch.randint(0, n, (args.batch_size,), generator=g)
        cond = torch.randint(0, v, (args.batch_size,), generator=g)
        target = (cond + torch.randint(1, v, (args.batch_size,), generator=g)) % v  # a different view
        pose = pair_poses(data.positions, obj, cond, target)
        cond_01 = data.images[obj, cond].float() / 255
        return diffusion_loss(model, cond_01, mean[obj, cond], mean[obj, target], std[obj, target], pose, g)

    def sample_grid(step, last):
        if heldout is not None and args.sample_every > 0 and (step % args.sample_every == 0 or last):
            loop.ema.swap()
            _sample_grid(model, heldout, os.path.join(args.out, "samples", f"{step:06d}.png"))
            loop.ema.swap()

    loop.run(batch_loss, lambda: _save_ckpt(args, model, ckpt, stage="diffusion", **loop.state()),
             on_step=sample_grid)
    loop.ema.swap()  # the saved model holds the averaged weights
    ckpt.update(step=loop.step, elapsed=loop.elapsed)
    log(f"diffusion: {loop.step} steps in {ckpt['elapsed'] / 60:.1f} min")


def _save_ckpt(args, model, ckpt: dict, **update) -> None:
    ckpt.update(update)
    ckpt["model"] = model_state(model)
    ckpt["scaling_factor"] = float(model.vae.config.scaling_factor)
    save_torch(os.path.join(args.out, "ckpts", "last.ckpt"), ckpt)


def _sample_grid(model, heldout, path: str, max_objects: int = 6) -> None:
    """Rows: input | GT +90 | model +90 | GT +180 | model +180, for a few held-out objects."""
    from lift3d.training.nvs_eval import bench_tensors
    from lift3d.zero123.sampling import sample
    from lift3d.utils.images import image_grid
    from lift3d.utils.io import save_image

    was_training = model.unet.training
    model.eval()
    cond, targets, poses = bench_tensors(heldout, max_objects)
    k = len(cond)
    views = sample(model, model.encode_condition(cond.repeat(2, 1, 1, 1)), torch.cat([poses[:, 0], poses[:, 1]]),
                   steps=25, eta=0.0, generator=torch.Generator().manual_seed(0))
    tiles = []
    for i in range(k):
        tiles += [cond[i], targets[i, 0], views[i], targets[i, 1], views[k + i]]
    save_image(path, image_grid([t.permute(1, 2, 0) for t in tiles], columns=5))
    if was_training:
        model.unet.train()
        model.image_encoder.train()


# --------------------------------------------------------------------------- entry point


def export_checkpoint(args) -> int:
    """The model of a run's last checkpoint (EMA weights in the diffusion stage) as a model folder."""
    from lift3d.training.arch import build_model

    path = os.path.join(args.out, "ckpts", "last.ckpt")
    if not os.path.lexists(path):
        raise UserError(f"no checkpoint at {path}; --out must be a train-zero123 run folder")
    ckpt = load_run_checkpoint(path, ("model", "scaling_factor"))
    if args.from_pretrained:
        from lift3d.zero123 import Zero123Model

        model = Zero123Model.from_pretrained(args.from_pretrained, torch_dtype=torch.float32)
    else:
        model = build_model((ckpt.get("args") or {}).get("size", args.size))
    load_model_state(model, ckpt["model"], path)
    model.vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    with torch.no_grad():
        params = named_params({n: getattr(model, n) for n in ("unet", "projection", "image_encoder")})
        for k, v in ckpt.get("ema", {}).items():
            params[k].copy_(v)
    load_decoder(model.vae, os.path.join(args.out, "ckpts", "decoder.ckpt"))
    replace_model_folder(model, args.model_out or os.path.join(args.out, "model"))
    print(f"exported step {ckpt.get('step', 0)} of {path}")
    return 0


def train_zero123(argv=None) -> int:
    """Console entry point (``lift3d train-zero123 ...``). Returns the exit status."""
    from lift3d.training.data import MultiViewSet, generate_dataset

    args = parse_args(argv)
    if args.export_only:
        return export_checkpoint(args)
    if not args.data:
        raise UserError("--data DIR is required (a dataset root; add --make-data to generate one)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.model_out = args.model_out or os.path.join(args.out, "model")

    def log(msg: str) -> None:
        print(f"[train-zero123 {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    ckpt_path = os.path.join(args.out, "ckpts", "last.ckpt")      # read first: a bad one fails before any work
    ckpt = {}
    if args.resume or args.decoder_only:
        if not os.path.lexists(ckpt_path):
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
        ckpt = load_run_checkpoint(ckpt_path, ("stage",))
        log(f"resuming: stage {ckpt['stage']}, vae step {ckpt.get('vae_step', 0)}, step {ckpt.get('step', 0)}")

    if args.make_data and not os.path.isfile(os.path.join(args.data, "split.json")):
        log(f"generating the dataset into {args.data} ...")
        generate_dataset(args.data, n_procedural=args.n_procedural, n_urdf=args.n_urdf, log=log)
    data = MultiViewSet(args.data, "train", limit=args.limit_objects)
    try:
        heldout = MultiViewSet(args.data, "heldout")
        heldout = heldout if heldout.bench else None
    except UserError:
        heldout = None
    os.makedirs(args.out, exist_ok=True)
    log(f"{len(data)} training objects x {data.images.shape[1]} views at {data.size} px; "
        f"{0 if heldout is None else len(heldout)} held-out objects")

    if args.from_pretrained:
        from lift3d.zero123 import Zero123Model

        model = Zero123Model.from_pretrained(args.from_pretrained, torch_dtype=torch.float32)
        trainable = {"unet": model.unet, "projection": model.projection}  # pretrained CLIP stays frozen
        ckpt.setdefault("stage", "diffusion")
    else:
        from lift3d.training.arch import build_model

        model = build_model(args.size, seed=args.seed)
        trainable = {"unet": model.unet, "projection": model.projection, "image_encoder": model.image_encoder}
    if model.image_size != data.size:
        raise UserError(f"the model takes {model.image_size} px images but {args.data} holds {data.size} px views")
    if "model" in ckpt:
        load_model_state(model, ckpt["model"], ckpt_path)
        model.vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    ckpt.pop("model", None)
    ckpt["args"] = {k: v for k, v in vars(args).items() if v is not None}

    if args.decoder_only:
        if ckpt.get("stage") != "diffusion":
            raise UserError("--decoder-only needs a run whose VAE stage has finished (stage 'diffusion' in last.ckpt)")
        train_decoder(model.vae, data.images.reshape(-1, *data.images.shape[2:]), args, log)
        return 0
    if ckpt.get("stage", "vae") == "vae":
        train_vae(model, data, args, ckpt, lambda **kw: _save_ckpt(args, model, ckpt, **kw), log)
    train_diffusion(model, data, heldout, args, ckpt, trainable, log)
    if args.decoder_steps and not args.from_pretrained:
        train_decoder(model.vae, data.images.reshape(-1, *data.images.shape[2:]), args, log)
    load_decoder(model.vae, os.path.join(args.out, "ckpts", "decoder.ckpt"))
    model.eval().requires_grad_(False)
    replace_model_folder(model, args.model_out)
    log(f"saved {args.model_out}")
    return 0


def main(argv=None) -> int:
    """``lift3d train-zero123 ...`` (wired in lift3d/cli.py) and ``python -m lift3d.training.train_zero123``."""
    return train_zero123(argv)


if __name__ == "__main__":
    raise SystemExit(main())
