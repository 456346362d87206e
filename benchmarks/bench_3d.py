"""3D reconstruction quality of several runs (configs and overrides) on one object set, side by side.

Each run is ``lift3d bench`` over the dataset (resumable: finished objects are skipped), so every
object gets the same rendered input view, the same protocols and the same metric code as
``lift3d eval``. Prints one Markdown table (per object and mean: surface Chamfer, volume IoU at
128³, time) and writes it to OUT/table.md.

    # issue 5: the guided run against the reference view alone
    python benchmarks/bench_3d.py --dataset examples/objects --out OUT \\
        --run "zero123-sjc=configs/zero123-sjc-cpu.yaml" \\
        --run "reference only=configs/zero123-sjc-cpu.yaml system.loss.lambda_guidance=0"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_run(text: str) -> tuple[str, str, list]:
    name, _, spec = text.partition("=")
    parts = spec.split()
    if not name or not parts:
        raise SystemExit(f"--run '{text}': use 'NAME=CONFIG [key=value ...]'")
    return name.strip(), parts[0], parts[1:]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="examples/objects")
    p.add_argument("--out", required=True)
    p.add_argument("--run", action="append", required=True, help="'NAME=CONFIG [key=value ...]' (repeatable)")
    p.add_argument("--objects", default=None, help="comma-separated object names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from lift3d.bench import main as bench_main

    runs = [parse_run(r) for r in args.run]
    summaries = {}
    for name, config, overrides in runs:
        out = os.path.join(args.out, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
        cmd = ["--dataset", args.dataset, "--config", config, "--out", out, "--protocols", "surface",
               *(["--objects", args.objects] if args.objects else []), f"trainer.num_threads={args.threads}",
               *overrides]
        print(f"== {name}: lift3d bench {' '.join(cmd)}", flush=True)
        bench_main(cmd)
        with open(os.path.join(out, "summary.json")) as f:
            summaries[name] = json.load(f)

    objects = sorted({o["object"] for s in summaries.values() for o in s["objects"]})
    header = "| object | " + " | ".join(f"{n}: CD ↓ | {n}: IoU ↑" for n, _, _ in runs) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(runs))]

    def cell(summary, obj, key):
        row = next((o for o in summary["objects"] if o["object"] == obj), None)
        if row is None or row.get("error"):
            return "failed"
        return f"{row[key]:.4f}" if "chamfer" in key else f"{row[key]:.3f}"

    for obj in objects:
        lines.append(f"| {obj} | " + " | ".join(f"{cell(summaries[n], obj, 'surface/chamfer')} | "
                                                 f"{cell(summaries[n], obj, 'surface/volume_iou')}"
                                                 for n, _, _ in runs) + " |")
    means = []
    for n, _, _ in runs:
        m = summaries[n]["mean"]
        means.append(f"**{m['surface/chamfer']:.4f}** | **{m['surface/volume_iou']:.3f}**")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    times = ", ".join(f"{n}: {summaries[n]['mean']['seconds_total'] / 60:.1f} min/object" for n, _, _ in runs)
    table = "\n".join(lines) + f"\n\nSurface protocol (Chamfer on 100k samples, volume IoU at 128³). Time: {times}.\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    return summaries


if __name__ == "__main__":
    main()
