"""Every shipped recipe at its published size, stepped through its resolution milestones, with a
full-size (random-weight) Zero123 loaded from a model folder: peak RSS, seconds per step and the share
of a step spent outside the UNet, per config and milestone, as a Markdown table.

    python benchmarks/bench_recipes.py                       # every config (about an hour on 2 CPU cores)
    python benchmarks/bench_recipes.py zero123-sds oracle    # some of them
    python benchmarks/bench_recipes.py --out DIR ...; python benchmarks/bench_recipes.py --table DIR
                                                             # keep each result; one table of several runs
    python benchmarks/bench_recipes.py stable-zero123 --set trainer.mmap_threshold_mib=0
                                                             # config overrides for every config run

The model (``random_zero123("full")``: 859 M UNet, 84 M VAE, CLIP ViT-L/14; for ``eschernet-sds``
``random_eschernet("full")``: the same UNet with 4 input channels, VAE, ConvNeXt-V2-tiny; for ``zero123plus-sds``
``write_random_zero123plus(DIR, "v1.2", "full")``: SD-2 UNet, VAE, OpenCLIP-H text and CLIP-H vision encoders,
the published Zero123++ layout) is built once and saved as
a kxic-layout folder under ``$LIFT3D_CACHE_DIR/bench/zero123-full-random`` (default ``~/.cache/lift3d``);
every config then runs in a subprocess of its own (one full-size process at a time), so each peak is
that config's alone. Published sizes are kept; only when things happen changes:
``data.resolution_milestones`` becomes [1, 2, ...] so step k runs milestone k, a single-stage recipe runs
two steps (the second is reported), validation and checkpoints are off, and Cascade's self-prompts take
2 DDIM steps instead of 50. Schedules are evaluated at those early steps. The ``est.`` column is the
pre-flight estimate (``lift3d/preflight.py``) the runner checks against free memory before training.
For ``zero123-sds`` two more rows: one training render (forward + backward) of the reference view at
256 and at 512 px.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_zero123_step import PeakRSS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("zero123-sds", "stable-zero123", "zero123-sjc", "cascade-zero123", "oracle", "zero123-sjc-cpu", "eschernet-sds",
           "zero123plus-sds")
ESCHERNET = ("eschernet-sds",)   # run with random_eschernet("full") (the published 6-DoF shapes) instead
ZERO123PLUS = ("zero123plus-sds",)   # run with write_random_zero123plus(..., "v1.2", "full") (published shapes)
OWN_PRIOR = ESCHERNET + ZERO123PLUS  # their model path is system.guidance.prior.pretrained_model_name_or_path
IMAGE = os.path.join(ROOT, "examples", "mushroom_rgba.png")
GT = os.path.join(ROOT, "examples", "objects", "mushroom", "meshes", "model.obj")


def model_dir(name: str = "") -> str:
    root = os.environ.get("LIFT3D_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lift3d")
    folder = "eschernet-6dof-full-random" if name in ESCHERNET else \
        "zero123plus-v1.2-full-random" if name in ZERO123PLUS else "zero123-full-random"
    return os.path.join(root, "bench", folder)


def build_model(path: str, name: str = "") -> None:
    """Save ``random_zero123("full")`` (``random_eschernet("full")`` for ESCHERNET configs) to ``path`` (in a
    subprocess: this process stays small)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return
    code = ("import sys; from lift3d.zero123.random_model import random_zero123; "
            "random_zero123('full').save_pretrained(sys.argv[1])")
    if name in ESCHERNET:
        code = ("import sys; from lift3d.eschernet.random_model import random_eschernet; "
                "random_eschernet('full').save_pretrained(sys.argv[1])")
    if name in ZERO123PLUS:
        code = ("import sys; from lift3d.zero123plus.random_model import write_random_zero123plus; "
                "write_random_zero123plus(sys.argv[1], 'v1.2', 'full')")
    tmp = path + ".partial"
    subprocess.run([sys.executable, "-c", code, tmp], check=True, cwd=ROOT)
    os.replace(tmp, path)


def overrides_for(name: str, model: str, out: str) -> list[str]:
    items = [f"exp_root_dir={out}", "use_timestamp=false", "trainer.val_every=0", "trainer.ckpt_every=0",
             "trainer.device=cpu", f"image={IMAGE}"]
    if name == "oracle":
        return items + [f"gt={GT}"]
    prior = "prior." if name in OWN_PRIOR else ""
    items.append(f"system.guidance.{prior}pretrained_model_name_or_path={model}")
    if name == "cascade-zero123":
        items += [f"system.guidance.refiner_name_or_path={model}", "system.guidance.prompt_steps=2",
                  "system.guidance.prompt_cache_dir=none"]
    return items


# --------------------------------------------------------------------------- one config (a subprocess)


def train_step(system, optimizer, views, step: int) -> None:
    """One optimiser step, as the runner takes it."""
    out = system.training_step(views, step)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    system.on_after_backward(optimizer, step)
    optimizer.step()


def weights_gib(model) -> float:
    """The model's own resident size: its parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def run_one(name: str, model: str, out: str, extra: list) -> dict:
    import torch
    from omegaconf import OmegaConf

    from lift3d.config import load_config
    from lift3d.runner import Experiment

    cfg = load_config(name, overrides_for(name, model, out) + list(extra))
    stages = len(cfg.data.get("resolution_milestones", []) or []) + 1
    if stages > 1:
        cfg.data.resolution_milestones = list(range(1, stages))
    exp = Experiment(cfg)
    system, data = exp.system, exp.data
    estimate = None
    try:
        from lift3d.preflight import estimate_step_memory
        estimate = estimate_step_memory(system, data, exp.exp.trainer.mmap_threshold_mib)
    except ImportError:
        pass
    t0 = time.perf_counter()
    with PeakRSS() as load:
        system.setup(data, exp.context(), train=True)
    models = [getattr(system.guidance, "prior", None)]
    models = [m for p in models if p is not None for m in (p.model, getattr(p, "base", None)) if m is not None]
    result = {"config": name, "load_s": time.perf_counter() - t0, "model_gib": sum(weights_gib(m) for m in models),
              "load_peak_gib": load.peak, "rows": [],
              "estimate_gib": None if estimate is None else estimate.total_gib,
              "estimate_parts": None if estimate is None else estimate.parts, "set": list(extra)}
    optimizer = system.configure_optimizer()
    system.train()
    prior = getattr(system.guidance, "prior", None)
    unet = [0.0]
    if prior is not None:
        real = prior.predict_noise

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                unet[0] += time.perf_counter() - start

        prior.predict_noise = timed
    generator = torch.Generator().manual_seed(0)
    plan = [(s, s) for s in range(stages)] if stages > 1 else [(0, 0), (0, 1)]
    for stage, step in plan:
        data.update_step(step)
        system.update_step(step)
        views = data.sample_views(generator).to(exp.device)
        unet[0] = 0.0
        with PeakRSS() as mem:
            start = time.perf_counter()
            train_step(system, optimizer, views, step)
            seconds = time.perf_counter() - start
        if stages == 1 and step == 0:
            continue   # warm-up step of a single-stage recipe
        result["rows"].append({"milestone": f"{len(views)}x{views.height}px", "peak_gib": mem.peak, "s": seconds,
                               "outside_unet": None if prior is None else 1 - unet[0] / seconds})
        print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
    if name == "zero123-sds":
        for size in (256, 512):
            camera = system.reference.camera.with_size(size, size).to(exp.device)
            with PeakRSS() as mem:
                start = time.perf_counter()
                render = system.render(camera, bg_color=system._white())
                render["comp_rgb"].mean().backward()
                seconds = time.perf_counter() - start
            result["rows"].append({"milestone": f"reference render {size}px", "peak_gib": mem.peak, "s": seconds,
                                   "outside_unet": None})
            print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
    result["overrides"] = OmegaConf.to_container(cfg.data.resolution_milestones) if stages > 1 else []
    return result


# --------------------------------------------------------------------------- the table


def table(results: list[dict]) -> str:
    lines = ["| config | milestone (views x px) | peak RSS GiB | est. GiB | model GiB | s/step | outside UNet |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} | | | | | |")
            continue
        est = "" if r.get("estimate_gib") is None else f"{r['estimate_gib']:.1f}"
        lines.append(f"| {r['config']} | load (peak) | {r['load_peak_gib']:.2f} | | {r['model_gib']:.2f} | "
                     f"{r['load_s']:.0f} s load | |")
        for row in r["rows"]:
            share = "" if row["outside_unet"] is None else f"{100 * row['outside_unet']:.0f} %"
            lines.append(f"| {r['config']} | {row['milestone']} | {row['peak_gib']:.2f} | {est} | | "
                         f"{row['s']:.1f} | {share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--model", default="", help="a model folder (default: build the full random one)")
    parser.add_argument("--out", default="", help="keep each config's result as OUT/CONFIG.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--table", default="", metavar="DIR", help="only print the table of the results in DIR")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as out:
            result = run_one(args.configs[0], args.model, out, args.set)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return
    if args.table:
        files = sorted(f for f in os.listdir(args.table) if f.endswith(".json"))
        results = [json.load(open(os.path.join(args.table, f))) for f in files]
        print(table(sorted(results, key=lambda r: CONFIGS.index(r["config"]) if r["config"] in CONFIGS else 99)))
        return
    start = time.perf_counter()
    results = []
    for name in args.configs:
        model = args.model or model_dir(name)
        if not args.model:
            build_model(model, name)
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            # The child's stderr passes through: its rows show as they come.
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--model", model,
                                   "--json", tmp.name] + (["--set", *args.set] if args.set else []),
                                  cwd=ROOT, stdout=subprocess.DEVNULL)
            if proc.returncode == 0:
                with open(tmp.name) as f:
                    results.append(json.load(f))
            else:
                results.append({"config": name, "error": f"exit code {proc.returncode} (its stderr is above)"})
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(results[-1], f)
        print(table(results[-1:]).splitlines()[-1] if "error" in results[-1] else
              f"{name}: done ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    print()
    print(table(results))
    print(f"\nelapsed {time.perf_counter() - start:.0f} s; model folder {model}; "
          f"python benchmarks/bench_recipes.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
