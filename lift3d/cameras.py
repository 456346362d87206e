"""Cameras in lift3d's world frame: z-up, placed by elevation / azimuth / distance, looking at the origin.

Conventions (see ../shared/conventions.md):
- position = distance * (cos e cos a, cos e sin a, sin e); elevation e above the xy-plane,
  azimuth a from +x towards +y, both in degrees.
- ``c2w`` is camera-to-world in the OpenGL convention: the camera looks down its -z axis,
  +y is image-up, +x is image-right. Pixel (row i, col j) has its centre at (j + 0.5, i + 0.5).
- The Zero123 relative pose of a target view w.r.t. a condition view is
  [theta_t - theta_c, sin(phi_t - phi_c), cos(phi_t - phi_c), r_t - r_c] with polar
  theta = arccos(z / r) and azimuth phi = atan2(y, x), in radians. Stable-Zero123 puts theta_c
  in the last slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def spherical_to_position(elevation_deg, azimuth_deg, distance) -> torch.Tensor:
    e = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float32))
    a = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float32))
    d = torch.as_tensor(distance, dtype=torch.float32)
    return torch.stack([d * torch.cos(e) * torch.cos(a), d * torch.cos(e) * torch.sin(a), d * torch.sin(e)], -1)


def position_to_spherical(position: torch.Tensor) -> torch.Tensor:
    """Camera positions (..., 3) -> (elevation°, azimuth°, distance) (..., 3): the inverse of
    :func:`spherical_to_position`."""
    r = position.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((position[..., 2] / r).clamp(-1, 1)))
    azimuth = torch.rad2deg(torch.atan2(position[..., 1], position[..., 0]))
    return torch.stack([elevation, azimuth, r], -1)


def zero123_pose_vectors(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Zero123 pose [Δpolar, sin Δazimuth, cos Δazimuth, Δdistance] of ``target`` views relative to
    ``source`` views, both (..., 3) as (elevation°, azimuth°, distance), broadcast -> (..., 4)."""
    d_polar = torch.deg2rad(source[..., 0] - target[..., 0])       # (90 − e_t) − (90 − e_s)
    d_az = torch.deg2rad(target[..., 1] - source[..., 1])
    return torch.stack([d_polar, torch.sin(d_az), torch.cos(d_az), target[..., 2] - source[..., 2]], -1)


def look_at(eye: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Camera-to-world matrices (B, 4, 4) for eyes (B, 3) looking at ``target`` with +z up."""
    eye = eye.reshape(-1, 3).float()
    target = torch.zeros_like(eye) if target is None else target.reshape(-1, 3).float().expand_as(eye)
    forward = F.normalize(target - eye, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0]).expand_as(forward).clone()
    # Straight up or down the z axis the up vector is ill-defined: use +y there.
    degenerate = torch.cross(forward, up, dim=-1).norm(dim=-1) < 1e-6
    up[degenerate] = torch.tensor([0.0, 1.0, 0.0])
    right = F.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, cam_up, -forward, eye
    return c2w


@dataclass
class Cameras:
    """A batch of B pinhole cameras that share one image size.

    ``pixel_shift`` (x, y), in pixels, moves every pixel centre off the regular grid: a strided
    subset of a larger image's pixels is a smaller camera with a shift (``strided``)."""

    c2w: torch.Tensor          # (B, 4, 4)
    fovy_deg: torch.Tensor     # (B,)
    height: int
    width: int
    pixel_shift: tuple = (0.0, 0.0)

    @classmethod
    def from_spherical(cls, elevation_deg, azimuth_deg, distance, fovy_deg, height: int, width: int) -> "Cameras":
        elevation_deg, azimuth_deg, distance, fovy_deg = (
            torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (elevation_deg, azimuth_deg, distance, fovy_deg))
        n = max(len(elevation_deg), len(azimuth_deg), len(distance), len(fovy_deg))
        elevation_deg, azimuth_deg, distance, fovy_deg = (v.expand(n) for v in (elevation_deg, azimuth_deg, distance, fovy_deg))
        return cls(look_at(spherical_to_position(elevation_deg, azimuth_deg, distance)), fovy_deg.clone(), int(height), int(width))

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(self.c2w[index], self.fovy_deg[index], self.height, self.width, self.pixel_shift)

    def to(self, device) -> "Cameras":
        return Cameras(self.c2w.to(device), self.fovy_deg.to(device), self.height, self.width, self.pixel_shift)

    def with_size(self, height: int, width: int) -> "Cameras":
        """The same views at another image size (the same field of view, pixels on the regular grid)."""
        return Cameras(self.c2w, self.fovy_deg, int(height), int(width))

    def strided(self, stride: int, row: int, col: int) -> "Cameras":
        """The pixels (row + stride * i, col + stride * j) of these views as cameras of their own
        (H / stride x W / stride): the same rays, so a render of them is that subset of the full render."""
        if self.height % stride or self.width % stride or not (0 <= row < stride and 0 <= col < stride):
            raise ValueError(f"cannot take every {stride}th pixel from ({row}, {col}) of a "
                             f"{self.height}x{self.width} image")
        # Pixel j of the small image has its centre at stride * (j + 0.5) - stride / 2 in the big one's
        # centred coordinates; the shift moves it to col + 0.5 + stride * j.
        shift = tuple((o + 0.5 - stride / 2) / stride + s / stride for o, s in zip((col, row), self.pixel_shift))
        return Cameras(self.c2w, self.fovy_deg, self.height // stride, self.width // stride, shift)

    @staticmethod
    def cat(cameras: Sequence["Cameras"]) -> "Cameras":
        assert len({(c.height, c.width, c.pixel_shift) for c in cameras}) == 1, "cameras must share an image size"
        return Cameras(torch.cat([c.c2w for c in cameras]), torch.cat([c.fovy_deg for c in cameras]),
                       cameras[0].height, cameras[0].width, cameras[0].pixel_shift)

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def position(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    @property
    def spherical(self) -> torch.Tensor:
        """(B, 3): elevation°, azimuth°, distance of each camera."""
        return position_to_spherical(self.position)

    @property
    def distance(self) -> torch.Tensor:
        return self.position.norm(dim=-1)

    @property
    def elevation_deg(self) -> torch.Tensor:
        return self.spherical[:, 0]

    @property
    def azimuth_deg(self) -> torch.Tensor:
        return self.spherical[:, 1]

    @property
    def focal(self) -> torch.Tensor:
        """Focal length in pixels, (B,)."""
        return 0.5 * self.height / torch.tan(torch.deg2rad(self.fovy_deg) / 2)

    def intrinsics(self) -> torch.Tensor:
        """(B, 3, 3) pixel intrinsics in the OpenCV sense (x right, y down), pixel centres at +0.5."""
        K = torch.zeros(len(self), 3, 3, device=self.device)
        K[:, 0, 0] = K[:, 1, 1] = self.focal
        K[:, 0, 2], K[:, 1, 2] = self.width / 2 - self.pixel_shift[0], self.height / 2 - self.pixel_shift[1]
        K[:, 2, 2] = 1.0
        return K

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions, each (B, H, W, 3), in world space."""
        i, j = torch.meshgrid(torch.arange(self.height, device=self.device, dtype=torch.float32),
                              torch.arange(self.width, device=self.device, dtype=torch.float32), indexing="ij")
        f = self.focal.view(-1, 1, 1)
        sx, sy = self.pixel_shift
        dirs = torch.stack([((j + 0.5 + sx - self.width / 2) / f), (-(i + 0.5 + sy - self.height / 2) / f),
                            -torch.ones_like(j).expand_as(f * j)], -1)          # (B, H, W, 3) camera frame
        dirs = F.normalize(torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs), dim=-1)
        origins = self.position.view(-1, 1, 1, 3).expand_as(dirs)
        return origins, dirs


def zero123_pose(target: Cameras, condition: Cameras, stable: bool = False) -> torch.Tensor:
    """Relative pose vector (B, 4) of ``target`` views w.r.t. ``condition`` (1 or B views).
    Stable-Zero123 puts the condition's polar angle in the last slot instead of Δdistance."""
    source = condition.spherical.to(target.device)
    pose = zero123_pose_vectors(target.spherical, source)
    if stable:
        pose[:, 3] = torch.deg2rad(90.0 - source[:, 0]).expand(len(pose))
    return pose


def sample_views(n: int, elevation_range: Sequence[float], azimuth_range: Sequence[float],
                 distance_range: Sequence[float], fovy_range: Sequence[float], height: int, width: int,
                 uniform_sphere_fraction: float = 0.5, generator: Optional[torch.Generator] = None) -> Cameras:
    """Random views: azimuth, distance and fovy uniform; elevation uniform in degrees for a
    fraction of the batch and uniform in area on the sphere for the rest (as threestudio does)."""

    def uniform(lo_hi, size):
        lo, hi = float(lo_hi[0]), float(lo_hi[1])
        return lo + (hi - lo) * torch.rand(size, generator=generator)

    elevation = uniform(elevation_range, n)
    n_sphere = int(round(n * uniform_sphere_fraction))
    if n_sphere:
        # Uniform in area between the two elevations: sin(e) uniform.
        s = uniform([math.sin(math.radians(elevation_range[0])), math.sin(math.radians(elevation_range[1]))], n_sphere)
        elevation[:n_sphere] = torch.rad2deg(torch.asin(s))
    return Cameras.from_spherical(elevation, uniform(azimuth_range, n), uniform(distance_range, n),
                                  uniform(fovy_range, n), height, width)


def orbit_views(n: int, elevation_deg: float, distance: float, fovy_deg: float, height: int, width: int,
                azimuth_start_deg: float = 0.0) -> Cameras:
    """``n`` views evenly spaced in azimuth at one elevation (turntables, evaluation rings)."""
    azimuth = azimuth_start_deg + torch.arange(n, dtype=torch.float32) * 360.0 / n
    return Cameras.from_spherical(elevation_deg, azimuth, distance, fovy_deg, height, width)
