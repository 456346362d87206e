"""Cascade-Zero123 against its base model: novel views on held-out objects, and their consistency.

For every held-out object of a dataset (layout: lift3d/training/data.py) the input is the bench
view (elevation 30°). Both methods produce views at azimuth +45° ... +315° (every 45°, same
elevation and distance), one DDIM sample per view and seed (and the mean of the seeds' samples):
- base: the Zero123 model alone;
- cascade: self-prompts from the base (the refiner's nearby offsets), then the refiner, with the
  base's view of the same target as the coarse token (``--coarse base-view``, as `lift3d nvs`) or
  no coarse token (``--coarse none``).
Scores:
- PSNR / SSIM at +90° and +180° against the ground-truth renders (mean over objects and seeds);
- consistency: leave-one-out visual-hull silhouette IoU (lift3d.training.nvs_eval.hull_consistency):
  each generated view's silhouette against the hull carved from the input and the other 7 views.
  Perfectly consistent views of a box score about 0.8 to 0.93 with this 8-view ring (the hull of 8
  views is looser than the object), so compare the two methods, not against 1.

Diagnostic ``--oracle-prompts``: the self-prompts are replaced by ground-truth renders of the nearby
views, which tells a weak refiner from weak prompts.

    python benchmarks/bench_nvs_cascade.py --data DATA --refiner lift3d/assets/cascade-mini-refiner
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
from lift3d.training.nvs_eval import hull_consistency, silhouettes  # noqa: E402

OFFSETS = [45.0 * k for k in range(1, 8)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=os.path.join("lift3d", "assets", "zero123-mini"))
    p.add_argument("--refiner", default=os.path.join("lift3d", "assets", "cascade-mini-refiner"))
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--refiner-guidance", type=float, default=None,
                   help="the refiner's CFG scale (default --guidance); its unconditional half keeps the self-prompts")
    p.add_argument("--prompt-steps", type=int, default=None, help="DDIM steps of the self-prompts (default --steps)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta of the views (1, as `lift3d nvs`)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-objects", type=int, default=None)
    p.add_argument("--coarse", choices=("base-view", "none"), default="base-view",
                   help="the refiner's coarse target token: the base's view of the target, or none (zero embedding)")
    p.add_argument("--oracle-prompts", action="store_true",
                   help="diagnostic: replace the self-prompts by ground-truth renders of the nearby views (re-made "
                        "from the dataset generator's held-out sources), to separate the refiner from its prompts")
    p.add_argument("--out", default=None, help="write results.json and grid.png here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lift3d.cameras import Cameras
    from lift3d.zero123 import Zero123Model
    from lift3d.cameras import zero123_pose_vectors
    from lift3d.zero123.cascade import (CascadeLayout, cascade_sample, encode_cascade_condition, generate_prompts,
                                       nearby_views)
    from lift3d.zero123.sampling import sample

    base = Zero123Model.from_pretrained(args.base, torch_dtype=torch.float32)
    refiner = Zero123Model.from_pretrained(args.refiner, torch_dtype=torch.float32)
    nearby = CascadeLayout.load(args.refiner).nearby
    heldout = MultiViewSet(args.data, "heldout")
    ids = list(heldout.bench)[:args.max_objects]
    size = heldout.size

    refiner_scale = args.guidance if args.refiner_guidance is None else args.refiner_guidance
    sources = {}
    if args.oracle_prompts:
        from lift3d.training.data import object_sources

        sources = {object_id: make for object_id, split, make in object_sources(0, 0) if split == "heldout"}
    t0 = time.time()
    rows = {name: {90: [], 180: []} for name in ("base", "cascade", "base, mean of seeds", "cascade, mean of seeds")}
    consistency = {"base": [], "cascade": []}
    tiles = []
    for n, object_id in enumerate(ids):
        b = heldout.bench[object_id]
        images = b["images"].float() / 255
        c2w = torch.tensor([v["c2w"] for v in b["cameras"]], dtype=torch.float32)
        cams = Cameras(c2w, torch.full((len(c2w),), heldout.fovy_deg), size, size)
        view = cams.spherical[0]
        gt = {int(float(off)): images[1 + j] for j, off in enumerate(b["offsets"])}
        x = images[:1]
        targets = view[None] + torch.tensor([[0.0, off, 0.0] for off in OFFSETS])
        ring = Cameras.from_spherical([float(view[0])] * 8, [float(view[1]) + off for off in [0.0] + OFFSETS],
                                      float(view[2]), heldout.fovy_deg, size, size)
        if args.oracle_prompts:  # the same for every seed: rendered once
            prompt_views = nearby_views(view, nearby)
            prompts = oracle_prompts(sources[object_id], prompt_views, heldout.fovy_deg, size)
        sums = {"base": 0.0, "cascade": 0.0}
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(1000 * n + seed)
            base_views = sample(base, base.encode_condition(x.expand(len(targets), -1, -1, -1)),
                                zero123_pose_vectors(targets, view[None]), args.steps, args.guidance, eta=args.eta, generator=g)
            if not args.oracle_prompts:
                prompts, prompt_views = generate_prompts(base, x, view, nearby, args.prompt_steps or args.steps, args.guidance,
                                                         seed=1000 * n + seed)
            cond = encode_cascade_condition(refiner, x, view, prompts, prompt_views)
            refined = cascade_sample(refiner, cond, targets, args.steps, refiner_scale, coarse_01=base_views if args.coarse == "base-view" else None, eta=args.eta,
                                     generator=torch.Generator().manual_seed(1000 * n + seed + 500))
            for name, views in (("base", base_views), ("cascade", refined)):
                sums[name] = sums[name] + views / args.seeds
                score(rows[name], views, gt)
                masks = silhouettes(torch.cat([x, views]))
                consistency[name].append(hull_consistency(masks, ring).mean().item())
            if seed == 0 and n < 8:
                tiles.append([x[0], *prompts, gt[90], base_views[1], refined[1], gt[180], base_views[3], refined[3]])
        for name, views in sums.items():  # the mean of the seeds' views: closer to the posterior mean
            score(rows[f"{name}, mean of seeds"], views, gt)
        print(f"{n + 1}/{len(ids)} objects ({time.time() - t0:.0f} s)", flush=True)

    def mean(values):
        return sum(values) / max(1, len(values))

    def fmt(value):
        return "" if value is None else f"{value:.3f}"

    results = {"objects": ids, "base": args.base, "refiner": args.refiner, "ddim_steps": args.steps,
               "guidance_scale": args.guidance, "refiner_guidance_scale": refiner_scale, "eta": args.eta, "coarse": args.coarse, "oracle_prompts": args.oracle_prompts, "seeds": args.seeds, "nearby": nearby, "seconds": time.time() - t0,
               "scores": {name: {str(off): {"psnr": mean([r[0] for r in rows[name][off]]),
                                            "ssim": mean([r[1] for r in rows[name][off]])} for off in (90, 180)}
                          for name in rows},
               "consistency": {name: mean(v) for name, v in consistency.items()}}
    print(f"{len(ids)} held-out objects x {args.seeds} seeds, DDIM {args.steps} steps (eta {args.eta}), "
          f"guidance {args.guidance} (refiner {refiner_scale}), coarse token: {args.coarse}")
    print("| method | +90° PSNR | +90° SSIM | +180° PSNR | +180° SSIM | hull consistency |")
    print("|---|---|---|---|---|---|")
    for name in rows:
        s = results["scores"][name]
        print(f"| {name} | {s['90']['psnr']:.2f} | {s['90']['ssim']:.3f} | {s['180']['psnr']:.2f} | "
              f"{s['180']['ssim']:.3f} | {fmt(results['consistency'].get(name))} |")
    for off in (90, 180):  # paired over (object, seed): the same input, prompts' seed and target
        diffs = torch.tensor([c[0] - b[0] for c, b in zip(rows["cascade"][off], rows["base"][off])])
        se = (diffs.std() / len(diffs) ** 0.5).item() if len(diffs) > 1 else float("nan")
        results["scores"]["cascade"][str(off)]["psnr_gain_vs_base"] = {"mean": diffs.mean().item(), "se": se}
        print(f"+{off}°: cascade - base PSNR {diffs.mean().item():+.2f} ± {se:.2f} dB (standard error, {len(diffs)} pairs)")
    if args.out:
        from lift3d.utils.images import image_grid
        from lift3d.utils.io import save_image, write_json

        write_json(os.path.join(args.out, "results.json"), results)
        flat = [t.permute(1, 2, 0) for row in tiles for t in row]
        save_image(os.path.join(args.out, "grid.png"), image_grid(flat, len(tiles[0])))
    return results


def score(rows: dict, views: torch.Tensor, gt: dict) -> None:
    """Append (PSNR, SSIM) of the ring views (7, 3, H, W) at +90° and +180° to ``rows[offset]``."""
    for off in (90, 180):
        pred, target = views[OFFSETS.index(float(off))][None], gt[off][None]
        rows[off].append((psnr(pred, target).item(), ssim(pred, target).item()))


def oracle_prompts(make_mesh, prompt_views: torch.Tensor, fovy_deg: float, size: int) -> torch.Tensor:
    """Ground-truth renders (P, 3, H, W) in [0, 1] on white of the object at ``prompt_views`` (P, 3)."""
    from lift3d.cameras import Cameras
    from lift3d.mesh import normalize_mesh
    from lift3d.training.data import on_white, render_views

    mesh, _, _ = normalize_mesh(make_mesh())
    v = prompt_views.tolist()
    cams = Cameras.cat([Cameras.from_spherical(e, [a], d, fovy_deg, size, size) for e, a, d in v])
    rgba = torch.from_numpy(render_views(mesh, cams)).permute(0, 3, 1, 2).float() / 255
    return on_white(rgba)


if __name__ == "__main__":
    main()
