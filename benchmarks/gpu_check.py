"""GPU check: every shipped recipe for a few steps on CUDA with a full-size random Zero123, in fp32 and
fp16 (``system.guidance.dtype``), printing seconds per step and peak CUDA memory as a Markdown table.

    python benchmarks/gpu_check.py                 # about 5 minutes on one recent GPU
    python benchmarks/gpu_check.py --steps 3 zero123-sds
    python benchmarks/gpu_check.py --gs-steps 0 --no-raster zero123-sds     # the table alone

Two more checks follow the table (skip them with ``--gs-steps 0`` / ``--no-raster``):
- ``zero123-gs-cpu`` (3D Gaussians) for ``--gs-steps`` steps per dtype, run as the recipes above, with its
  densification moved to every other step from step 1 (its schedule starts at step 40) so that clone, split
  and prune run on the GPU too: seconds per step, peak CUDA memory and the Gaussians before and after;
- the Gaussian rasterizer (lift3d/renderers/gaussian_raster.py): gsplat's CUDA kernels against the PyTorch
  path (``backend="torch"``) on one random scene on CUDA, the largest differences of comp_rgb, opacity, depth
  and of the means' gradient, and the seconds of each (forward; forward + backward); "not installed" when
  gsplat does not import (its first call may build its kernels: timed apart).

The model is built once (``random_zero123("full")``) and saved as a model folder under
``$LIFT3D_CACHE_DIR/bench/zero123-full-random`` (shared with bench_recipes.py). Each recipe keeps its
published sizes; its milestones are moved to steps 1, 2, ... so the steps run through all of them
(``--steps`` per milestone, the first of a recipe not timed). Without CUDA it stops at once, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_recipes import CONFIGS, build_model, model_dir, overrides_for, train_step  # noqa: E402

GS_CONFIG = "zero123-gs-cpu"
# Densify every other step from step 1 (its recipe: every 40 from step 40), so a few steps run through it.
GS_OVERRIDES = ["system.geometry.densify_from=1", "system.geometry.densify_every=2"]


def run(name: str, dtype: str, model: str, steps: int, out: str, extra: tuple = ()) -> list[dict]:
    import torch

    from lift3d.config import load_config
    from lift3d.runner import Experiment

    overrides = overrides_for(name, model, out) + ["trainer.device=cuda", *extra]
    if name != "oracle":
        overrides.append(f"system.guidance.dtype={dtype}")
    cfg = load_config(name, overrides)
    stages = len(cfg.data.get("resolution_milestones", []) or []) + 1
    if stages > 1:
        cfg.data.resolution_milestones = [steps * k for k in range(1, stages)]
    exp = Experiment(cfg)
    system, data = exp.system, exp.data
    system.setup(data, exp.context(), train=True)
    optimizer = system.configure_optimizer()
    system.train()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for step in range(steps * stages + 1):
        data.update_step(step)
        system.update_step(step)
        views = data.sample_views(generator).to(exp.device)
        points = getattr(system.geometry, "n_points", None)   # point-based geometries (3D Gaussians)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_step(system, optimizer, views, step)
        torch.cuda.synchronize()
        if step:   # step 0 warms up kernels and allocator
            rows.append({"config": name, "dtype": dtype, "milestone": f"{len(views)}x{views.height}px",
                         "s": time.perf_counter() - start, "peak": torch.cuda.max_memory_allocated() / 2**30,
                         "points": (points, getattr(system.geometry, "n_points", None))})
    del system, exp, optimizer
    torch.cuda.empty_cache()
    return rows


def _timed(fn, reps: int) -> float:
    """Mean seconds of ``fn()`` on CUDA over ``reps`` calls (after one call that warms it up)."""
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def compare_rasterizers(n: int = 5000, views: int = 4, size: int = 256, reps: int = 5) -> None:
    """gsplat's rasterizer against the PyTorch path on one random scene on CUDA (DreamGaussian-sized: 5k
    Gaussians; 4 views at 256 px): largest differences of the outputs and of the means' gradient, and timings."""
    import torch

    from lift3d.cameras import Cameras
    from lift3d.renderers import gaussian_raster as gr

    print(f"\nGaussian rasterizer on CUDA: gsplat against backend=torch ({n} Gaussians, {views} views at {size} px)")
    gsplat = gr._gsplat()
    if gsplat is None:
        print("gsplat is not installed (or does not import): only the PyTorch path runs on CUDA here")
        return
    version = getattr(gsplat, "__version__", "?")
    note = ""
    if tuple(int(v) for v in version.split(".")[:2] if v.isdigit()) >= (1, 5):
        note = " (>= 1.5 draws with MAX_ALPHA 0.99 and per-axis radii: expect small differences)"
    print(f"gsplat {version}{note}")
    g = torch.Generator().manual_seed(0)
    means = torch.randn(n, 3, generator=g) * 0.2
    scales = torch.rand(n, 3, generator=g) * 0.03 + 0.005
    quats = torch.randn(n, 4, generator=g)
    opacities = torch.rand(n, generator=g) * 0.8 + 0.1
    colors = torch.rand(n, 3, generator=g)
    scene = [t.cuda() for t in (means, scales, quats, opacities, colors)]
    cams = Cameras.from_spherical(torch.full((views,), 15.0), torch.arange(views) * 360.0 / views, 1.5, 49.1,
                                  size, size).to("cuda")
    bg = torch.ones(3).cuda()
    weights = {key: torch.rand(views, size, size, c, generator=g).cuda()
               for key, c in (("comp_rgb", 3), ("opacity", 1), ("depth", 1))}

    def render(backend: str, grad: bool):
        m = scene[0].detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = gr.rasterize(m, *scene[1:], cams, bg, background_depth=10.0, backend=backend)
            if grad:   # a loss on every output, so the means' gradient comes through all of them
                sum((out[k] * w).sum() for k, w in weights.items()).backward()
        return out, m.grad

    results, rows = {}, []
    for backend in ("torch", "gsplat"):
        try:
            start = time.perf_counter()
            render(backend, False)
            torch.cuda.synchronize()
            first = time.perf_counter() - start            # gsplat may build its kernels here (minutes, once)
            forward = _timed(lambda: render(backend, False), reps)
            backward = _timed(lambda: render(backend, True), reps)
            results[backend] = render(backend, True)
        except Exception as e:   # a broken build must not hide the rest of the check
            print(f"backend={backend} failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            return
        rows.append(f"| {backend} | {first:.3f} | {forward * 1e3:.1f} | {backward * 1e3:.1f} |")
    print("| backend | first call s | forward ms | forward + backward ms |\n|---|---|---|---|")
    print("\n".join(rows))
    (a, ga), (b, gb) = results["torch"], results["gsplat"]
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in ("comp_rgb", "opacity", "depth")}
    diffs["means grad"] = (ga - gb).abs().max().item()
    scale = ga.abs().max().item()
    print("max |torch - gsplat|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f" (means grad relative to its largest entry {diffs['means grad'] / max(scale, 1e-30):.2e}); "
          f"radii differ for {100 * (a['radii'] != b['radii']).float().mean().item():.2f} % of (view, Gaussian)")


def run_gaussians(model: str, steps: int, out: str) -> None:
    """``zero123-gs-cpu`` on CUDA for ``steps`` timed steps per dtype, densifying every other step."""
    import torch

    print(f"\n{GS_CONFIG} on CUDA: {steps} steps after a warm-up one, {' '.join(GS_OVERRIDES)}")
    print("| dtype | milestone | s/step (mean) | s/step (max) | peak CUDA GiB | Gaussians |\n|---|---|---|---|---|---|")
    for dtype in ("float32", "float16"):
        try:
            rows = run(GS_CONFIG, dtype, model, steps, out, extra=tuple(GS_OVERRIDES))
        except Exception as e:   # as in the table: report, go on
            print(f"| {dtype} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''} | | | | |")
            torch.cuda.empty_cache()
            continue
        seconds = [r["s"] for r in rows]
        print(f"| {dtype} | {rows[0]['milestone']} | {sum(seconds) / len(seconds):.3f} | {max(seconds):.3f} | "
              f"{max(r['peak'] for r in rows):.2f} | {rows[0]['points'][0]} -> {rows[-1]['points'][1]} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=1, help="steps per milestone")
    parser.add_argument("--model", default="", help="a model folder (default: build the full random one)")
    parser.add_argument("--gs-steps", type=int, default=5, help=f"timed steps of {GS_CONFIG} per dtype (0: skip it)")
    parser.add_argument("--no-raster", action="store_true", help="skip the gsplat/PyTorch rasterizer comparison")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    model = args.model or model_dir()
    if not args.model:
        build_model(model)
    print("| config | dtype | milestone | s/step | peak CUDA GiB |\n|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as out:
        for name in args.configs:
            for dtype in ("float32", "float16") if name != "oracle" else ("float32",):
                try:
                    rows = run(name, dtype, model, args.steps, out)
                except Exception as e:   # one recipe failing must not hide the others
                    print(f"| {name} | {dtype} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
                    torch.cuda.empty_cache()
                    continue
                for r in rows:
                    print(f"| {r['config']} | {r['dtype']} | {r['milestone']} | {r['s']:.2f} | {r['peak']:.2f} |",
                          flush=True)
        if args.gs_steps > 0:
            run_gaussians(model, args.gs_steps, out)
    if not args.no_raster:
        compare_rasterizers()
    print(f"\nelapsed {time.perf_counter() - start:.0f} s on {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
