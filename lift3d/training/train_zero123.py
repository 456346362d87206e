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
import math
import os
import time

import torch
import torch.nn.functional as F

from lift3d.errors import UserError
from lift3d.training.vae_stage import load_decoder, out_of_time, train_decoder, train_vae
from lift3d.utils.io import save_torch, write_text

P_DROP_IMAGE_EMBEDDING = 0.10     # r < 0.10: zero the CLIP embedding (before the projection)
P_DROP_LATENT = (0.05, 0.15)      # 0.05 <= r < 0.15: zero the concat latent (so 5% drop both)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lift3d train-zero123", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset root (layout: lift3d/training/data.py)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, sample grids, loss log")
    p.add_argument("--model-out", default=None, help="final model folder (default OUT/model)")
    p.add_argument("--make-data", action="store_true", help="generate the procedural/pybullet dataset into --data first")
    p.add_argument("--n-procedural", type=int, default=600)
    p.add_argument("--n-urdf", type=int, default=300)
    p.add_argument("--size", default="mini", choices=["mini", "tiny"], help="architecture preset when training from scratch")
    p.add_argument("--from-pretrained", default=None, help="fine-tune this Zero123 model instead of training from scratch")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-minutes", type=float, default=None, help="stop the VAE stage after this much wall time")
    p.add_argument("--decoder-steps", type=int, default=0, help="decoder-only refinement steps after the diffusion stage")
    p.add_argument("--decoder-minutes", type=float, default=None)
    p.add_argument("--decoder-only", action="store_true",
                   help="run only the decoder stage on OUT/ckpts/last.ckpt's VAE (may run beside the diffusion stage)")
    p.add_argument("--steps", type=int, default=20000, help="diffusion steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop the diffusion stage after this much wall time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--vae-chroma-weight", type=float, default=10.0,
                   help="weight of the colour (pixel minus its grey level) MSE in the VAE loss")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                   help="after the warm-up: cosine decay to 10%% at --steps, or constant")
    p.add_argument("--sample-every", type=int, default=1000, help="sample-grid interval in steps (0: never)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; use 1 on a machine whose cores are busy with other jobs (much faster there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpts/last.ckpt")
    p.add_argument("--export-only", action="store_true",
                   help="write --model-out from OUT/ckpts/last.ckpt (EMA weights) and exit, e.g. during a run")
    p.add_argument("--limit-objects", type=int, default=None, help="use only the first N training objects")
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


# --------------------------------------------------------------------------- helpers


class EMA:
    """Exponential moving average of some parameters (what the final model is saved with)."""

    def __init__(self, params: dict, decay: float):
        self.decay, self.params = decay, params
        self.shadow = {k: v.detach().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are not averaged for long
        for k, v in self.params.items():
            self.shadow[k].lerp_(v.detach(), 1 - d)

    @torch.no_grad()
    def swap(self):
        """Exchange live and averaged weights (call twice to restore)."""
        for k, v in self.params.items():
            tmp = v.detach().clone()
            v.copy_(self.shadow[k])
            self.shadow[k] = tmp


def optimizer_step(loss, opt, sched, ema, params: dict, step: int) -> None:
    """Backward, clip the gradient norm at 1, step the optimiser and schedule, update the EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    sched.step()
    ema.update(step)


def named_params(modules: dict) -> dict:
    return {f"{m}.{k}": p for m, mod in modules.items() for k, p in mod.named_parameters()}


def lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    """Linear warm-up, then constant or a cosine decay to 10% at ``total`` steps (annealing the
    learning rate at the end lowers the final loss noticeably at these small step counts)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(total - warmup, 1))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))
    return factor


def model_state(model) -> dict:
    return {f"{name}.{k}": v for name in ("unet", "vae", "image_encoder", "projection")
            for k, v in getattr(model, name).state_dict().items()}


def load_model_state(model, state: dict) -> None:
    for name in ("unet", "vae", "image_encoder", "projection"):
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        getattr(model, name).load_state_dict(sub)


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
    from tqdm import tqdm

    for name, module in trainable.items():
        module.train().requires_grad_(True)
    params = named_params(trainable)
    groups = [{"params": [p for k, p in params.items() if not k.startswith("projection.")], "lr": args.lr},
              {"params": list(trainable["projection"].parameters()), "lr": 10 * args.lr}]  # Zero123: 10x lr
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps, args.lr_schedule))
    ema = EMA(params, args.ema_decay)
    step, elapsed = ckpt.get("step", 0), ckpt.get("elapsed", 0.0)
    if ckpt.get("stage") == "diffusion" and "opt" in ckpt:
        opt.load_state_dict(ckpt["opt"])
        if "sched" in ckpt:
            sched.load_state_dict(ckpt["sched"])
        if "ema" in ckpt:
            ema.shadow = {k: v.clone() for k, v in ckpt["ema"].items()}
    log("encoding the dataset with the frozen VAE ...")
    mean, std = encode_dataset(model, data.images)
    n, v = data.images.shape[:2]
    g = torch.Generator().manual_seed(args.seed * 1000 + step)
    t0 = time.time() - elapsed
    losses = ckpt.setdefault("losses", [])
    bar = tqdm(total=args.steps, initial=step, desc="diffusion", mininterval=5)
    while step < args.steps and not out_of_time(t0, args.max_minutes):
        obj = torch.randint(0, n, (args.batch_size,), generator=g)
        cond = torch.randint(0, v, (args.batch_size,), generator=g)
        target = (cond + torch.randint(1, v, (args.batch_size,), generator=g)) % v  # a different view
        pose = pair_poses(data.positions, obj, cond, target)
        cond_01 = data.images[obj, cond].float() / 255
        loss = diffusion_loss(model, cond_01, mean[obj, cond], mean[obj, target], std[obj, target], pose, g)
        optimizer_step(loss, opt, sched, ema, params, step)
        step += 1
        losses.append([step, loss.item()])
        bar.update(1)
        bar.set_postfix(loss=f"{sum(x[1] for x in losses[-50:]) / len(losses[-50:]):.4f}")
        last = step >= args.steps or out_of_time(t0, args.max_minutes)
        if step % args.ckpt_every == 0 or last:
            _save_ckpt(args, model, ckpt, stage="diffusion", step=step, elapsed=time.time() - t0,
                       opt=opt.state_dict(), sched=sched.state_dict(), ema=ema.shadow)
            _write_loss_csv(args.out, losses)
        if heldout is not None and args.sample_every > 0 and (step % args.sample_every == 0 or last):
            ema.swap()
            _sample_grid(model, heldout, os.path.join(args.out, "samples", f"{step:06d}.png"))
            ema.swap()
    bar.close()
    ema.swap()  # the saved model holds the averaged weights
    ckpt.update(step=step, elapsed=time.time() - t0)
    log(f"diffusion: {step} steps in {ckpt['elapsed'] / 60:.1f} min")


def _save_ckpt(args, model, ckpt: dict, **update) -> None:
    ckpt.update(update)
    ckpt["model"] = model_state(model)
    ckpt["scaling_factor"] = float(model.vae.config.scaling_factor)
    save_torch(os.path.join(args.out, "ckpts", "last.ckpt"), ckpt)


def _write_loss_csv(out: str, losses: list) -> None:
    rows, window = ["step,loss,loss_avg100"], []
    for step, loss in losses:
        window = (window + [loss])[-100:]
        if step % 50 == 0:
            rows.append(f"{step},{loss:.5f},{sum(window) / len(window):.5f}")
    write_text(os.path.join(out, "loss.csv"), "\n".join(rows) + "\n")


def _sample_grid(model, heldout, path: str, max_objects: int = 6) -> None:
    """Rows: input | GT +90 | model +90 | GT +180 | model +180, for a few held-out objects."""
    from lift3d.training.nvs_eval import bench_tensors
    from lift3d.zero123.nvs import sample
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


def _replace_model_folder(model, path: str) -> None:
    if os.path.isfile(os.path.join(path, "model_index.json")):
        import shutil

        shutil.rmtree(path)  # a model folder written earlier is replaced
    model.save_pretrained(path)


def export_checkpoint(args) -> int:
    """The model of a run's last checkpoint (EMA weights in the diffusion stage) as a model folder."""
    from lift3d.training.arch import build_model

    path = os.path.join(args.out, "ckpts", "last.ckpt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; --out must be a train-zero123 run folder")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if args.from_pretrained:
        from lift3d.zero123 import Zero123Model

        model = Zero123Model.from_pretrained(args.from_pretrained, torch_dtype=torch.float32)
    else:
        model = build_model(ckpt["args"].get("size", args.size))
    load_model_state(model, ckpt["model"])
    model.vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    with torch.no_grad():
        params = named_params({n: getattr(model, n) for n in ("unet", "projection", "image_encoder")})
        for k, v in ckpt.get("ema", {}).items():
            params[k].copy_(v)
    load_decoder(model.vae, os.path.join(args.out, "ckpts", "decoder.ckpt"))
    _replace_model_folder(model, args.model_out or os.path.join(args.out, "model"))
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

    ckpt_path = os.path.join(args.out, "ckpts", "last.ckpt")
    ckpt = {}
    if args.resume or args.decoder_only:
        if not os.path.isfile(ckpt_path):
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        log(f"resuming: stage {ckpt['stage']}, vae step {ckpt.get('vae_step', 0)}, step {ckpt.get('step', 0)}")

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
        load_model_state(model, ckpt["model"])
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
    _replace_model_folder(model, args.model_out)
    log(f"saved {args.model_out}")
    return 0


def main(argv=None) -> int:
    """``lift3d train-zero123 ...`` (wired in lift3d/cli.py) and ``python -m lift3d.training.train_zero123``."""
    return train_zero123(argv)


if __name__ == "__main__":
    raise SystemExit(main())
