"""Where a training step's resident memory peaks: one step of a recipe at its last resolution milestone with
a full-size random Zero123, the peak RSS of each phase (reference and guidance renders, VAE encoder, UNet,
backward with its recomputed chunks, optimiser step), sampled every 3 ms.

    python benchmarks/step_memory_phases.py stable-zero123 --samples 32
    python benchmarks/step_memory_phases.py stable-zero123 --samples 32 --set trainer.mmap_threshold_mib=0

``--samples`` lowers ``num_samples_per_ray`` so that a 256 px step takes minutes, not half an hour; the
render's own memory is bounded by ``train_chunk_samples`` either way, but the totals are not those of the
published 512 samples (``bench_recipes.py`` measures those). A phase's peak includes what earlier phases
left resident; "/bw" marks a phase recomputed inside the backward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_recipes import build_model, model_dir, overrides_for  # noqa: E402
from bench_zero123_step import rss_gib  # noqa: E402


class PhasePeaks:
    """Peak RSS per phase label; ``phase`` is set by the code being watched."""

    def __init__(self):
        self.phase, self.peaks = "load", {}
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            phase, rss = self.phase, rss_gib()
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)
            time.sleep(0.003)

    def label(self, obj, attr: str, name: str) -> None:
        """Run ``obj.attr`` under phase ``name`` (``name/bw`` when called during backward)."""
        real = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            outer = self.phase
            self.phase = name + ("/bw" if outer.startswith("backward") else "")
            try:
                return real(*args, **kwargs)
            finally:
                self.phase = outer

        setattr(obj, attr, wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="stable-zero123")
    p.add_argument("--samples", type=int, default=0, help="num_samples_per_ray (0: the recipe's)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more config overrides")
    a = p.parse_args()
    import torch

    from lift3d.config import load_config
    from lift3d.runner import Experiment

    model = model_dir()
    build_model(model)
    watch = PhasePeaks()
    overrides = overrides_for(a.config, model, "/tmp/lift3d-step-memory") + a.set
    if a.samples:
        overrides.append(f"system.renderer.num_samples_per_ray={a.samples}")
    cfg = load_config(a.config, overrides)
    last = len(cfg.data.get("resolution_milestones", []) or [])
    if last:
        cfg.data.resolution_milestones = list(range(1, last + 1))
    exp = Experiment(cfg)
    system, data = exp.system, exp.data
    system.setup(data, exp.context(), train=True)
    optimizer = system.configure_optimizer()
    system.train()
    prior = getattr(system.guidance, "prior", None)
    if prior is not None:
        watch.label(prior, "encode", "vae encoder")
        watch.label(prior, "predict_noise", "unet")
    watch.label(system.renderer, "render_rays", "render chunk")
    watch.label(system, "render", "render")
    data.update_step(last)
    system.update_step(last)
    views = data.sample_views(torch.Generator().manual_seed(0))
    start = time.perf_counter()
    watch.phase = "forward (other)"
    out = system.training_step(views, last)
    watch.phase = "backward (other)"
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    watch.phase = "optimiser step"
    system.on_after_backward(optimizer, last)
    optimizer.step()
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    peaks = dict(watch.peaks)
    print(f"{a.config}, {len(views)} x {views.height} px, {system.renderer.cfg.num_samples_per_ray} samples per ray, "
          f"{' '.join(a.set) or 'defaults'}: {seconds:.0f} s, peak {max(peaks.values()):.2f} GiB")
    print(json.dumps({k: round(v, 3) for k, v in peaks.items()}))


if __name__ == "__main__":
    main()
