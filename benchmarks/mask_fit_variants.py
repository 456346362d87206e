"""Re-export finished trials with other settings of the mask fit (lift3d/export/mask_fit.py) and score each
surface: Chamfer / volume IoU against the trial's ground truth and the input-view silhouette from its camera.

The trained field is the trial's own (its last checkpoint), so only the export differs between the rows:

    python benchmarks/mask_fit_variants.py TRIAL [TRIAL ...] --variant '{}' --variant '{"bridge_cells": 0}'

Each variant is a JSON object of fit_to_mask keyword arguments ({} = the defaults). No texture is baked.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trials", nargs="+")
    p.add_argument("--variant", action="append", default=None, help="JSON kwargs of fit_to_mask (repeatable)")
    args = p.parse_args()

    import numpy as np
    import trimesh

    from lift3d.config import parse_config
    from lift3d.evaluation.appearance import reference_view_scores
    from lift3d.evaluation.metrics import evaluate
    from lift3d.export import mask_fit
    from lift3d.export import mesh as export
    from lift3d.export.isosurface import prepare_grid
    from lift3d.runner import load_trial

    original = mask_fit.fit_to_mask
    for trial in args.trials:
        system = load_trial(trial).system
        cfg = parse_config(export.ExportConfig, system.cfg.export, "system.export")
        grid = system.geometry.density_grid(cfg.resolution).detach().cpu().numpy()
        grid = prepare_grid(grid, cfg.smooth, cfg.upsample, cfg.blur_kernel, cfg.erode, cfg.blur_sigma)
        radius = float(system.geometry.cfg.radius)
        for spec in args.variant or ["{}"]:
            mask_fit.fit_to_mask = functools.partial(original, **json.loads(spec))
            t0 = time.time()
            vertices, faces, info = export._surface(np.array(grid), radius, cfg, system.reference)
            seconds = time.time() - t0
            mesh = trimesh.Trimesh(vertices, faces, process=False)
            view = reference_view_scores(mesh, system.reference.camera, system.reference.rgba)
            row = {"trial": trial, "variant": spec, "seconds_surface": round(seconds, 2),
                   "silhouette_iou": round(view["silhouette_iou"], 4), "see_through": round(view["see_through"], 4),
                   "mask_fit": info.get("mask_fit")}
            if system.data.gt_mesh:
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "surface.ply")     # world frame, as the trial's field
                    mesh.export(path)
                    scores = evaluate(path, system.data.gt_mesh)
                row.update(chamfer_distance=round(scores["chamfer_distance"], 4), volume_iou=round(scores["volume_iou"], 4))
            print(json.dumps(row), flush=True)
    mask_fit.fit_to_mask = original


if __name__ == "__main__":
    main()
