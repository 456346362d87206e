"""Oracle reconstruction benchmark: fit a bundled object from ground-truth views, then score
held-out views it was never shown (a ring offset from the training azimuths, and a high ring).

    python benchmarks/bench_oracle.py                       # mushroom, configs/oracle.yaml, 600 steps
    python benchmarks/bench_oracle.py --object car --steps 300
    python benchmarks/bench_oracle.py --trial outputs/bench-oracle/oracle/mushroom   # score an existing trial

Prints per-view and mean silhouette IoU (opacity > 0.5 vs ground-truth alpha > 0.5) and PSNR of the
images composited on white. Target (issue 2): IoU >= 0.9, PSNR >= 25 dB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lift3d.evaluation.views import held_out_views, view_scores  # noqa: E402
from lift3d.runner import load_trial, run_experiment  # noqa: E402
from lift3d.utils import io  # noqa: E402
from lift3d.utils.images import image_grid  # noqa: E402


def score_trial(trial: str, size: int = 128) -> dict:
    exp = load_trial(trial)
    data, guidance = exp.data.cfg, exp.system.cfg.guidance
    cams = held_out_views(data.default_camera_distance, data.default_fovy_deg, size)
    rows, images = view_scores(exp.system, data.gt_mesh, cams, guidance.get("shading", "lambert"),
                               guidance.get("samples_per_pixel", 1))
    io.save_image(os.path.join(trial, "save", "bench-oracle-heldout.png"), image_grid(images, columns=8))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("silhouette_iou", "psnr")}
    return {"trial": trial, "views": rows, "mean": mean}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--object", default="mushroom", help="a bundled object under examples/objects/")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "oracle.yaml"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench-oracle"))
    p.add_argument("--trial", help="score this finished trial instead of training")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = p.parse_args()

    t0 = time.time()
    trial = args.trial or run_experiment(args.config, [
        f"image={ROOT}/examples/{args.object}_rgba.png", f"gt={ROOT}/examples/objects/{args.object}/meshes/model.obj",
        f"exp_root_dir={args.out}", f"tag={args.object}", "use_timestamp=false",
        f"trainer.max_steps={args.steps}", *args.overrides])
    train_s = time.time() - t0
    result = score_trial(trial)
    result["train_and_export_seconds"] = None if args.trial else round(train_s, 1)
    io.write_json(os.path.join(trial, "bench-oracle.json"), result)
    print(f"{'elev':>6} {'azim':>7} {'sil IoU':>8} {'PSNR':>7}")
    for r in result["views"]:
        print(f"{r['elevation']:6.1f} {r['azimuth']:7.1f} {r['silhouette_iou']:8.3f} {r['psnr']:7.2f}")
    m = result["mean"]
    print(f"mean held-out silhouette IoU {m['silhouette_iou']:.3f}  PSNR {m['psnr']:.2f} dB"
          f"  (train+export {train_s:.0f} s, trial {trial})")


if __name__ == "__main__":
    main()
