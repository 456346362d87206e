"""Which coarse-target token should the ``cascade-zero123`` guidance use? A denoising measurement.

Score distillation asks the refiner for ε̂ at a noisy render of the target view; the better ε̂
matches the true noise of a clean ground-truth view, the better the gradient. On held-out objects
(source = the first random view, targets = the other views, self-prompts from the base model), for
t on a grid over [20, 980] and the same noise for every option, this prints the refiner's ε-MSE
(conditional branch, no CFG) with the coarse token:
- ``none``: a zero embedding;
- ``estimate``: the base model's one-step estimate x̂₀ of the same noisy latent;
- ``render (ideal)``: the ground-truth target image itself, i.e. a render of a field that is
  already right (an upper bound for ``render``; early in a run the render is far worse);
and the base model alone for reference. Two more rows (coarse ``none``) tell whether the refiner
uses its prompt tokens at all: the self-prompts' embeddings zeroed, and another object's self-prompts.

    python benchmarks/bench_cascade_coarse.py --data DATA --refiner lift3d/assets/cascade-mini-refiner
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=os.path.join("lift3d", "assets", "zero123-mini"))
    p.add_argument("--refiner", default=os.path.join("lift3d", "assets", "cascade-mini-refiner"))
    p.add_argument("--data", required=True)
    p.add_argument("--prompt-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-objects", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lift3d.training.data import MultiViewSet
    from lift3d.zero123 import Zero123Model
    from lift3d.cameras import position_to_spherical, zero123_pose_vectors
    from lift3d.zero123.cascade import CascadeLayout, embed, encode_cascade_condition, generate_prompts, refiner_noise

    base = Zero123Model.from_pretrained(args.base, torch_dtype=torch.float32)
    refiner = Zero123Model.from_pretrained(args.refiner, torch_dtype=torch.float32)
    nearby = CascadeLayout.load(args.refiner).nearby
    data = MultiViewSet(args.data, "heldout")
    ts = torch.arange(20, 1000, 80)
    totals = {"base alone": 0.0, "none": 0.0, "estimate": 0.0, "render (ideal)": 0.0,
              "none, prompts zeroed": 0.0, "none, another object's prompts": 0.0}
    count = 0
    with torch.no_grad():
        n_objects = min(len(data), args.max_objects or len(data))
        conds = []
        for n in range(n_objects):
            x, view = data.images[n, :1].float() / 255, position_to_spherical(data.positions[n, :1])[0]
            prompts, prompt_views = generate_prompts(base, x, view, nearby, args.prompt_steps, 3.0, seed=n)
            conds.append(encode_cascade_condition(refiner, x, view, prompts, prompt_views))
        for n in range(n_objects):
            images = data.images[n].float() / 255                         # (V, 3, H, W)
            views = position_to_spherical(data.positions[n])
            x, view = images[:1], views[0]
            cond = conds[n]
            zeroed = replace(cond, prompt_embeddings=torch.zeros_like(cond.prompt_embeddings))
            swapped = replace(cond, prompt_embeddings=conds[(n + 1) % n_objects].prompt_embeddings)
            base_cond = base.encode_condition(x)
            targets, target_views = images[1:], views[1:]
            z0 = base.encode(targets, sample=False)
            ideal = embed(refiner, targets)
            for t in ts:
                g = torch.Generator().manual_seed(int(t) + 1000 * n)
                noise = torch.randn(z0.shape, generator=g)
                a = base.alphas_cumprod[t]
                noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
                eps_base = base.predict_noise(noisy, t, base_cond, zero123_pose_vectors(target_views, view[None]), 1.0)
                x0 = (noisy - (1 - a).sqrt() * eps_base) / a.sqrt()
                estimate = embed(refiner, base.decode(x0).clamp(0, 1))
                totals["base alone"] += (eps_base - noise).pow(2).mean().item()
                for name, c, coarse in (("none", cond, None), ("estimate", cond, estimate), ("render (ideal)", cond, ideal),
                                        ("none, prompts zeroed", zeroed, None),
                                        ("none, another object's prompts", swapped, None)):
                    eps = refiner_noise(refiner, noisy, t, c, target_views, 1.0, coarse)
                    totals[name] += (eps - noise).pow(2).mean().item()
                count += 1
            print(f"{n + 1}/{n_objects} objects", flush=True)
    results = {k: v / count for k, v in totals.items()}
    print(f"{n_objects} held-out objects x {data.images.shape[1] - 1} targets x {len(ts)} noise levels")
    print("| coarse token | ε-MSE (lower is better) |")
    print("|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.5f} |")
    return results


if __name__ == "__main__":
    main()
