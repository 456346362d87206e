"""The data module of an image-to-3D run: the reference view and the cameras of every other view.

Default cameras follow Zero123's ``3drec`` (SJC) set-up: the reference camera sits at distance
2.0 from the origin with a 49.1 degree vertical field of view (the fixed FoV of Zero123's
Objaverse renders), looking at the origin; its elevation should be the elevation the photo was
taken from (``default_elevation_deg``; Zero123 needs it and cannot infer it). Guidance views
are sampled around the object at the same distance and FoV unless ranges are given.

Guidance-view ``height``/``width``/``batch_size`` may be single numbers or lists that change at
``resolution_milestones`` (threestudio style): ``height: [64, 128]`` with
``resolution_milestones: [300]`` renders 64 px views before step 300 and 128 px after.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lift3d.cameras import Cameras, orbit_views, sample_views
from lift3d.data.image import ZERO123_FOREGROUND_RATIO, load_reference_image
from lift3d.data.reference import ReferenceView
from lift3d.errors import UserError
from lift3d.plugin import Plugin
from lift3d.registry import register


@register("single-image", "data")
class SingleImageData(Plugin):
    @dataclass
    class Config:
        image_path: str = ""                       # RGBA PNG (or RGB on a plain background)
        gt_mesh: Optional[str] = None              # ground-truth mesh (file or GSO folder): metrics, oracle
        # The reference view.
        reference_height: int = 256
        reference_width: int = 256
        foreground_ratio: Optional[float] = ZERO123_FOREGROUND_RATIO   # null: keep the image's framing
        default_elevation_deg: float = 0.0
        default_azimuth_deg: float = 0.0
        default_camera_distance: float = 2.0
        default_fovy_deg: float = 49.1
        # Random guidance views. Ranges are [low, high]; null means "the reference's value".
        elevation_range: list = field(default_factory=lambda: [-10.0, 80.0])
        azimuth_range: list = field(default_factory=lambda: [-180.0, 180.0])
        camera_distance_range: Optional[list] = None
        fovy_range: Optional[list] = None
        uniform_sphere_fraction: float = 0.5       # share of each batch with elevation uniform on the sphere
        batch_size: Any = 1                        # int, or a list indexed by resolution_milestones
        height: Any = 64
        width: Any = 64
        resolution_milestones: list = field(default_factory=list)
        # Evaluation orbits (val images during training, test turntable). null: the reference's value.
        n_val_views: int = 4
        n_test_views: int = 40
        eval_height: int = 256
        eval_width: int = 256
        eval_elevation_deg: Optional[float] = None
        eval_camera_distance: Optional[float] = None

    def __init__(self, cfg: Any = None, path: str = "data"):
        super().__init__(cfg, path)
        c = self.cfg
        self.path = path
        n_stages = len(c.resolution_milestones) + 1
        for key in ("batch_size", "height", "width"):
            value = getattr(c, key)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(values) != 1 and len(values) != n_stages:
                raise UserError(f"{path}.{key} has {len(values)} values but resolution_milestones "
                                f"{list(c.resolution_milestones)} define {n_stages} stages")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise UserError(f"{path}.{key} must be a positive integer or a list of them, got {value}")
        for key in ("reference_height", "reference_width", "eval_height", "eval_width", "n_test_views"):
            if getattr(c, key) < 1:
                raise UserError(f"{path}.{key} must be a positive integer, got {getattr(c, key)}")
        if c.n_val_views < 0:
            raise UserError(f"{path}.n_val_views must be 0 or more, got {c.n_val_views}")
        if not c.default_camera_distance > 0 or not 0 < c.default_fovy_deg < 180:
            raise UserError(f"{path}.default_camera_distance must be positive and {path}.default_fovy_deg in (0, 180), "
                            f"got {c.default_camera_distance} and {c.default_fovy_deg}")
        if list(c.resolution_milestones) != sorted(c.resolution_milestones):
            raise UserError(f"{path}.resolution_milestones must increase, got {list(c.resolution_milestones)}")
        for key in ("elevation_range", "azimuth_range", "camera_distance_range", "fovy_range"):
            value = getattr(c, key)
            if value is not None and (len(value) != 2 or float(value[0]) > float(value[1])):
                raise UserError(f"{path}.{key} must be [low, high], got {list(value)}")
        if c.gt_mesh and not os.path.exists(c.gt_mesh):
            raise UserError(f"ground-truth mesh not found: {c.gt_mesh}; fix gt=PATH (or {path}.gt_mesh)")
        self._reference: Optional[ReferenceView] = None
        self._stage = 0

    # ------------------------------------------------------------------ reference view

    @property
    def gt_mesh(self) -> Optional[str]:
        """The ground-truth mesh to score against (and for the oracle guidance), or None."""
        return self.cfg.gt_mesh or None

    def reference_camera(self) -> Cameras:
        c = self.cfg
        return Cameras.from_spherical(c.default_elevation_deg, c.default_azimuth_deg, c.default_camera_distance,
                                      c.default_fovy_deg, c.reference_height, c.reference_width)

    def reference_view(self) -> ReferenceView:
        """The preprocessed image and its camera (loaded once)."""
        if self._reference is None:
            c = self.cfg
            if not c.image_path:
                raise UserError(f"{self.path}.image_path is empty; pass image=PATH (an RGBA PNG of the object)")
            rgba = load_reference_image(c.image_path, (c.reference_height, c.reference_width), c.foreground_ratio)
            self._reference = ReferenceView(rgba, self.reference_camera(), c.image_path)
        return self._reference

    # ------------------------------------------------------------------ guidance views

    def update_step(self, step: int) -> None:
        self._stage = bisect.bisect_right(list(self.cfg.resolution_milestones), step)

    def _staged(self, key: str, stage: Optional[int] = None) -> int:
        value, stage = getattr(self.cfg, key), self._stage if stage is None else stage
        return int(value[min(stage, len(value) - 1)]) if isinstance(value, (list, tuple)) else int(value)

    def stages(self) -> list:
        """(guidance views, height, width) of each resolution stage, first to last."""
        return [(self._staged("batch_size", s), self._staged("height", s), self._staged("width", s))
                for s in range(len(self.cfg.resolution_milestones) + 1)]

    @property
    def batch_size(self) -> int:
        return self._staged("batch_size")

    @property
    def guidance_size(self) -> tuple[int, int]:
        return self._staged("height"), self._staged("width")

    def sample_views(self, generator: Optional[torch.Generator] = None) -> Cameras:
        """A batch of random guidance views at the current stage's size (on the CPU)."""
        c = self.cfg
        height, width = self.guidance_size
        distance = c.camera_distance_range or [c.default_camera_distance] * 2
        fovy = c.fovy_range or [c.default_fovy_deg] * 2
        return sample_views(self.batch_size, c.elevation_range, c.azimuth_range, distance, fovy, height, width,
                            uniform_sphere_fraction=c.uniform_sphere_fraction, generator=generator)

    # ------------------------------------------------------------------ evaluation views

    def _orbit(self, n: int) -> Cameras:
        c = self.cfg
        elevation = c.default_elevation_deg if c.eval_elevation_deg is None else c.eval_elevation_deg
        distance = c.default_camera_distance if c.eval_camera_distance is None else c.eval_camera_distance
        # View 0 looks from the reference azimuth, so the first frame is comparable with the input.
        return orbit_views(n, elevation, distance, c.default_fovy_deg, c.eval_height, c.eval_width,
                           azimuth_start_deg=c.default_azimuth_deg)

    def val_views(self) -> Cameras:
        return self._orbit(self.cfg.n_val_views)

    def test_views(self) -> Cameras:
        return self._orbit(self.cfg.n_test_views)
