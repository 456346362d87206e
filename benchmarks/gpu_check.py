"""GPU check: every shipped recipe for a few steps on CUDA with a full-size random Zero123, in fp32 and
fp16 (``system.guidance.dtype``), printing seconds per step and peak CUDA memory as a Markdown table.

    python benchmarks/gpu_check.py                 # about 5 minutes on one recent GPU
    python benchmarks/gpu_check.py --steps 3 zero123-sds

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


def run(name: str, dtype: str, model: str, steps: int, out: str) -> list[dict]:
    import torch

    from lift3d.config import load_config
    from lift3d.runner import Experiment

    overrides = overrides_for(name, model, out) + ["trainer.device=cuda"]
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
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_step(system, optimizer, views, step)
        torch.cuda.synchronize()
        if step:   # step 0 warms up kernels and allocator
            rows.append({"config": name, "dtype": dtype, "milestone": f"{len(views)}x{views.height}px",
                         "s": time.perf_counter() - start, "peak": torch.cuda.max_memory_allocated() / 2**30})
    del system, exp, optimizer
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=1, help="steps per milestone")
    parser.add_argument("--model", default="", help="a model folder (default: build the full random one)")
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
    print(f"\nelapsed {time.perf_counter() - start:.0f} s on {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
