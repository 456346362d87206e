"""Cost of one training step of the Zero123 recipes with a full-size (random-weight) Zero123.

Runs the real system (``image-to-3d``) on the config's field and renderer with the guidance's
model replaced by a Zero123-shaped model with random weights (none can be downloaded), and splits
each step into: rendering (every ``system.render`` call: reference, guidance and near views), the
UNet (``predict_noise``: one CFG batch of 2), the VAE (decode of the latent reference render, or
encode of RGB renders), the rest of the forward pass, the backward pass and the optimiser step.
Also the resident memory: the model alone, and the peak during a training step.

    python benchmarks/bench_zero123_step.py                              # 3drec SJC recipe, full size
    python benchmarks/bench_zero123_step.py --config configs/zero123-sds.yaml --size tiny \
        data.batch_size=1 data.height=64 data.width=64 system.renderer.num_samples_per_ray=128
(trailing key=value items override the config, as on the launch.py command line).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lift3d.config import load_config  # noqa: E402
from lift3d.registry import find  # noqa: E402
from lift3d.systems.base import RunContext  # noqa: E402
from lift3d.zero123.random_model import random_zero123  # noqa: E402


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class PeakRSS:
    """Highest resident set size while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak, self._stop = rss_gib(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_gib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gib())


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time is what to compare on a shared machine: other
    processes inflate wall time but not this process's CPU time."""
    return time.perf_counter(), time.process_time()


def add(totals: dict, bucket: str, start: tuple[float, float]) -> None:
    now = clock()
    totals[bucket][0] += now[0] - start[0]
    totals[bucket][1] += now[1] - start[1]


def timed(obj, attr: str, bucket: str, totals: dict) -> None:
    """Replace ``obj.attr`` by a wrapper that adds its wall and CPU time to ``totals[bucket]``."""
    original = getattr(obj, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            add(totals, bucket, start)

    setattr(obj, attr, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/zero123-sjc.yaml")
    parser.add_argument("--image", default="examples/mushroom_rgba.png")
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = load_config(args.config, [f"image={args.image}"] + args.overrides)
    data = find(cfg.data_type, "data")(cfg.data, path="data")
    reference = data.reference_view()
    system = find(cfg.system_type, "system")(cfg.system, path="system")
    system.setup(data, RunContext(device=torch.device("cpu")), train=False)
    guidance = find(cfg.system.guidance_type, "guidance")(cfg.system.guidance, path="system.guidance")
    base_rss = rss_gib()
    t = time.perf_counter()
    guidance.prior.model = random_zero123(args.size)
    build_s = time.perf_counter() - t
    model_rss = rss_gib() - base_rss
    guidance.prior.set_reference(reference)
    system.guidance = guidance
    optimizer = system.configure_optimizer()

    totals: dict = defaultdict(lambda: [0.0, 0.0])
    timed(system, "render", "render", totals)
    timed(guidance.prior.model, "predict_noise", "unet", totals)
    timed(guidance.prior.model, "decode", "vae", totals)
    timed(guidance.prior.model, "encode", "vae", totals)

    peak = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            totals.clear()
        system.update_step(step)
        data.update_step(step)
        views = data.sample_views()
        with PeakRSS() as mem:
            start = clock()
            out = system.training_step(views, step)
            add(totals, "forward", start)
            start = clock()
            out["loss"].backward()
            add(totals, "backward", start)
            start = clock()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            add(totals, "optimizer", start)
        if step >= args.warmup:
            peak = max(peak, mem.peak)

    n = args.steps
    per = {k: (w / n, c / n) for k, (w, c) in totals.items()}
    per["other"] = tuple(per["forward"][i] - per["render"][i] - per["unet"][i] - per["vae"][i] for i in (0, 1))
    step = tuple(per["forward"][i] + per["backward"][i] + per["optimizer"][i] for i in (0, 1))
    rows = [("render (all views, forward)", "render"), ("guidance UNet (CFG batch of 2)", "unet"),
            ("VAE (decode / encode, forward)", "vae"), ("other forward (losses, pose, ...)", "other"),
            ("backward", "backward"), ("optimizer step", "optimizer")]
    print(f"config {args.config}  model {args.size}  threads {torch.get_num_threads()}  "
          f"guidance views/step {len(views)} at {views.height}x{views.width}  ({n} steps averaged)")
    print(f"model build {build_s:.1f} s, model resident {model_rss:.2f} GiB")
    print(f"  {'':36s} {'wall s':>8s} {'%':>6s} {'CPU s':>8s} {'%':>6s}")
    for name, key in rows + [("step total", None)]:
        w, c = step if key is None else per[key]
        print(f"  {name:36s} {w:8.2f} {100 * w / step[0]:6.1f} {c:8.2f} {100 * c / step[1]:6.1f}")
    print(f"share of a step that is not the UNet forward: {100 * (1 - per['unet'][0] / step[0]):.1f} % of wall time, "
          f"{100 * (1 - per['unet'][1] / step[1]):.1f} % of CPU time")
    print(f"peak RSS during a training step: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
