"""Timings of mesh export and evaluation on the CPU.

- export: an analytic field (a ball with a colour gradient) through marching cubes, floater
  removal, decimation, manifold repair, xatlas, texture baking and OBJ/GLB writing, at several
  settings (with the atlas's chart count and texture coverage);
- evaluate: every protocol on a bundled object against a perturbed copy of itself.

    python benchmarks/bench_export_eval.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lift3d.geometry.base import BaseGeometry  # noqa: E402


class Ball(BaseGeometry):
    @dataclass
    class Config(BaseGeometry.Config):
        pass

    def __init__(self):
        super().__init__({"radius": 1.0})
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, points):
        # A bumpy ball, so decimation and unwrapping have real work to do.
        r = points.norm(dim=-1)
        bumps = 0.03 * torch.sin(12 * points[:, 0]) * torch.sin(12 * points[:, 1]) * torch.sin(12 * points[:, 2])
        density = 50 * torch.sigmoid((0.45 + bumps - r) * 200)
        rgb = torch.stack([(points[:, 0] + 1) / 2, (points[:, 1] + 1) / 2, 1 - (points[:, 2] + 1) / 2], -1)
        return {"density": density, "features": rgb}


def bench_export() -> None:
    from lift3d.export.mesh import export_mesh

    print("export (analytic bumpy ball)")
    print(f"{'resolution':>10} {'max_faces':>9} {'texture':>7} {'mc faces':>9} {'faces':>6} "
          f"{'surface s':>9} {'unwrap s':>8} {'bake s':>6} {'total s':>7} {'charts':>6} {'coverage':>8} {'non-mf':>6}")
    field = Ball()
    for resolution, max_faces, texture in [(128, 30000, 1024), (256, 30000, 1024), (256, 50000, 2048)]:
        with tempfile.TemporaryDirectory() as out:
            paths = export_mesh(field, out, {"resolution": resolution, "threshold": 25.0, "max_faces": max_faces,
                                             "texture_size": texture})
            import json

            info = json.load(open(paths["info"]))
        print(f"{resolution:>10} {max_faces:>9} {texture:>7} {info['faces_marching_cubes']:>9} {info['faces']:>6} "
              f"{info['seconds_surface']:>9.2f} {info['seconds_unwrap']:>8.2f} {info['seconds_bake']:>6.2f} "
              f"{info['seconds_total']:>7.2f} {info['texture_atlas']['charts']:>6} {info['texture_coverage']:>8.3f} "
              f"{info['non_manifold_edges']:>6}")


def bench_evaluate() -> None:
    import trimesh

    from lift3d.evaluation.metrics import evaluate
    from lift3d.mesh.io import load_mesh

    gt_path = os.path.join(ROOT, "examples", "objects", "mug", "meshes", "model.obj")
    pred = load_mesh(gt_path, normalize=True)
    pred.apply_transform(trimesh.transformations.rotation_matrix(np.radians(5), [0, 0, 1]))
    pred.apply_scale(0.97)
    print("\nevaluate (mug vs rotated 5 deg and scaled 0.97)")
    for protocol in ("surface", "syncdreamer", "surface-icp"):
        t0 = time.time()
        r = evaluate(pred, gt_path, protocol)
        print(f"{protocol:>12}: {time.time() - t0:5.2f} s  chamfer {r['chamfer_distance']:.4f}  "
              f"volume IoU {r['volume_iou_by_resolution']}  F@0.01 {r['f_score']['0.01']:.3f}  points {r['n_points']}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bench_export()
    bench_evaluate()
