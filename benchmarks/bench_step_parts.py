"""Where the main job's time goes: a training run split into render / prior / optimiser, plus export.

Runs a config the way ``launch.py`` does (the runner's ``Experiment``: same data, system, bundled
prior, seeds), but with its own copy of the training loop so that every step can be split into
- render forward: every ``system.render`` call (reference view, guidance views);
- prior forward: the prior's ``encode`` / ``decode`` / ``predict_noise`` (the mini Zero123 for
  the CPU recipe);
- other forward: losses, camera poses, the guidance's bookkeeping;
- prior + losses backward (with the recomputation of a checkpointed VAE encoder), then render
  backward: the backward pass is run in two phases. The renders hand the losses detached copies
  of their outputs, so ``loss.backward()`` stops at the renders (losses, SJC/VAE-encoder
  backward); a second ``torch.autograd.backward`` from the render
  outputs with those gradients is the renderer's and field's backward. The gradients are the same
  as one backward pass.
- optimiser step; occupancy-grid refreshes (``update_step``); validation strips.
After training: the turntable (``test``), the mesh export and the metrics, each timed once.

Wall and process-CPU seconds are both printed; on a shared machine compare CPU seconds, and
compare two versions alternately.

    python benchmarks/bench_step_parts.py                          # the main job (zero123-sjc-cpu), all steps
    python benchmarks/bench_step_parts.py --config zero123-gs-cpu  # the same on 3D Gaussians
    python benchmarks/bench_step_parts.py --steps 100 trainer.max_steps=100
    python benchmarks/bench_step_parts.py --steps 20 --no-after resume=OUT/ckpts/last.ckpt   # from its step
(trailing key=value items override the config, as on the launch.py command line).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_zero123_step import add, clock, timed  # noqa: E402
from lift3d.config import load_config  # noqa: E402
from lift3d.runner import Experiment  # noqa: E402


def split_renders(system, totals: dict, pairs: list) -> None:
    """Time ``system.render`` and hand its callers leaf copies of the outputs (see the module doc)."""
    original = system.render

    def render(*args, **kwargs):
        start = clock()
        out = original(*args, **kwargs)
        add(totals, "render forward", start)
        if not torch.is_grad_enabled():
            return out
        cut = {}
        for key, value in out.items():
            # means2d stays in the graph: a Gaussian geometry reads its retained gradient in after_backward
            if torch.is_tensor(value) and value.requires_grad and key != "means2d":
                leaf = value.detach().requires_grad_(True)
                pairs.append((value, leaf))
                cut[key] = leaf
            else:
                cut[key] = value
        return cut

    system.render = render


def time_forward_calls(obj, names, bucket: str, totals: dict, phase: dict) -> None:
    """Add the time of ``obj.<name>(...)`` calls made in the forward pass to ``totals[bucket]``; calls
    made during backward (a checkpointed VAE encoder recomputes there) stay in the backward buckets."""
    for name in names:
        original = getattr(obj, name)
        timed(obj, name, bucket, totals)
        counted = getattr(obj, name)
        setattr(obj, name, lambda *a, _o=original, _c=counted, **k: (_c if phase["forward"] else _o)(*a, **k))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/zero123-sjc-cpu.yaml")
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the config's trainer.max_steps)")
    parser.add_argument("--no-after", action="store_true", help="skip the turntable, export and metrics")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)

    out_root = tempfile.mkdtemp(prefix="bench_step_parts_")
    cfg = load_config(args.config, [f"exp_root_dir={out_root}", "use_timestamp=false"] + args.overrides)
    exp = Experiment(cfg)
    system, data, trainer = exp.system, exp.data, exp.exp.trainer
    totals: dict = defaultdict(lambda: [0.0, 0.0])
    start = clock()
    if exp.exp.resume:   # resume=CKPT: measure from a trained state (weights, occupancy grid, optimiser)
        exp.restore(exp.exp.resume, with_optimizer=True)
        optimizer = exp.optimizer
    else:
        exp.optimizer = optimizer = system.configure_optimizer()
    first = exp.step
    steps = args.steps or trainer.max_steps - first
    system.setup(data, exp.context(), train=True)
    system.train()
    add(totals, "setup (prior load)", start)

    pairs: list = []
    split_renders(system, totals, pairs)
    phase = {"forward": False}
    time_forward_calls(system.guidance.prior, ("encode", "decode", "predict_noise"), "prior forward", totals, phase)

    evaluated = []
    for step in range(first, first + steps):
        start = clock()
        data.update_step(step)
        system.update_step(step)
        add(totals, "update_step (occupancy)", start)
        views = data.sample_views(exp.generator).to(exp.device)
        pairs.clear()
        start, phase["forward"] = clock(), True
        out = system.training_step(views, step)
        add(totals, "forward", start)
        phase["forward"] = False
        evaluated.append(getattr(system.renderer, "stats", {}).get("evaluated_fraction", 1.0))
        optimizer.zero_grad(set_to_none=True)
        start = clock()
        out["loss"].backward()
        add(totals, "prior + losses backward", start)
        start = clock()
        used = [(value, leaf.grad) for value, leaf in pairs if leaf.grad is not None]
        torch.autograd.backward([v for v, _ in used], [g for _, g in used])
        add(totals, "render backward", start)
        start = clock()
        system.on_after_backward(optimizer, step)
        optimizer.step()
        add(totals, "optimizer (and after_backward)", start)
        exp.step = step + 1
        if trainer.val_every and exp.step % trainer.val_every == 0:
            start = clock()
            exp.validate()
            add(totals, "validation strips", start)

    after = {}
    if not args.no_after:
        start = clock()
        exp.test()
        after["turntable"] = [clock()[i] - start[i] for i in (0, 1)]
        start = clock()
        exported = system.export(exp.path("export"))
        after["export"] = [clock()[i] - start[i] for i in (0, 1)]
        start = clock()
        metrics = system.metrics(exported, exp.exp.eval_protocol)
        after["metrics"] = [clock()[i] - start[i] for i in (0, 1)]
        if metrics:
            print("metrics: " + " ".join(f"{k}={metrics[k]:.4f}" for k in ("chamfer_distance", "volume_iou")
                                          if isinstance(metrics.get(k), (int, float))))

    fwd = totals["forward"]
    other = [fwd[i] - totals["render forward"][i] - totals["prior forward"][i] for i in (0, 1)]
    rows = [("render forward", totals["render forward"]), ("prior forward (VAE, UNet)", totals["prior forward"]),
            ("other forward (losses, poses)", other), ("prior + losses backward", totals["prior + losses backward"]),
            ("render backward", totals["render backward"]), ("optimizer step, after_backward", totals["optimizer (and after_backward)"]),
            ("update_step (occupancy grid)", totals["update_step (occupancy)"]),
            ("validation strips", totals["validation strips"])]
    train = [sum(r[1][i] for r in rows) for i in (0, 1)]
    drawn = (f"samples/ray {system.renderer.cfg.num_samples_per_ray}, mean evaluated fraction "
             f"{sum(evaluated) / max(len(evaluated), 1):.3f}" if hasattr(system.renderer.cfg, "num_samples_per_ray")
             else f"{getattr(system.geometry, 'n_points', '?')} Gaussians at the end")
    print(f"config {args.config} {' '.join(args.overrides)}  threads {torch.get_num_threads()}  steps {first}..{first + steps - 1}  "
          f"views/step {len(views)} at {views.height}x{views.width}, {drawn}")
    print(f"  {'training, per step':34s} {'wall ms':>9s} {'%':>6s} {'CPU ms':>9s} {'%':>6s}")
    for name, (w, c) in rows + [("step total", train)]:
        print(f"  {name:34s} {1e3 * w / steps:9.1f} {100 * w / train[0]:6.1f} {1e3 * c / steps:9.1f} "
              f"{100 * c / train[1]:6.1f}")
    prior_share = [100 * (totals["prior forward"][i] + totals["prior + losses backward"][i]) / train[i] for i in (0, 1)]
    print(f"prior share of a training step (prior forward + prior/losses backward): {prior_share[0]:.1f} % of wall, "
          f"{prior_share[1]:.1f} % of CPU; engine overhead {100 - prior_share[1]:.1f} % of CPU")
    print(f"  {'whole job':34s} {'wall s':>9s} {'%':>6s} {'CPU s':>9s} {'%':>6s}")
    job = {"setup (prior load)": totals["setup (prior load)"], "training": train, **after}
    total = [sum(v[i] for v in job.values()) for i in (0, 1)]
    for name, (w, c) in list(job.items()) + [("total", total)]:
        print(f"  {name:34s} {w:9.2f} {100 * w / total[0]:6.1f} {c:9.2f} {100 * c / total[1]:6.1f}")
    return {"train": train, "after": after, "prior_share": prior_share}


if __name__ == "__main__":
    main()
