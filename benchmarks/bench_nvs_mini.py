"""Novel views of a Zero123 model on held-out objects vs two baselines, printed as a table.

For every held-out object of a dataset (layout: lift3d/training/data.py) the input view is at
elevation 30°, and the targets are the ground-truth renders at azimuth +90° and +180°. Scores:
PSNR and SSIM (Gaussian 11x11, σ 1.5) of
- the model's DDIM views (guidance scale, steps as given; the mean of --seeds samples, and the first
  sample alone),
- "copy": the input view itself,
- "mean": the mean of all training views (a fixed image, the best constant guess in MSE).

    python benchmarks/bench_nvs_mini.py --model lift3d/assets/zero123-mini --data /work/zero123_mini/data
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lift3d.training.data import MultiViewSet  # noqa: E402
from lift3d.evaluation.image_metrics import psnr, ssim  # noqa: E402
from lift3d.training.nvs_eval import bench_tensors  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join("lift3d", "assets", "zero123-mini"))
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1, as `lift3d nvs`; 0: deterministic)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write results.json and grid.png here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lift3d.zero123.sampling import sample
    from lift3d.zero123 import Zero123Model

    model = Zero123Model.from_pretrained(args.model, torch_dtype=torch.float32)
    heldout = MultiViewSet(args.data, "heldout")
    cond, targets, poses = bench_tensors(heldout)
    offsets = next(iter(heldout.bench.values()))["offsets"]
    train = MultiViewSet(args.data, "train")
    mean_image = train.images.float().mean((0, 1)) / 255

    t0 = time.time()
    k = len(cond)
    preds = torch.zeros_like(targets)
    for seed in range(args.seeds):
        views = sample(model, model.encode_condition(cond.repeat(len(offsets), 1, 1, 1)),
                       poses.transpose(0, 1).reshape(-1, 4), steps=args.steps, scale=args.guidance, eta=args.eta,
                       generator=torch.Generator().manual_seed(seed))
        views = views.reshape(len(offsets), k, *views.shape[1:]).transpose(0, 1)
        first = views if seed == 0 else first
        preds += views / args.seeds
    sample_time = time.time() - t0
    with torch.no_grad():  # the VAE's reconstruction of the targets: the ceiling of any latent model
        flat = targets.reshape(-1, *targets.shape[2:])
        recon = model.decode(model.encode(flat, sample=False)).clamp(0, 1).reshape(targets.shape)

    results = {"objects": list(heldout.bench), "model": args.model, "ddim_steps": args.steps,
               "guidance_scale": args.guidance, "eta": args.eta, "seeds": args.seeds, "seconds_per_view": sample_time / (k * len(offsets) * args.seeds),
               "offsets": {}}
    for j, off in enumerate(offsets):
        gt = targets[:, j]
        methods = {"model": preds[:, j], "model (1 sample)": first[:, j], "copy input": cond,
                   "mean train image": mean_image.expand_as(gt),
                   "(VAE reconstruction of the GT)": recon[:, j]}
        results["offsets"][off] = {name: {"psnr": psnr(x, gt).mean().item(), "ssim": ssim(x, gt).mean().item(),
                                          "psnr_per_object": psnr(x, gt).tolist()} for name, x in methods.items()}

    print(f"{k} held-out objects, DDIM {args.steps} steps (eta {args.eta}), guidance {args.guidance}, mean of {args.seeds} samples "
          f"({results['seconds_per_view']:.2f} s per view)")
    print("| azimuth offset | method | PSNR (dB) | SSIM |")
    print("|---|---|---|---|")
    for off, rows in results["offsets"].items():
        for name, r in rows.items():
            print(f"| +{off}° | {name} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    for off, rows in results["offsets"].items():
        margin = rows["model"]["psnr"] - max(rows["copy input"]["psnr"], rows["mean train image"]["psnr"])
        results["offsets"][off]["margin_db"] = margin
        print(f"+{off}°: model beats the best baseline by {margin:+.2f} dB PSNR ({'PASS' if margin >= 1 else 'FAIL'} at 1 dB)")
    if args.out:
        from lift3d.utils.images import image_grid
        from lift3d.utils.io import save_image, write_json

        write_json(os.path.join(args.out, "results.json"), results)
        tiles = []
        for i in range(k):
            tiles += [cond[i]] + [x for j in range(len(offsets)) for x in (targets[i, j], preds[i, j])]
        save_image(os.path.join(args.out, "grid.png"), image_grid([t.permute(1, 2, 0) for t in tiles], 1 + 2 * len(offsets)))
    return results


if __name__ == "__main__":
    main()
