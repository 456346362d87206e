"""Image loading and resizing, grids and turntable videos."""

from __future__ import annotations

import numpy as np

from lift3d.utils import io


def resize(images, size, mode: str = "bilinear", channels_last: bool = False, antialias: bool = False):
    """The one image resize of lift3d: a batch (B,C,H,W), or (B,H,W,C) with ``channels_last``, to
    ``size`` = (h, w) or an int for a square. Returns a contiguous tensor in the input's layout; a
    batch already at that size comes back unchanged (no copy, no round-off)."""
    import torch.nn.functional as F

    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    x = images.permute(0, 3, 1, 2) if channels_last else images
    if tuple(x.shape[-2:]) == size:
        return images
    kwargs = {} if mode in ("area", "nearest") else dict(align_corners=False, antialias=antialias)
    x = F.interpolate(x.contiguous(), size=size, mode=mode, **kwargs)
    return x.permute(0, 2, 3, 1).contiguous() if channels_last else x


def open_image(path: str):
    """``path`` as a loaded PIL image (EXIF orientation applied). Raises :class:`UserError` (one line) for a
    missing path, a folder, an unreadable or damaged file, absurd dimensions, or 32-bit float pixels (whose
    range no file says: 0..1 or 0..255)."""
    from PIL import Image, ImageOps

    from lift3d.errors import UserError
    from lift3d.utils.inputs import require_file

    hint = "pass an RGBA PNG (or an RGB photo)"
    require_file(path, "image", hint)     # a folder, a FIFO, a link loop: named for what it is
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # photos taken in portrait orientation
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read image {path}: {text}") from None
    if img.mode in ("F", "I;32", "I;32B") or img.mode.startswith("F;"):
        raise UserError(f"image {path} has 32-bit float pixels (mode {img.mode}), whose range lift3d cannot tell; "
                        "save it as an 8- or 16-bit PNG")
    return img


def load_image(path: str, size=None):
    """An image file -> (1, 3, size, size) float tensor in [0, 1], alpha composited on white, then
    resized with :func:`resize` (bicubic, antialiased, as PIL's) when ``size`` is given (None: as stored)."""
    import torch

    image = open_image(path).convert("RGBA")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    rgb, alpha = x[:, :3], x[:, 3:]
    x = rgb * alpha + (1 - alpha)
    return x if size is None else resize(x, size, mode="bicubic", antialias=True).clamp(0, 1)


def image_grid(images, columns: int = 0) -> np.ndarray:
    """Tile (H,W,3) images (tensors or arrays in [0,1], same size) into one image."""
    arrays = [np.asarray(i.detach().cpu() if hasattr(i, "detach") else i, dtype=np.float32)[..., :3] for i in images]
    columns = columns or len(arrays)
    rows = [arrays[i:i + columns] for i in range(0, len(arrays), columns)]
    blank = np.ones_like(arrays[0])
    rows[-1] = rows[-1] + [blank] * (columns - len(rows[-1]))
    return np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)


def save_video(stem: str, frames: list, fps: int = 30) -> str:
    """Write uint8 frames as ``stem.mp4`` (``stem.gif`` when no ffmpeg is available); returns the path.
    Raises io.WriteFailed, the previous video intact, when the encoder fails (a full disk)."""
    import imageio.v2 as imageio

    try:
        import imageio_ffmpeg  # (the wheel carries its own ffmpeg binary)
    except ImportError:
        path = stem + ".gif"
        with io.atomic_path(path) as tmp:
            imageio.mimwrite(tmp, frames, duration=1 / fps, format="GIF")
        return path
    path = stem + ".mp4"
    with io.atomic_path(path) as tmp:
        _ffmpeg_mp4(imageio_ffmpeg.get_ffmpeg_exe(), tmp, path, frames, fps)
    return path


def _ffmpeg_mp4(exe: str, tmp: str, path: str, frames: list, fps: int) -> None:
    """imageio's FFMPEG writer's command (H.264, yuv420p, no resizing), run here because imageio
    ignores ffmpeg's exit status: on a full disk it left a cut-off video and ffmpeg's lines on the terminal."""
    import subprocess

    try:
        from imageio_ffmpeg._io import get_first_available_h264_encoder
        codec = get_first_available_h264_encoder()
    except ImportError:
        codec = "libx264"
    data = np.ascontiguousarray(np.stack([np.asarray(f, dtype=np.uint8) for f in frames]))
    if data.ndim == 3:
        data = data[..., None]
    pix_fmt = {1: "gray", 2: "ya8", 3: "rgb24", 4: "rgba"}[data.shape[-1]]
    cmd = [exe, "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{data.shape[2]}x{data.shape[1]}",
           "-pix_fmt", pix_fmt, "-r", str(fps), "-i", "-", "-an", "-vcodec", codec, "-pix_fmt", "yuv420p",
           "-v", "error", tmp]
    r = subprocess.run(cmd, input=data.tobytes(), capture_output=True)
    if r.returncode != 0:
        lines = r.stderr.decode(errors="replace").strip().splitlines()
        reason = "No space left on device" if "No space left" in r.stderr.decode(errors="replace") else \
            (lines[-1][:160] if lines else f"ffmpeg exit status {r.returncode}")
        raise io.WriteFailed(path, reason)
