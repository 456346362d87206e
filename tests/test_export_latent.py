"""A latent field (Zero123's 3drec recipe) exports a real texture: its bake views go through the prior's
VAE decoder. The turntable and summary show the exported mesh; metrics.json scores it from the input camera."""

import json
import os

import numpy as np
from PIL import Image

from test_step_losses import COMMON, ROOT, SMALL, make_models


def test_latent_field_exports_a_texture_and_pictures_of_the_mesh(tmp_path):
    import torch

    from lift3d.config import load_config
    from lift3d.runner import Experiment

    models = make_models(str(tmp_path / "models"))
    threads = torch.get_num_threads()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(os.path.join("configs", "zero123-sjc.yaml"), COMMON + SMALL["zero123-sjc"] + [
            "trainer.max_steps=3", f"system.guidance.pretrained_model_name_or_path={models['base']}",
            "system.export.resolution=32", "system.export.texture_size=64", "data.n_test_views=2",
            f"exp_root_dir={tmp_path / 'out'}"])
        trial = Experiment(cfg).run("train")
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    info = json.load(open(os.path.join(trial, "export", "model_info.json")))
    assert info["bake"].startswith("views:") and info["texels_seen"] > 0.5
    texture = np.asarray(Image.open(os.path.join(trial, "export", "model.png")))
    assert texture.reshape(-1, 3).std(0).max() > 2        # not one plain colour
    metrics = json.load(open(os.path.join(trial, "metrics.json")))   # no ground truth: the reference view only
    ref = metrics["reference_view"]
    assert "chamfer_distance" not in metrics
    assert 0 <= ref["silhouette_iou"] <= 1 and 0 <= ref["see_through"] <= 1 and np.isfinite(ref["psnr_image"])
    assert "psnr" in metrics["field_views"]
    summary = np.asarray(Image.open(os.path.join(trial, "save", "summary.png")))
    assert summary.shape[0] > 6 * 16          # 4 field rows and 2 mesh rows of 16 px images under labels
