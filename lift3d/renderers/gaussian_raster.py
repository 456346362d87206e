"""3D Gaussian splatting in plain PyTorch: tile-based, depth-sorted alpha compositing that runs and
back-propagates on a CPU (autograd through ordinary tensor ops), with gsplat's conventions, and
gsplat's CUDA rasterizer instead when it is installed and the Gaussians are on a GPU.

The maths and constants follow gsplat v1.4.0 (read in its git tag: gsplat/cuda/csrc/utils.cuh,
fully_fused_projection_fwd.cu, isect_tiles.cu, rasterize_to_pixels_fwd.cu, rendering.py):
- world -> camera with an OpenCV view matrix (x right, y down, z forward); lift3d's c2w is OpenGL
  (y up, looking down -z), so its y and z columns are negated before inverting;
- pinhole projection, pixel centres at (j + 0.5, i + 0.5), cx = W/2 - pixel_shift (Cameras.intrinsics);
- Sigma = R S S^T R^T (quaternion wxyz normalised, linear scales); Sigma2d = J W Sigma W^T J^T + eps2d I
  (eps2d = 0.3, the low-pass), J evaluated at the mean with x/z, y/z clamped to the view frustum
  widened by 30% (keeps J sane for Gaussians far off-screen);
- culled when z < near_plane (0.01) or z > far_plane, det(Sigma2d) <= 0, or off-image;
- radius = ceil(3 sqrt(lambda_max)), lambda_max = b + sqrt(max(0.01, b^2 - det)), b = trace / 2;
  a Gaussian is bound to the 16x16 tiles [floor((x - r)/16), ceil((x + r)/16)) in x and y;
- alpha = min(0.999, o exp(-sigma)), sigma = d^T Sigma2d^-1 d / 2, d = mean2d - pixel; skipped when
  alpha < 1/255 or sigma < 0; front to back by view z; a pixel stops *before* the Gaussian that
  would bring its transmittance to <= 1e-4 (that one is not drawn). Antialiased mode multiplies the
  opacity by sqrt(det(Sigma2d before blur) / det(Sigma2d)).
(gsplat's HEAD, 1.6 / commit 90d7b4b, changed some: MAX_ALPHA 0.99 and per-axis radii ceil(3.33
sqrt(Sigma2d_ii)), shrunk for faint Gaussians; this module keeps v1.4.0's.)

Outputs match the volume renderer's: comp_rgb = fg + (1 - opacity) bg; ``depth`` is the distance along
the pixel's unit ray, sum_i w_i t_i with t_i = z_i |(x_n, y_n, 1)| (how far the pixel's ray runs to
the view plane z = z_i of Gaussian i's mean), plus (1 - opacity) * background_depth, as volume.py's t;
comp_normal = (sum_i w_i n_i + 1) / 2 with n_i the world direction of Gaussian i's shortest axis,
turned toward the camera.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from lift3d.cameras import Cameras

MAX_ALPHA = 0.999
ALPHA_THRESHOLD = 1.0 / 255.0
TRANSMITTANCE_THRESHOLD = 1e-4
# With gradients, a render that evaluates more pixel-Gaussian pairs than this (autograd keeps ~40 bytes
# a pair: ~300 MB here) rebuilds each chunk's graph in backward instead (~+40% time).
RECOMPUTE_PAIRS = 2 ** 23


@functools.lru_cache(maxsize=1)
def _gsplat():
    """The gsplat module, or None: an optional CUDA accelerator (like tinycudann, used when installed)."""
    try:
        import gsplat
    except Exception:  # ImportError, or a broken build that fails on import
        return None
    return gsplat


def gsplat_available() -> bool:
    """True when gsplat imports and CUDA is there (gsplat's rasterizer is CUDA only)."""
    return _gsplat() is not None and torch.cuda.is_available()


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) wxyz quaternions, any norm -> (..., 3, 3) rotation matrices."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).unflatten(-1, (3, 3))


def view_matrices(cameras: Cameras, dtype=torch.float32, device=None) -> torch.Tensor:
    """(B, 4, 4) world-to-camera matrices in gsplat's (OpenCV) convention from lift3d's OpenGL c2w."""
    c2w = cameras.c2w.to(device=device, dtype=dtype)
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=dtype, device=c2w.device)
    return torch.linalg.inv(c2w * flip)          # c2w @ diag(1, -1, -1, 1): y down, z forward


def project(means, scales, quats, cameras: Cameras, eps2d: float = 0.3, near_plane: float = 0.01,
            far_plane: float = 1e10) -> dict:
    """Per view and Gaussian: means2d (B, N, 2) in pixels, cov2d (B, N, 2, 2) with the low-pass,
    conics (B, N, 3) = entries (0,0), (0,1), (1,1) of its inverse, depths (B, N) view z,
    radii (B, N) int32 (0 = culled), compensation (B, N) and the view matrices (B, 4, 4)."""
    dtype, dev, W, H = means.dtype, means.device, cameras.width, cameras.height
    view = view_matrices(cameras, dtype, dev)
    Rv, tv = view[:, :3, :3], view[:, :3, 3]
    M = quat_to_rotmat(quats) * scales[:, None, :]                    # R S
    cov3d = M @ M.transpose(-1, -2)
    mc = torch.einsum("bij,nj->bni", Rv, means) + tv[:, None]          # (B, N, 3) camera frame
    cov_c = Rv[:, None] @ cov3d[None] @ Rv.transpose(-1, -2)[:, None]  # W Sigma W^T
    f = cameras.focal.to(device=dev, dtype=dtype)[:, None]             # fx = fy, (B, 1)
    cx, cy = W / 2 - cameras.pixel_shift[0], H / 2 - cameras.pixel_shift[1]
    x, y, z = mc.unbind(-1)
    valid = (z >= near_plane) & (z <= far_plane)
    z = torch.where(valid, z, torch.ones_like(z))    # culled ones: finite values, no gradient
    tan_x, tan_y = 0.5 * W / f, 0.5 * H / f
    tx = z * torch.minimum(torch.maximum(x / z, -(cx / f + 0.3 * tan_x)), (W - cx) / f + 0.3 * tan_x)
    ty = z * torch.minimum(torch.maximum(y / z, -(cy / f + 0.3 * tan_y)), (H - cy) / f + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    J = torch.stack([f / z, zero, -f * tx / z ** 2, zero, f / z, -f * ty / z ** 2], -1).unflatten(-1, (2, 3))
    cov2d = J @ cov_c @ J.transpose(-1, -2)
    det_orig = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    cov2d = cov2d + eps2d * torch.eye(2, dtype=dtype, device=dev)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    valid = valid & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c, -b, a], -1) / det_safe[..., None]
    compensation = torch.sqrt(torch.clamp(det_orig / det_safe, min=0.0))
    means2d = torch.stack([f * x / z + cx, f * y / z + cy], -1)
    with torch.no_grad():   # the radius only picks tiles: not differentiable (as in gsplat)
        half = 0.5 * (a + c)
        radius = torch.ceil(3.0 * torch.sqrt(half + torch.sqrt(torch.clamp(half * half - det, min=0.01))))
        u, v = means2d.unbind(-1)
        valid = valid & (radius > 0) & (u + radius > 0) & (u - radius < W) & (v + radius > 0) & (v - radius < H)
        radii = torch.where(valid, radius, torch.zeros_like(radius)).int()
    return {"means2d": means2d, "cov2d": cov2d, "conics": conics, "depths": mc[..., 2], "radii": radii,
            "compensation": compensation, "viewmats": view}


@torch.no_grad()
def bin_tiles(means2d, radii, depths, height: int, width: int, tile_size: int = 16):
    """Bind each visible (view, Gaussian) to the tiles its radius touches and sort the pairs by
    (view, tile, depth). Returns the flat ids (b * N + n) of the sorted pairs and, per global tile
    (b * tiles_per_view + ty * tiles_x + tx), its start in that list and its count."""
    B, N = radii.shape
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    r = radii.reshape(-1).to(means2d.dtype)
    xy = means2d.detach().reshape(-1, 2) / tile_size
    x0 = torch.floor(xy[:, 0] - r / tile_size).clamp(0, tiles_x).long()
    x1 = torch.ceil(xy[:, 0] + r / tile_size).clamp(0, tiles_x).long()
    y0 = torch.floor(xy[:, 1] - r / tile_size).clamp(0, tiles_y).long()
    y1 = torch.ceil(xy[:, 1] + r / tile_size).clamp(0, tiles_y).long()
    counts = (x1 - x0) * (y1 - y0) * (radii.reshape(-1) > 0)
    # Depth order first, then a stable sort by tile keeps each tile's list front to back.
    order = torch.argsort(depths.detach().reshape(-1), stable=True)
    order = order[counts[order] > 0]
    reps = counts[order]
    pair = order.repeat_interleave(reps)                                   # flat id of each pair
    local = torch.arange(len(pair), device=pair.device) - (torch.cumsum(reps, 0) - reps).repeat_interleave(reps)
    span = (x1 - x0)[pair]
    tile = (y0[pair] + local // span) * tiles_x + x0[pair] + local % span
    key = torch.div(pair, N, rounding_mode="floor") * (tiles_x * tiles_y) + tile
    key, perm = torch.sort(key, stable=True)
    per_tile = torch.bincount(key, minlength=B * tiles_x * tiles_y)
    return pair[perm], torch.cumsum(per_tile, 0) - per_tile, per_tile


def _composite(corner, offs, xy, conic, opac, feats):
    """Tiles (m, with top-left pixel corners (m, 2)) x pixels (P = S x S, offsets (S,)) x their
    Gaussians (K, front to back; padding has opacity 0): the sums sum_i w_i f_i (m, P, F) and
    sum_i w_i (m, P, 1), with w_i = alpha_i T_i."""
    m, S, K = len(corner), len(offs), xy.shape[1]
    dx = xy[:, None, :, 0] - (corner[:, 0, None] + offs)[..., None]     # (m, S, K) per column: mean - pixel
    dy = xy[:, None, :, 1] - (corner[:, 1, None] + offs)[..., None]     # per row
    a, b, c = (conic[:, None, :, k] for k in range(3))
    # sigma = (a dx^2 + c dy^2) / 2 + b dx dy, built from per-row and per-column parts: 3 full-size ops.
    sigma = ((0.5 * a * dx * dx)[:, None] + (0.5 * c * dy * dy)[:, :, None]
             + (b * dx)[:, None] * dy[:, :, None]).reshape(m, S * S, K)
    # Capped: exp of a large negative argument takes a slow underflow path on CPUs (50x), and beyond
    # sigma = ln 255 alpha < 1/255 is dropped anyway.
    alpha = torch.clamp(opac[:, None] * torch.exp(-sigma.clamp(max=30.0)), max=MAX_ALPHA)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, 0.0)
    t_after = torch.cumprod(1 - alpha, -1)
    t_before = torch.cat([torch.ones_like(t_after[..., :1]), t_after[..., :-1]], -1)
    # T only falls, so "this one leaves T > 1e-4" holds for a prefix of the list: gsplat's early stop.
    w = torch.where(t_after > TRANSMITTANCE_THRESHOLD, alpha * t_before, 0.0)
    return torch.einsum("mpk,mkf->mpf", w, feats), w.sum(-1, keepdim=True)


class _Recomputed(torch.autograd.Function):
    """_composite that keeps only its inputs for backward and rebuilds its graph there (activation
    checkpointing without torch.utils.checkpoint, whose first call imports torch._dynamo: seconds)."""

    @staticmethod
    def forward(ctx, *args):
        ctx.save_for_backward(*args)
        return _composite(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = [a.detach().requires_grad_(need) for a, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            outs = _composite(*args)
        wanted = [a for a in args if a.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
        return tuple(next(got) if a.requires_grad else None for a in args)


def rasterize(means, scales, quats, opacities, colors, cameras: Cameras, bg=None, *, normals: bool = False,
              background_depth: float = 0.0, near_plane: float = 0.01, far_plane: float = 1e10,
              eps2d: float = 0.3, antialiased: bool = False, tile_size: int = 16,
              chunk_elements: int = 2 ** 19, use_checkpoint: Optional[bool] = None, backend: str = "auto") -> dict:
    """Render N Gaussians (means (N, 3), linear scales (N, 3), wxyz quats (N, 4), opacities (N,) in
    [0, 1], colors (N, C) or per view (B, N, C)) into the B views of ``cameras``.

    Returns comp_rgb, comp_rgb_fg, comp_rgb_bg (B, H, W, C), opacity, depth (B, H, W, 1), comp_normal
    (B, H, W, 3) when ``normals``, and per view radii (B, N) int32 (0: not drawn), means2d (B, N, 2)
    (a non-leaf in the graph: call ``.retain_grad()`` on it before backward for view-space gradients)
    and depths (B, N) view z. bg: anything that broadcasts to (B, H, W, C); None is black.

    Tiles are processed in chunks of about ``chunk_elements`` (tile pixels x Gaussians) pairs (small
    enough to stay in cache); with gradients and over RECOMPUTE_PAIRS pairs in all, or
    ``use_checkpoint=True``, each chunk is recomputed in backward, so peak memory is one chunk plus
    the images. backend: "torch", "gsplat" or "auto" (gsplat for CUDA tensors when it is installed;
    a gsplat >= 1.5 then draws with its own, newer constants)."""
    if backend == "gsplat" or (backend == "auto" and means.is_cuda and gsplat_available()):
        return _rasterize_gsplat(means, scales, quats, opacities, colors, cameras, bg, normals, background_depth,
                                 near_plane, far_plane, eps2d, antialiased, tile_size)
    B, H, W, N = len(cameras), cameras.height, cameras.width, means.shape[0]
    dtype, dev = means.dtype, means.device
    proj = project(means, scales, quats, cameras, eps2d, near_plane, far_plane)
    means2d, radii = proj["means2d"], proj["radii"]
    opac = opacities[None].expand(B, N) * (proj["compensation"] if antialiased else 1.0)
    feats = [colors.to(dtype).expand(B, N, colors.shape[-1]), proj["depths"][..., None]]
    if normals:
        feats.append(_normals(means, scales, quats, cameras))
    feats = torch.cat(feats, -1).reshape(B * N, -1)

    gids, starts, counts = bin_tiles(means2d, radii, proj["depths"], H, W, tile_size)
    tiles_x, tiles_y = math.ceil(W / tile_size), math.ceil(H / tile_size)
    P = tile_size * tile_size
    offs = torch.arange(tile_size, device=dev, dtype=dtype) + 0.5      # pixel centres within a tile
    # Tiles in order of decreasing count, cut into chunks of <= chunk_elements pairs, each padded to
    # its first tile's count; a chunk also ends where counts drop below half of that (little padding).
    order = torch.argsort(counts, descending=True, stable=True)
    order = order[counts[order] > 0]
    sizes, chunks, i = counts[order].tolist(), [], 0
    while i < len(sizes):
        K, j = sizes[i], i + 1
        while j < len(sizes) and (j - i + 1) * P * K <= chunk_elements and 2 * sizes[j] >= K:
            j += 1
        chunks.append((order[i:j], K))
        i = j
    pairs = sum(len(tiles) * P * K for tiles, K in chunks)
    recompute = torch.is_grad_enabled() and (pairs > RECOMPUTE_PAIRS if use_checkpoint is None else use_checkpoint)
    flat_xy, flat_conic, flat_opac = means2d.reshape(-1, 2), proj["conics"].reshape(-1, 3), opac.reshape(-1)
    out_tiles, out_vals = [], []
    for tiles, K in chunks:
        slot = torch.arange(K, device=dev)
        valid = slot < counts[tiles][:, None]
        g = gids[torch.where(valid, starts[tiles][:, None] + slot, torch.zeros_like(slot))]   # (m, K)
        local = tiles % (tiles_x * tiles_y)
        corner = torch.stack([local % tiles_x, local // tiles_x], -1).to(dtype) * tile_size
        args = (corner, offs, flat_xy[g], flat_conic[g], torch.where(valid, flat_opac[g], 0.0), feats[g])
        fg, alpha = _Recomputed.apply(*args) if recompute else _composite(*args)
        out_tiles.append(tiles)
        out_vals.append(torch.cat([fg, alpha], -1))
    n_feat = feats.shape[-1] + 1
    image = torch.zeros(B * tiles_x * tiles_y, P, n_feat, dtype=dtype, device=dev)
    if out_tiles:
        image = image.index_copy(0, torch.cat(out_tiles), torch.cat(out_vals))
    image = (image.reshape(B, tiles_y, tiles_x, tile_size, tile_size, n_feat).permute(0, 1, 3, 2, 4, 5)
             .reshape(B, tiles_y * tile_size, tiles_x * tile_size, n_feat)[:, :H, :W])
    C = colors.shape[-1]
    return _finish(image[..., :C], image[..., C:C + 1], image[..., -1:], image[..., C + 1:C + 4] if normals else None,
                   bg, cameras, background_depth, {"radii": radii, "means2d": means2d, "depths": proj["depths"]})


def _normals(means, scales, quats, cameras: Cameras) -> torch.Tensor:
    """(B, N, 3) world normals: each Gaussian's shortest axis, flipped to face each camera."""
    R = quat_to_rotmat(quats)
    axis = torch.gather(R, 2, scales.detach().argmin(-1)[:, None, None].expand(-1, 3, 1))[..., 0]   # (N, 3)
    to_cam = cameras.position.to(means)[:, None] - means[None]                                    # (B, N, 3)
    facing = (to_cam * axis).sum(-1, keepdim=True) >= 0
    return torch.where(facing, axis, -axis)


def _finish(fg, depth_z, opacity, normal, bg, cameras: Cameras, background_depth, extra) -> dict:
    """Background, ray-distance depth and normal colours, as volume.py composes them."""
    B, H, W, C = fg.shape
    f = cameras.focal.to(fg)[:, None, None]
    i, j = torch.meshgrid(torch.arange(H, device=fg.device, dtype=fg.dtype),
                          torch.arange(W, device=fg.device, dtype=fg.dtype), indexing="ij")
    xn = (j + 0.5 + cameras.pixel_shift[0] - W / 2) / f
    yn = (i + 0.5 + cameras.pixel_shift[1] - H / 2) / f
    ray_len = torch.sqrt(xn ** 2 + yn ** 2 + 1)[..., None]       # |(x_n, y_n, 1)|: view z -> ray distance
    bg_img = torch.zeros_like(fg) if bg is None else torch.as_tensor(bg, dtype=fg.dtype, device=fg.device).expand(B, H, W, C)
    out = {"comp_rgb": fg + (1 - opacity) * bg_img, "comp_rgb_fg": fg, "comp_rgb_bg": bg_img, "opacity": opacity,
           "depth": depth_z * ray_len + (1 - opacity) * background_depth, **extra}
    if normal is not None:
        out["comp_normal"] = (normal + 1) / 2
    return out


def _rasterize_gsplat(means, scales, quats, opacities, colors, cameras, bg, normals, background_depth,
                      near_plane, far_plane, eps2d, antialiased, tile_size) -> dict:
    """The same render by gsplat.rasterization (CUDA); normals ride along as extra colour channels."""
    B, N, C = len(cameras), means.shape[0], colors.shape[-1]
    feats = [colors.expand(B, N, C)] + ([_normals(means, scales, quats, cameras)] if normals else [])
    Ks = cameras.intrinsics().to(means)
    render, alpha, meta = _gsplat().rasterization(
        means, quats, scales, opacities, torch.cat(feats, -1), view_matrices(cameras, means.dtype, means.device), Ks,
        cameras.width, cameras.height, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, tile_size=tile_size,
        render_mode="RGB+D", rasterize_mode="antialiased" if antialiased else "classic", packed=False)
    radii = meta["radii"]
    radii = radii.amax(-1) if radii.dim() == 3 else radii          # gsplat >= 1.5: per-axis radii
    return _finish(render[..., :C], render[..., -1:], alpha, render[..., C:C + 3] if normals else None, bg, cameras,
                   background_depth, {"radii": radii.int(), "means2d": meta["means2d"], "depths": meta["depths"]})
