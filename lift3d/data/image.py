"""Reference-image preprocessing: read, matte if needed, recentre and rescale.

Zero123 was trained on objects that fill a fixed part of the frame, and its demo preprocesses
every input the same way: crop to the object's bounding box, shrink it into a 200 x 200
thumbnail and paste it at the centre of a 256 x 256 canvas. :func:`load_reference_image` does
the same with ``foreground_ratio = 200 / 256``; ``foreground_ratio=None`` keeps the framing
(needed when the image was rendered from a known camera that the run must reproduce).

Images without transparency are matted from their border colour, which works for product shots
on a plain background; anything else should be matted beforehand (for example with rembg).
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from lift3d.errors import UserError

log = logging.getLogger(__name__)

ZERO123_FOREGROUND_RATIO = 200 / 256   # = 0.78125, the thumbnail size in Zero123's preprocessing
MIN_FOREGROUND_PIXELS = 16


def load_reference_image(path: str, size: Union[int, tuple[int, int]] = 256,
                         foreground_ratio: Optional[float] = ZERO123_FOREGROUND_RATIO) -> torch.Tensor:
    """Read ``path`` as an (H, W, 4) float tensor in [0, 1] with straight alpha.

    ``size`` is the output side or ``(height, width)``. With a ``foreground_ratio`` the object's
    bounding box (alpha > 0.5) is centred and scaled so that it fits in ``ratio * height`` by
    ``ratio * width`` with its longest side touching that limit. With ``None`` the image is only
    resized to ``size``. An image with no alpha (or an all-opaque one) is matted from its border
    colour, with a logged warning. Raises :class:`UserError` if the file cannot be read or has
    no foreground.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if foreground_ratio is not None and not 0 < foreground_ratio <= 1:
        raise UserError(f"foreground_ratio must be in (0, 1] or null, got {foreground_ratio}")
    image = _read_object(path)
    if foreground_ratio is None:
        return _resize_rgba(image, height, width)
    return _recentre(image, height, width, fit_scale(image, height, width, foreground_ratio))


def load_reference_images(paths: list, size: Union[int, tuple[int, int]] = 256,
                          foreground_ratio: Optional[float] = ZERO123_FOREGROUND_RATIO) -> list:
    """Several photos of one object, each (H, W, 4) as :func:`load_reference_image` makes it, framed consistently
    with each other: their cameras share a distance and field of view, so one zoom must serve them all.

    With a ``foreground_ratio`` each photo is centred on its object (the object's centre, at the origin, is where
    every camera looks) and all are zoomed by **one** factor relative to their own size: the largest with which
    every object fits in ``ratio`` of its frame (zooming each to fill the frame on its own would make a car seen
    from the side as tall as one seen from the front). One path gives exactly :func:`load_reference_image`'s image.
    With ``None`` every photo keeps its framing (only resized)."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if foreground_ratio is None or len(paths) == 1:
        return [load_reference_image(p, (height, width), foreground_ratio) for p in paths]
    if not 0 < foreground_ratio <= 1:
        raise UserError(f"foreground_ratio must be in (0, 1] or null, got {foreground_ratio}")
    images = [_read_object(p) for p in paths]
    # Output pixels per source pixel, in units of the source's height (photos of other sizes zoom alike).
    zoom = min(fit_scale(image, height, width, foreground_ratio) * image.shape[0] / height for image in images)
    return [_recentre(image, height, width, zoom * height / image.shape[0]) for image in images]


def _read_object(path: str) -> torch.Tensor:
    """The file as (h, w, 4) straight alpha at its own size, matted if it has no transparency; a
    :class:`UserError` when there is no foreground."""
    rgba = read_rgba(path)
    if rgba[..., 3].min() >= 0.99:
        rgba[..., 3] = matte_uniform_background(rgba[..., :3], path)
        log.warning("%s has no transparency: matted it from the border colour; check the result or pass "
                    "an RGBA PNG with the object cut out", path)
    if (rgba[..., 3] > 0.5).sum() < MIN_FOREGROUND_PIXELS:
        raise UserError(f"no foreground found in {path}: its alpha channel is (almost) empty")
    return torch.from_numpy(rgba)


def read_rgba(path: str) -> np.ndarray:
    """(H, W, 4) float32 in [0, 1]; an image without alpha gets alpha = 1."""
    from lift3d.utils.images import open_image

    img = open_image(path)
    if img.mode in ("I;16", "I;16B", "I"):  # 16-bit grey
        grey = np.asarray(img, dtype=np.float32) / 65535.0
        return np.stack([grey] * 3 + [np.ones_like(grey)], -1)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    array = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    if array.shape[-1] == 3:
        array = np.concatenate([array, np.ones_like(array[..., :1])], -1)
    return np.ascontiguousarray(array)


def matte_uniform_background(rgb: np.ndarray, path: str = "image") -> np.ndarray:
    """Alpha (H, W) for an object on a roughly uniform background, from the border colour.

    The background colour is the median of the border pixels; a pixel is foreground when its
    colour is far from it. Specks are dropped (components much smaller than the largest one)
    and small holes are filled; large holes (a mug's handle) stay transparent.
    """
    from scipy import ndimage

    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    border_distance = np.linalg.norm(border - background, axis=-1)
    if np.mean(border_distance < 0.1) < 0.5:
        raise UserError(f"{path} has no alpha channel and its border is not a uniform colour, so the object "
                        "cannot be matted automatically; cut it out first (e.g. with rembg) and pass an RGBA PNG")
    # The threshold sits well above the background's own noise.
    threshold = float(np.clip(4 * np.quantile(border_distance, 0.75), 0.08, 0.3))
    distance = np.linalg.norm(rgb - background, axis=-1)
    mask = ndimage.binary_opening(distance > threshold, iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        raise UserError(f"no foreground found in {path}: every pixel has the background colour")
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    holes = ndimage.binary_fill_holes(mask) & ~mask
    hole_labels, n_holes = ndimage.label(holes)
    if n_holes:
        hole_sizes = ndimage.sum(holes, hole_labels, index=np.arange(1, n_holes + 1))
        mask |= np.isin(hole_labels, 1 + np.flatnonzero(hole_sizes < 0.01 * mask.sum()))
    return mask.astype(np.float32)


def foreground_bbox(alpha: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels with alpha > threshold; bottom/right exclusive."""
    rows = torch.nonzero((alpha > threshold).any(1)).flatten()
    cols = torch.nonzero((alpha > threshold).any(0)).flatten()
    if len(rows) == 0:
        raise UserError("no foreground found: the alpha channel is empty")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _resize_rgba(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased resize of straight-alpha RGBA; colour is averaged premultiplied so the
    (arbitrary) colour of transparent pixels does not bleed into the edges."""
    if tuple(image.shape[:2]) == (height, width):
        return image.clone()
    premultiplied = torch.cat([image[..., :3] * image[..., 3:], image[..., 3:]], -1)
    x = F.interpolate(premultiplied.permute(2, 0, 1)[None], size=(height, width), mode="bilinear",
                      align_corners=False, antialias=True)[0].permute(1, 2, 0).clamp(0, 1)
    alpha = x[..., 3:]
    rgb = torch.where(alpha > 1e-4, x[..., :3] / alpha.clamp_min(1e-4), torch.zeros_like(x[..., :3]))
    return torch.cat([rgb.clamp(0, 1), alpha], -1)


def fit_scale(image: torch.Tensor, height: int, width: int, ratio: float) -> float:
    """Output pixels per pixel of ``image`` that make its object's bounding box fit ``ratio`` of a
    ``height`` x ``width`` frame, its longest side touching that limit."""
    top, bottom, left, right = foreground_bbox(image[..., 3])
    return min(ratio * height / (bottom - top), ratio * width / (right - left))


def _recentre(image: torch.Tensor, height: int, width: int, scale: float) -> torch.Tensor:
    """``image`` scaled by ``scale`` with its object's bounding-box centre at the centre of the frame."""
    top, bottom, left, right = foreground_bbox(image[..., 3])
    # Crop with a small margin so soft edges below the bbox threshold survive the crop.
    margin = max(2, int(0.02 * max(bottom - top, right - left)))
    h, w = image.shape[:2]
    y0, y1, x0, x1 = max(0, top - margin), min(h, bottom + margin), max(0, left - margin), min(w, right + margin)
    crop = image[y0:y1, x0:x1]
    new_h, new_w = max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))
    crop = _resize_rgba(crop, new_h, new_w)
    # Shift so that the (scaled) bbox centre lands on the canvas centre.
    sy, sx = new_h / (y1 - y0), new_w / (x1 - x0)
    centre_y, centre_x = ((top + bottom) / 2 - y0) * sy, ((left + right) / 2 - x0) * sx
    oy, ox = round(height / 2 - centre_y), round(width / 2 - centre_x)
    canvas = torch.zeros(height, width, 4)
    cy0, cx0 = max(0, oy), max(0, ox)
    cy1, cx1 = min(height, oy + new_h), min(width, ox + new_w)
    canvas[cy0:cy1, cx0:cx1] = crop[cy0 - oy:cy1 - oy, cx0 - ox:cx1 - ox]
    return canvas
