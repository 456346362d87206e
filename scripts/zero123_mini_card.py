"""Write the loss-curve PNG and the loss table of a ``lift3d train-zero123`` run (for the model card).

    python scripts/zero123_mini_card.py RUN_DIR OUT_DIR     # reads RUN_DIR/ckpts/last.ckpt

Writes OUT_DIR/loss_curve.png (diffusion loss, 100-step running mean, log-free linear axes) and
prints a markdown table of the loss at a few steps. No matplotlib: the curve is drawn with numpy.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lift3d.utils.io import save_image  # noqa: E402


def running_mean(x: np.ndarray, n: int) -> np.ndarray:
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(len(x)):
        lo = max(0, i + 1 - n)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot(curves: list, size=(240, 480), margin: int = 20) -> np.ndarray:
    """Draw (steps, values, rgb) curves on one white canvas with a grey frame; y from 0 to the max."""
    h, w = size
    img = np.ones((h, w, 3))
    img[margin, margin:w - margin] = img[h - margin, margin:w - margin] = 0.6
    img[margin:h - margin, margin] = img[margin:h - margin, w - margin] = 0.6
    x_max = max(s.max() for s, _, _ in curves)
    y_max = max(v.max() for _, v, _ in curves)
    for steps, values, rgb in curves:
        xs = margin + (steps / x_max) * (w - 2 * margin)
        ys = h - margin - (values / y_max) * (h - 2 * margin)
        for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            px = np.linspace(x0, x1, n).round().astype(int).clip(0, w - 1)
            py = np.linspace(y0, y1, n).round().astype(int).clip(0, h - 1)
            img[py, px] = rgb
    return img


def main(run_dir: str, out_dir: str) -> None:
    ckpt = torch.load(os.path.join(run_dir, "ckpts", "last.ckpt"), map_location="cpu", weights_only=True)
    losses = np.array(ckpt["losses"], dtype=np.float64)
    steps, values = losses[:, 0], losses[:, 1]
    smooth = running_mean(values, 100)
    save_image(os.path.join(out_dir, "loss_curve.png"),
               plot([(steps, np.minimum(values, smooth.max()), (0.75, 0.8, 0.95)), (steps, smooth, (0.1, 0.2, 0.8))]))
    print(f"diffusion: {int(steps[-1])} steps in {ckpt['elapsed'] / 60:.1f} min; "
          f"VAE: {ckpt['vae_step']} steps in {ckpt['vae_elapsed'] / 60:.1f} min, "
          f"last VAE loss {ckpt['vae_losses'][-1][1]:.4f}; latent scaling factor {ckpt['scaling_factor']:.4f}")
    print("| step | diffusion loss (mean of the last 100 steps) |")
    print("|---|---|")
    for i in sorted({int(round(x)) for x in np.linspace(0, len(steps) - 1, 9)}):
        print(f"| {int(steps[i])} | {smooth[i]:.4f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
