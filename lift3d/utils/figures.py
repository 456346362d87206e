"""Pictures of a run: labelled image grids (validation strip, summary image, bench comparisons),
the colour maps that turn normals, depth and opacity into images, and the loss curve.

Labels are drawn with PIL's default font, so nothing beyond Pillow is needed; the loss curve uses
matplotlib when it is installed and a plain PIL plot otherwise.
"""

from __future__ import annotations

import csv
import math
from typing import Optional, Sequence

import numpy as np

from lift3d.utils import io

LABEL_BAND = 14          # pixels above each image for its label (the default font is 10 px)
TITLE_BAND = 18


def _uint8(image) -> np.ndarray:
    """(H, W, C) tensor or array, float in [0, 1] or uint8 -> (H, W, 3) uint8."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3]


def labelled_grid(rows: Sequence[Sequence], title: Optional[str] = None) -> np.ndarray:
    """Rows of ``(label, image)`` cells -> one (H, W, 3) uint8 image, each image under its label.

    An image is an (H, W, C) tensor or array (float in [0, 1] or uint8); a cell may be a bare image
    (no label) or ``(label, None)`` (a blank cell as wide as the cell above it, else as the row's first).
    Cells sit edge to edge, so a row is exactly as wide as its images; rows of different widths are
    padded with white on the right. ``title`` adds a line of text on top (the image widens to fit it).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = [[c if isinstance(c, tuple) else ("", c) for c in row] for row in rows]
    rows = [[(label, None if image is None else _uint8(image)) for label, image in row] for row in rows]
    heights = [max((im.shape[0] for _, im in row if im is not None), default=0) for row in rows]
    previous: list = []
    widths = []
    for row in rows:
        first = next((im.shape[1] for _, im in row if im is not None), 0)
        w = [im.shape[1] if im is not None else (previous[i] if i < len(previous) else first)
             for i, (_, im) in enumerate(row)]
        widths.append(w)
        previous = w
    top = TITLE_BAND if title else 0
    width = max([sum(w) for w in widths] + [int(font.getlength(title)) + 8 if title else 1])
    canvas = Image.new("RGB", (width, top + sum(h + LABEL_BAND for h in heights)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0), font=font)
    y = top
    for row, h, w in zip(rows, heights, widths):
        x = 0
        for (label, image), width in zip(row, w):
            if image is not None:
                canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (x, y + LABEL_BAND))
            if label:
                draw.text((x + 2, y + 1), str(label), fill=(0, 0, 0), font=font)
            x += width
        y += h + LABEL_BAND
    return np.asarray(canvas)


# --------------------------------------------------------------------------- colour maps (torch)


def normal_image(comp_normal, opacity):
    """A renderer's ``comp_normal`` ((n + 1) / 2 weighted by opacity, 0.5 where empty) -> (n + 1) / 2
    on the object and white around it; (..., H, W, 3)."""
    weighted = comp_normal * 2 - 1                    # opacity-weighted world normal
    return ((weighted + opacity) / 2 + (1 - opacity)).clamp(0, 1)


def depth_image(depth, opacity, background_depth: float = 0.0):
    """Depth -> grey levels, near bright, far dark, over the covered pixels (opacity > 0.5) of each
    image, composited by opacity on black; (B, H, W, 1) -> (B, H, W, 3). ``background_depth``: the
    depth the renderer gives the uncovered part of a pixel, taken out first."""
    import torch

    surface = (depth - (1 - opacity) * background_depth) / opacity.clamp_min(1e-6)
    out = []
    for d, a in zip(surface, opacity):
        covered = d[a > 0.5]
        lo, hi = (covered.min(), covered.max()) if covered.numel() else (d.min(), d.max())
        shade = 1 - 0.8 * ((d - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        out.append((shade * a).expand(*d.shape[:-1], 3))
    return torch.stack(out)


def opacity_image(opacity):
    """(..., H, W, 1) opacity -> grey (..., H, W, 3)."""
    return opacity.clamp(0, 1).expand(*opacity.shape[:-1], 3)


# --------------------------------------------------------------------------- loss curve


def read_loss_csv(path: str) -> tuple[list, dict]:
    """(steps, {column: values}) from a loss log; empty cells become NaN."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(float(r["step"])) for r in rows]
    columns = {c: [float(r[c]) if r.get(c) not in (None, "") else math.nan for r in rows]
               for c in (rows[0].keys() if rows else ()) if c != "step"}
    return steps, columns


def loss_curve(csv_path: str, png_path: str, backend: str = "auto") -> Optional[str]:
    """Draw every column of the loss log against the step, one small panel each, to ``png_path``.

    ``backend``: "matplotlib", "pil", or "auto" (matplotlib when it is installed). Returns the path,
    or None when the log has no rows."""
    steps, columns = read_loss_csv(csv_path)
    if not steps:
        return None
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    names = list(columns)
    if backend == "matplotlib":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_cols = min(3, len(names))
        n_rows = math.ceil(len(names) / n_cols)
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 2.6 * n_rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            ax.plot(steps, columns[name], lw=1)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        with io.atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
    else:
        panels = [("", _pil_plot(name, steps, columns[name])) for name in names]
        io.save_image(png_path, labelled_grid([panels[i:i + 3] for i in range(0, len(panels), 3)]))
    return png_path


def _pil_plot(name: str, steps: list, values: list, size=(300, 170)) -> np.ndarray:
    """One line plot with PIL: title, min/max of y, first/last step."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    W, H = size
    left, right, top, bottom = 52, 8, 16, 16
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 2), name, fill=(0, 0, 0), font=font)
    draw.rectangle((left, top, W - right, H - bottom), outline=(160, 160, 160))
    pts = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if pts:
        s0, s1 = min(p[0] for p in pts), max(p[0] for p in pts)
        v0, v1 = min(p[1] for p in pts), max(p[1] for p in pts)
        sx = (W - right - left) / max(s1 - s0, 1)
        sy = (H - bottom - top) / (v1 - v0 if v1 > v0 else 1.0)
        xy = [(left + (s - s0) * sx, H - bottom - (v - v0) * sy) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=1)
        else:
            draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=(31, 119, 180))
        draw.text((2, top), f"{v1:.3g}", fill=(0, 0, 0), font=font)
        draw.text((2, H - bottom - 10), f"{v0:.3g}", fill=(0, 0, 0), font=font)
        draw.text((left, H - bottom + 2), str(s0), fill=(0, 0, 0), font=font)
        last = f"step {s1}"
        draw.text((W - right - font.getlength(last), H - bottom + 2), last, fill=(0, 0, 0), font=font)
    return np.asarray(image)
