"""A CPU renderer for ground-truth meshes: embree ray casting plus barycentric colour lookup.

It casts exactly the rays of :meth:`lift3d.cameras.Cameras.rays` (one per pixel centre), so its
images line up pixel for pixel with lift3d's volume renderer. With ``samples_per_pixel = k*k``
it casts a k x k grid of rays inside every pixel (the rays of the same cameras at k times the
resolution) and averages them, which antialiases the alpha edge.

Colour comes from the mesh's trimesh visuals: a UV texture (``SimpleMaterial.image`` or
``PBRMaterial.baseColorTexture`` times ``baseColorFactor``), vertex colours, face colours, a
plain material colour, or grey. Shading:

- ``"albedo"``: the colour as is;
- ``"lambert"``: colour * (ambient + (1 - ambient) * max(0, n . l)) with a light direction
  fixed in the world. It does not depend on the viewer, so a radiance field can reproduce it
  from every view (a headlight could not be).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from lift3d.cameras import Cameras

log = logging.getLogger(__name__)

DEFAULT_LIGHT_DIR = (0.6, 0.3, 1.0)   # world z-up: from above, on the side of the azimuth-0 camera
UNTEXTURED_GREY = 0.7


class MeshRaycaster:
    """Render a ``trimesh.Trimesh`` at :class:`~lift3d.cameras.Cameras` on the CPU.

    >>> out = MeshRaycaster(mesh).render(cameras, shading="lambert", samples_per_pixel=4)
    >>> out["rgba"].shape   # (B, H, W, 4) float32, straight (not premultiplied) alpha
    """

    def __init__(self, mesh, light_dir: Sequence[float] = DEFAULT_LIGHT_DIR, ambient: float = 0.4):
        import trimesh

        self.mesh = mesh
        self.light_dir = np.asarray(light_dir, dtype=np.float64) / np.linalg.norm(light_dir)
        self.ambient = float(ambient)
        if trimesh.ray.has_embree:
            from trimesh.ray.ray_pyembree import RayMeshIntersector
            self._intersector = RayMeshIntersector(mesh)
        else:  # pure numpy: correct but orders of magnitude slower
            log.warning("embreex is not installed: ground-truth ray casting will be very slow")
            from trimesh.ray.ray_triangle import RayMeshIntersector
            self._intersector = RayMeshIntersector(mesh)
        self._faces = np.asarray(mesh.faces)
        self._triangles = np.asarray(mesh.triangles)
        self._face_normals = np.asarray(mesh.face_normals)
        self._colour = _ColourSource(mesh)

    # ------------------------------------------------------------------ public

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> dict:
        """First hits of N rays: ``face_id`` (N,) int64 (-1: miss), ``t`` (N,) distance, ``position`` (N, 3)."""
        origins = np.asarray(origins, dtype=np.float64).reshape(-1, 3)
        directions = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
        n = len(origins)
        face_id = np.full(n, -1, dtype=np.int64)
        t = np.zeros(n)
        position = np.zeros((n, 3))
        if n:
            tri, ray, loc = self._intersector.intersects_id(origins, directions, multiple_hits=False,
                                                            return_locations=True)
            face_id[ray] = tri
            position[ray] = loc
            t[ray] = np.einsum("ij,ij->i", loc - origins[ray], directions[ray])
        return {"face_id": face_id, "t": t, "position": position}

    def render(self, cameras: Cameras, shading: str = "lambert", samples_per_pixel: int = 1) -> dict:
        """Render every camera. Returns CPU float32 tensors:

        - ``rgba`` (B, H, W, 4): colour with straight alpha (alpha = covered fraction of the pixel);
        - ``depth`` (B, H, W): distance along the ray to the first hit, 0 where empty;
        - ``normal`` (B, H, W, 3): world-space unit normal of the hit faces, turned towards the camera;
        - ``position`` (B, H, W, 3): world-space hit point (0 where empty);
        - ``mask`` (B, H, W) bool: alpha >= 0.5;
        - ``face_id`` (B, H, W) int64, -1 where empty (only with ``samples_per_pixel == 1``).
        With supersampling, depth, normal and position average the samples that hit.
        """
        if shading not in ("albedo", "lambert"):
            raise ValueError(f"shading must be 'albedo' or 'lambert', got {shading!r}")
        k = int(round(samples_per_pixel ** 0.5))
        if k < 1 or k * k != samples_per_pixel:
            raise ValueError(f"samples_per_pixel must be a square number (1, 4, 9, ...), got {samples_per_pixel}")
        cameras = cameras.to("cpu")
        fine = cameras if k == 1 else cameras.with_size(cameras.height * k, cameras.width * k)
        views = []
        for i in range(len(cameras)):  # one view at a time bounds the memory of supersampled rays
            origins, directions = fine[i].rays()
            view = self._render_rays(origins.reshape(-1, 3).double().numpy(),
                                     directions.reshape(-1, 3).double().numpy(), shading)
            view = {key: value.reshape(1, fine.height, fine.width, -1) for key, value in view.items()}
            views.append(_downsample(view, k) if k > 1 else view)
        out = {key: np.concatenate([v[key] for v in views]) for key in views[0]}
        result = {
            "rgba": torch.from_numpy(np.concatenate([out["rgb"], out["alpha"]], -1)).float(),
            "depth": torch.from_numpy(out["depth"][..., 0]).float(),
            "normal": torch.from_numpy(out["normal"]).float(),
            "position": torch.from_numpy(out["position"]).float(),
        }
        result["mask"] = result["rgba"][..., 3] >= 0.5
        if k == 1:
            result["face_id"] = torch.from_numpy(out["face_id"][..., 0])
        return result

    # ------------------------------------------------------------------ internals

    def _render_rays(self, origins: np.ndarray, directions: np.ndarray, shading: str) -> dict:
        hit = self.cast(origins, directions)
        face_id = hit["face_id"]
        valid = face_id >= 0
        n = len(face_id)
        rgb, normal = np.zeros((n, 3)), np.zeros((n, 3))
        if valid.any():
            f, points = face_id[valid], hit["position"][valid]
            normals = self._face_normals[f]
            # Two-sided: a face seen from behind shows its other side.
            flip = np.einsum("ij,ij->i", normals, directions[valid]) > 0
            normals[flip] *= -1
            normal[valid] = normals
            colour = self._colour.lookup(f, self._barycentric(f, points))
            if shading == "lambert":
                lit = np.clip(normals @ self.light_dir, 0, None)
                colour = colour * (self.ambient + (1 - self.ambient) * lit)[:, None]
            rgb[valid] = np.clip(colour, 0, 1)
        return {"rgb": rgb, "alpha": valid.astype(np.float64)[:, None], "depth": hit["t"][:, None],
                "normal": normal, "position": hit["position"], "face_id": face_id[:, None]}

    def _barycentric(self, face_id: np.ndarray, points: np.ndarray) -> np.ndarray:
        from trimesh.triangles import points_to_barycentric

        bary = points_to_barycentric(self._triangles[face_id], points)
        bary = np.clip(np.nan_to_num(bary), 0, 1)  # degenerate triangles, float noise at edges
        return bary / np.maximum(bary.sum(-1, keepdims=True), 1e-12)


class _ColourSource:
    """Per-hit colour from a trimesh visual: texture, vertex colours, face colours or a constant."""

    def __init__(self, mesh):
        visual = mesh.visual
        self.faces = np.asarray(mesh.faces)
        self.kind, self.constant = "constant", np.full(3, UNTEXTURED_GREY)
        if visual.kind == "texture":
            material = visual.material
            if hasattr(material, "baseColorTexture"):  # PBR (glTF): the factor multiplies the texture
                image = material.baseColorTexture
                factor = _rgb01(material.baseColorFactor) if material.baseColorFactor is not None else np.ones(3)
            else:  # OBJ convention: map_Kd replaces Kd
                image = getattr(material, "image", None)
                factor = _rgb01(material.main_color) if getattr(material, "main_color", None) is not None else None
            if image is not None and visual.uv is not None and len(visual.uv) == len(mesh.vertices):
                self.kind = "texture"
                self.uv = np.asarray(visual.uv, dtype=np.float64)
                self.image = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
                self.factor = factor if hasattr(material, "baseColorTexture") else np.ones(3)
            elif factor is not None:
                self.constant = factor
        elif visual.kind == "vertex":
            self.kind, self.vertex_colors = "vertex", np.asarray(visual.vertex_colors[:, :3], np.float64) / 255.0
        elif visual.kind == "face":
            self.kind, self.face_colors = "face", np.asarray(visual.face_colors[:, :3], np.float64) / 255.0

    def lookup(self, face_id: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """(N, 3) RGB in [0, 1] at the points with barycentric coordinates ``bary`` on ``face_id``."""
        if self.kind == "texture":
            uv = np.einsum("nk,nkc->nc", bary, self.uv[self.faces[face_id]])
            return sample_bilinear(self.image, uv) * self.factor
        if self.kind == "vertex":
            return np.einsum("nk,nkc->nc", bary, self.vertex_colors[self.faces[face_id]])
        if self.kind == "face":
            return self.face_colors[face_id]
        return np.broadcast_to(self.constant, (len(face_id), 3)).copy()


def _rgb01(colour) -> np.ndarray:
    """First three channels of a uint8 (0-255) or float (0-1) colour, as floats in [0, 1]."""
    c = np.asarray(colour)[:3]
    return c.astype(np.float64) / 255.0 if np.issubdtype(c.dtype, np.integer) else c.astype(np.float64)


def sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of an (H, W, C) texture at UVs (N, 2); v = 0 is the bottom row, UVs wrap."""
    h, w = image.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = (1.0 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    x1, y1 = (x0 + 1) % w, (y0 + 1) % h
    x0, y0 = x0 % w, y0 % h
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _downsample(out: dict, k: int) -> dict:
    """Average k x k blocks of samples: colour premultiplied, geometry over the samples that hit."""

    def blocks(x):  # (B, H*k, W*k, C) -> (B, H, W, k*k, C)
        b, hk, wk, c = x.shape
        return x.reshape(b, hk // k, k, wk // k, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hk // k, wk // k, k * k, c)

    hit = blocks(out["alpha"])
    alpha = hit.mean(3)
    count = np.maximum(hit.sum(3), 1)
    rgb = (blocks(out["rgb"]) * hit).sum(3) / count
    normal = (blocks(out["normal"]) * hit).sum(3)
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
    return {"rgb": rgb, "alpha": alpha, "depth": (blocks(out["depth"]) * hit).sum(3) / count,
            "normal": normal, "position": (blocks(out["position"]) * hit).sum(3) / count}
