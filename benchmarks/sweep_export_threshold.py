"""Score one trained trial's mesh at several export thresholds (no retraining).

    python benchmarks/sweep_export_threshold.py TRIAL_DIR GT_MESH [--thresholds 5,10,25] [--relative 4,8]

Loads ``TRIAL_DIR/configs/parsed.yaml`` and ``ckpts/last.ckpt``, extracts the iso-surface at each
level (with the trial's other export settings) and prints the surface-protocol Chamfer, volume
IoU and F-scores, so ``system.export.threshold`` can be chosen from numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trial")
    p.add_argument("gt")
    p.add_argument("--thresholds", default="2,5,10,25,50")
    p.add_argument("--relative", default="2,4,8")
    p.add_argument("--protocol", default="surface")
    args = p.parse_args()

    import numpy as np
    import trimesh
    from omegaconf import OmegaConf

    from lift3d.config import parse_config
    from lift3d.errors import UserError
    from lift3d.evaluation.metrics import evaluate
    from lift3d.export.isosurface import extract_surface
    from lift3d.export.mesh import ExportConfig
    from lift3d.runner import Experiment

    cfg = OmegaConf.load(os.path.join(args.trial, "configs", "parsed.yaml"))
    cfg.resume = os.path.join(args.trial, "ckpts", "last.ckpt")
    exp = Experiment(cfg)
    exp.restore(cfg.resume)
    geometry = exp.system.geometry
    export = parse_config(ExportConfig, cfg.system.get("export", {}), "system.export")
    grid = geometry.density_grid(export.resolution).numpy()
    print(f"density grid {export.resolution}^3 over radius {geometry.cfg.radius}: mean {grid.mean():.3f}, "
          f"max {grid.max():.3f}, percentiles 50/90/99: {np.percentile(grid, [50, 90, 99]).round(3).tolist()}")
    levels = [dict(threshold=float(t)) for t in args.thresholds.split(",") if t]
    levels += [dict(threshold=None, relative_threshold=float(r)) for r in args.relative.split(",") if r]
    print(f"{'setting':>24} {'level':>8} {'faces':>6} {'chamfer':>8} {'IoU':>7} {'F@0.01':>7} {'F@0.02':>7}")
    for level in levels:
        options = {k: v for k, v in dataclasses.asdict(dataclasses.replace(export, **level)).items()
                   if k not in ("resolution", "texture_size", "texture_padding", "glb") and not k.startswith("bake")}
        try:
            v, f, info = extract_surface(grid, geometry.cfg.radius, **options)
        except UserError as e:
            print(f"{str(level):>24} {e}")
            continue
        r = evaluate(trimesh.Trimesh(v, f), args.gt, args.protocol)
        print(f"{str(level):>24} {info['threshold']:>8.3f} {len(f):>6} {r['chamfer_distance']:>8.4f} "
              f"{r['volume_iou']:>7.4f} {r['f_score']['0.01']:>7.3f} {r['f_score']['0.02']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
