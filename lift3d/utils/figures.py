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


def wrap_text(text: str, font, width: float) -> list:
    """``text`` in lines no wider than ``width`` pixels in ``font``: broken at "  |  " separators first, then
    between words; a single word wider than ``width`` keeps a line of its own."""
    lines: list = []
    for part in text.split("  |  "):
        joined = f"{lines[-1]}  |  {part}" if lines else part
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
            continue
        line = ""
        for word in part.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def labelled_grid(rows: Sequence[Sequence], title: Optional[str] = None) -> np.ndarray:
    """Rows of ``(label, image)`` cells -> one (H, W, 3) uint8 image, each image under its label.

    An image is an (H, W, C) tensor or array (float in [0, 1] or uint8); a cell may be a bare image
    (no label) or ``(label, None)`` (a blank cell as wide as the cell above it, else as the row's first).
    Cells sit edge to edge, so a row is exactly as wide as its images; rows of different widths are
    padded with white on the right. ``title`` adds text on top, wrapped to the grid's width (at its
    "  |  " separators, then between words), so a long title does not widen the image.
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
    width = max([sum(w) for w in widths] + [1])
    lines = wrap_text(title, font, width - 8) if title else []
    width = max([width] + [int(font.getlength(line)) + 8 for line in lines])
    top = TITLE_BAND * len(lines)
    canvas = Image.new("RGB", (width, top + sum(h + LABEL_BAND for h in heights)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * TITLE_BAND), line, fill=(0, 0, 0), font=font)
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


LOSSES = "losses (loss = the weighted total; loss_x = each term, unweighted)"
DIAGNOSTICS = "diagnostics, not losses"


def loss_panels(columns: dict) -> list:
    """The panels of the loss curve: [(group title, [(column, log y scale?), ...]), ...].

    Columns named ``loss*`` are losses; every other one (the sampled timestep, a gradient norm, the
    learning rate...) is a diagnostic, drawn in a group of its own. A column gets a log y scale when
    all its logged values are strictly positive."""
    def log(values):
        finite = [v for v in values if math.isfinite(v)]
        return bool(finite) and min(finite) > 0

    groups = [(LOSSES, [c for c in columns if c.startswith("loss")]),
              (DIAGNOSTICS, [c for c in columns if not c.startswith("loss")])]
    return [(title, [(c, log(columns[c])) for c in names]) for title, names in groups if names]


def smoothing_window(n: int) -> int:
    """Points in the running mean over ``n`` logged rows: odd, about n / 20, at least 3 (1, i.e. no
    smoothing, below 5 rows)."""
    return 1 if n < 5 else max(3, 2 * (n // 40) + 1)


def running_mean(values, window: int) -> np.ndarray:
    """Centred running mean over ``window`` points (odd), shortened at the ends; NaNs are skipped,
    and stay NaN. Clipped to the values' range, so that rounding cannot move a constant."""
    v = np.asarray(values, float)
    ok = np.isfinite(v)
    total = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(v))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window // 2 + 1, len(v))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (total[hi] - total[lo]) / (count[hi] - count[lo])
    return np.where(ok, np.clip(mean, *(v[ok].min(), v[ok].max()) if ok.any() else (0, 0)), math.nan)


def loss_curve(csv_path: str, png_path: str, backend: str = "auto") -> Optional[str]:
    """Draw the loss log to ``png_path``: one panel per column against one shared step axis, the losses
    first and the diagnostics apart; each panel shows every logged value faint and a centred running
    mean over them, on a log y scale where the column is positive.

    ``backend``: "matplotlib", "pil", or "auto" (matplotlib when it is installed). Returns the path,
    or None when the log has no rows."""
    steps, columns = read_loss_csv(csv_path)
    if not steps or not columns:
        return None
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    groups = loss_panels(columns)
    window = smoothing_window(len(steps))
    spacing = (steps[-1] - steps[0]) / max(len(steps) - 1, 1)
    smoothed = "as logged" if window == 1 else f"running mean of {window}"
    note = ("dots: each logged value; line: " + ("the same, too few rows to smooth" if window == 1 else
            f"centred running mean of {window} logged values (~{window * spacing:.0f} steps)"))
    smooth = {name: running_mean(values, window) for name, values in columns.items()}
    n_cols = min(3, max(len(names) for _, names in groups))
    pad = max(0.02 * (steps[-1] - steps[0]), 1)
    if backend == "matplotlib":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        def minor_labels(decades):                         # all under 0.6 decades, 2 and 5 under 2.5, else none
            return FuncFormatter(lambda v, _: f"{v:g}" if decades < 0.6 or (
                decades < 2.5 and round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5)) else "")

        heights = [math.ceil(len(names) / n_cols) for _, names in groups]
        fig = plt.figure(figsize=(4 * n_cols, 2.7 * sum(heights) + 0.5 * len(groups) + 0.4),
                         layout="constrained")
        fig.suptitle(note, fontsize=9)
        shared = None
        subfigures = np.atleast_1d(fig.subfigures(len(groups), 1, height_ratios=heights))
        for sub, (title, names), n_rows in zip(subfigures, groups, heights):
            sub.suptitle(title, fontsize=10, fontweight="bold")
            for k, (name, log) in enumerate(names):
                ax = sub.add_subplot(n_rows, n_cols, k + 1, sharex=shared)
                shared = shared or ax
                ax.plot(steps, columns[name], ".", ms=4, alpha=0.35, color="C0", label="each logged value")
                ax.plot(steps, smooth[name], "-", lw=1.5, color="C0", label=smoothed)
                if log:
                    ax.set_yscale("log")
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))   # 200, not 2 x 10^2
                    ax.yaxis.set_minor_formatter(minor_labels(np.log10(ax.get_ylim()[1] / ax.get_ylim()[0])))
                ax.set_xlim(steps[0] - pad, steps[-1] + pad)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(name, fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                ax.set_ylabel("value (log scale)" if log else "value", fontsize=8)
                ax.tick_params(labelsize=7, which="both")
                ax.grid(alpha=0.3, which="both" if log else "major", lw=0.5)
                if k == 0 and title == LOSSES:
                    ax.legend(fontsize=7, markerscale=2)
        with io.atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
    else:
        rows = []
        for title, names in groups:
            panels = [("", _pil_plot(name, steps, columns[name], smooth[name], log)) for name, log in names]
            rows += [[_pil_heading(title, 320 * n_cols)]]
            rows += [panels[i:i + n_cols] for i in range(0, len(panels), n_cols)]
        io.save_image(png_path, labelled_grid(rows, title=note))
    return png_path


def _pil_heading(text: str, width: int) -> np.ndarray:
    """A group's heading for the PIL loss curve: the text, twice the default size, over a rule."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), text, fill=(0, 0, 0), font=ImageFont.load_default(size=18))
    draw.line((0, 28, width, 28), fill=(0, 0, 0), width=2)
    return np.asarray(image)


def _pil_plot(name: str, steps: list, values, smooth, log: bool, size=(320, 190)) -> np.ndarray:
    """One panel without matplotlib: the values as faint dots, the smoothed line over them, y on a log
    scale when ``log`` (gridlines at powers of ten), x from the first to the last step of the log."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    W, H = size
    left, right, top, bottom = 68, 8, 16, 26
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 2), name, fill=(0, 0, 0), font=font)
    draw.rectangle((left, top, W - right, H - bottom), outline=(160, 160, 160))
    f = np.log10 if log else np.asarray
    s0, s1 = steps[0], steps[-1]
    x = lambda s: left + 4 + (s - s0) * (W - right - left - 8) / max(s1 - s0, 1)  # noqa: E731
    ys = f(np.asarray([v for v in values if math.isfinite(v)], float))
    if len(ys):
        v0, v1 = ys.min(), ys.max()
        if v1 == v0:                                                            # a constant: centre it
            v0, v1 = (v0 - 1, v1 + 1) if log else (v0 - (abs(v0) or 1) / 2, v1 + (abs(v1) or 1) / 2)
        y = lambda v: H - bottom - 4 - (v - v0) * (H - bottom - top - 8) / (v1 - v0)  # noqa: E731
        if log:                                    # gridlines at powers of ten, labelled clear of min/max
            for e in range(math.ceil(v0), math.floor(v1) + 1):
                draw.line((left + 1, y(e), W - right - 1, y(e)), fill=(225, 225, 225))
                if min(abs(y(e) - y(v0)), abs(y(e) - y(v1))) > 12:
                    label = f"{10.0 ** e:g}"
                    draw.text((left - 4 - font.getlength(label), y(e) - 5), label, fill=(120, 120, 120), font=font)
        for s, v in zip(steps, f(np.asarray(values, float))):
            if math.isfinite(v):
                draw.ellipse((x(s) - 1.5, y(v) - 1.5, x(s) + 1.5, y(v) + 1.5), fill=(150, 185, 220))
        line = [(x(s), y(v)) for s, v in zip(steps, f(np.asarray(smooth, float))) if math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=(31, 119, 180), width=2)
        for v in (v0, v1):
            value = 10 ** v if log else v
            label = f"{value:.3g}" if abs(value) < 1000 else f"{value:.4g}"         # 3000, not 3e+03
            draw.text((left - 4 - font.getlength(label), y(v) - 5), label, fill=(0, 0, 0), font=font)
    axis = Image.new("RGB", (H - top - bottom, 12), "white")                   # the y title, turned upright
    ImageDraw.Draw(axis).text((2, 0), "value (log scale)" if log else "value", fill=(0, 0, 0), font=font)
    image.paste(axis.rotate(90, expand=True), (1, top))
    spacing = next(k * 10 ** e for e in range(12) for k in (1, 2, 5) if (s1 - s0) / (k * 10 ** e) <= 5)
    for s in [s0] + list(range(s0 // spacing * spacing + spacing, s1, spacing)) + [s1]:   # round steps
        label = str(s)
        at = min(max(x(s) - font.getlength(label) / 2, left), W - right - font.getlength(label))
        if s in (s0, s1) or min(x(s) - x(s0), x(s1) - x(s)) > 30:
            draw.line((x(s), H - bottom, x(s), H - bottom + 2), fill=(120, 120, 120))
            draw.text((at, H - bottom + 3), label, fill=(0, 0, 0), font=font)
    draw.text(((left + W - right - font.getlength("step")) / 2, H - 12), "step", fill=(0, 0, 0), font=font)
    return np.asarray(image)
