"""A small version of benchmarks/bench_oracle.py: fitting the bundled mushroom from oracle views
must reproduce held-out views (the full-size numbers live in the benchmark)."""

import os

from lift3d.config import load_config
from lift3d.evaluation.views import held_out_views, view_scores
from lift3d.runner import Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_oracle_fit_reproduces_held_out_views(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "oracle.yaml"), [
        f"image={ROOT}/examples/mushroom_rgba.png", f"gt={ROOT}/examples/objects/mushroom/meshes/model.obj",
        f"exp_root_dir={tmp_path}", "trainer.max_steps=120", "trainer.val_every=0", "trainer.ckpt_every=0",
        "data.reference_height=64", "data.reference_width=64", "data.height=32", "data.width=32",
        "system.geometry.grid_size=40", "system.renderer.num_samples_per_ray=64",
        "system.renderer.occ_warmup_steps=40", "system.loss.lambda_opaque=0", "trainer.device=cpu",
        "system.guidance.depth_weight=0"])  # colour and mask only: what this short fit checks
    exp = Experiment(cfg)
    exp.train()
    exp.system.eval()
    rows, _ = view_scores(exp.system, exp.data.cfg.gt_mesh, held_out_views(1.5, 49.13, 48))
    iou = sum(r["silhouette_iou"] for r in rows) / len(rows)
    psnr = sum(r["psnr"] for r in rows) / len(rows)
    assert iou > 0.85 and psnr > 19.0, (iou, psnr)
