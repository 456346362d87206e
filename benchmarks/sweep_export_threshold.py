"""Score trained trials' meshes at many export levels, and the automatic levels (no retraining).

    python benchmarks/sweep_export_threshold.py TRIAL_DIR [TRIAL_DIR ...] [--gt MESH] [--levels 24]

For each trial (``configs/parsed.yaml`` + ``ckpts/last.ckpt``; the ground truth is the trial's
``data.gt_mesh`` unless ``--gt`` is given) the density grid is sampled once at the trial's export
resolution, then the iso-surface (with the trial's floater / decimation settings) is scored at

- ``auto``: lift3d.export.level.choose_level with the trial's reference view (the default);
- ``ring``: the same without a reference (the field's own opacity from 8 views);
- the trial's configured level (``system.export.threshold`` / ``relative_threshold``), if any;
- ``--levels`` log-spaced levels between 1 % and 95 % of the grid's maximum density, the
  ``--extra`` absolute levels, and ``--refine`` levels between the neighbours of the best of
  those: the best of all the levels tried (these and the automatic ones) is the "best hand-picked level".

It prints one row per level and a summary table: volume IoU of auto and ring against the best.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sweep_trial(trial: str, gt: str | None, n_levels: int, protocol: str, iou_resolution: int,
                extra: tuple = (), refine: int = 8) -> dict:
    import numpy as np
    import trimesh

    from lift3d.config import parse_config
    from lift3d.errors import UserError
    from lift3d.evaluation.metrics import evaluate
    from lift3d.export.isosurface import pick_threshold, prepare_grid, surface_at_level
    from lift3d.export.mesh import ExportConfig, auto_level
    from lift3d.runner import load_trial

    exp = load_trial(trial)
    gt = gt or exp.data.cfg.gt_mesh
    export = parse_config(ExportConfig, exp.system.cfg.export, "system.export")
    geometry = exp.system.geometry
    radius = float(geometry.cfg.radius)
    grid = geometry.density_grid(export.resolution).detach().cpu().numpy()
    grid = prepare_grid(grid, export.smooth, export.upsample, export.blur_kernel, export.erode,
                        export.blur_sigma)
    print(f"\n{trial} (step {exp.step}) vs {gt}\ndensity grid {grid.shape[0]}^3 over radius {radius}: mean "
          f"{grid.mean():.3f}, max {grid.max():.3f}, percentiles 50/90/99: "
          f"{np.percentile(grid, [50, 90, 99]).round(3).tolist()}")
    rows = []
    t0 = time.time()
    auto, _ = auto_level(grid, radius, "auto", exp.data.reference_view())
    t_auto = time.time() - t0
    ring, _ = auto_level(grid, radius, "ring")
    named = [("auto", auto), ("ring", ring)]
    if export.threshold is not None or export.relative_threshold is not None:
        named.append(("config", pick_threshold(grid, export.threshold, export.relative_threshold)))
    named += [("sweep", float(v)) for v in np.geomspace(0.01, 0.95, n_levels) * grid.max()]
    named += [("sweep", float(v)) for v in extra]
    print(f"{'setting':>8} {'level':>9} {'faces':>6} {'chamfer':>8} {'IoU':>7} {'F@0.01':>7} {'F@0.02':>7}")

    def score(name: str, level: float) -> None:
        try:
            v, f, _ = surface_at_level(grid, radius, level, export.min_component_fraction, export.max_faces)
        except UserError as e:
            print(f"{name:>8} {level:>9.3f} {e}")
            rows.append({"name": name, "level": level, "iou": float("nan")})
            return
        r = evaluate(trimesh.Trimesh(v, f, process=False), gt, protocol, iou_resolutions=(iou_resolution,))
        rows.append({"name": name, "level": level, "iou": r["volume_iou"], "chamfer": r["chamfer_distance"]})
        print(f"{name:>8} {level:>9.3f} {len(f):>6} {r['chamfer_distance']:>8.4f} {r['volume_iou']:>7.4f} "
              f"{r['f_score']['0.01']:>7.3f} {r['f_score']['0.02']:>7.3f}", flush=True)

    for name, level in named:
        score(name, level)
    # IoU can fall off a cliff within one coarse step (a mug's inside opening): refine between the
    # neighbours of the best coarse level, so that "best" is not an artefact of the coarse grid.
    swept = sorted((r for r in rows if r["name"] == "sweep" and r["iou"] == r["iou"]), key=lambda r: r["level"])
    k = max(range(len(swept)), key=lambda i: swept[i]["iou"])
    lo, hi = swept[max(k - 1, 0)]["level"], swept[min(k + 1, len(swept) - 1)]["level"]
    for level in np.geomspace(lo, hi, refine + 2)[1:-1]:
        score("fine", float(level))
    # Every level tried is one a user could have picked by hand: the automatic ones too.
    best = max((r for r in rows if r["iou"] == r["iou"]), key=lambda r: r["iou"])
    get = {r["name"]: r for r in rows if r["name"] not in ("sweep", "fine")}
    return {"trial": trial, "auto": get["auto"], "ring": get["ring"],
            "config": get.get("config"), "best": best, "seconds_auto": t_auto}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trials", nargs="+")
    p.add_argument("--gt", default=None, help="ground-truth mesh (default: each trial's data.gt_mesh)")
    p.add_argument("--levels", type=int, default=24, help="log-spaced levels in the sweep")
    p.add_argument("--protocol", default="surface")
    p.add_argument("--iou-resolution", type=int, default=64)
    p.add_argument("--refine", type=int, default=8, help="more levels between the neighbours of the best swept one")
    p.add_argument("--extra", default="", help="more absolute levels to sweep, comma-separated (a finer grid)")
    args = p.parse_args()

    extra = tuple(float(v) for v in args.extra.split(",") if v)
    results = [sweep_trial(t, args.gt, args.levels, args.protocol, args.iou_resolution, extra, args.refine)
               for t in args.trials]
    # Name each trial by the part of its path that differs from the others' (bench trials share a basename).
    paths = [os.path.normpath(os.path.abspath(t)) for t in args.trials]
    common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    for r, path in zip(results, paths):
        r["trial"] = os.path.relpath(path, common)
    print(f"\nvolume IoU ({args.protocol} protocol, {args.iou_resolution}^3 grid)")
    print("| trial | auto level | auto IoU | ring level | ring IoU | best level | best IoU | auto - best "
          "| config level | config IoU | auto s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, g, b, c = r["auto"], r["ring"], r["best"], r["config"]
        config = f"{c['level']:.3g} | {c['iou']:.4f}" if c else "- | -"
        print(f"| {r['trial']} | {a['level']:.3g} | {a['iou']:.4f} | {g['level']:.3g} | {g['iou']:.4f} | "
              f"{b['level']:.3g} | {b['iou']:.4f} | {a['iou'] - b['iou']:+.4f} | {config} | {r['seconds_auto']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
