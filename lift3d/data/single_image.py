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
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lift3d.cameras import Cameras, orbit_views, sample_views
from lift3d.config import domain
from lift3d.data.image import ZERO123_FOREGROUND_RATIO, load_reference_image
from lift3d.data.reference import ReferenceView
from lift3d.errors import UserError
from lift3d.plugin import Plugin
from lift3d.registry import register
from lift3d.utils.inputs import require_file


@register("single-image", "data")
class SingleImageData(Plugin):
    @dataclass
    class Config:
        image_path: str = ""                       # RGBA PNG (or RGB on a plain background)
        gt_mesh: Optional[str] = None              # ground-truth mesh (file or GSO folder): metrics, oracle
        # The reference view.
        reference_height: int = domain(256, ge=1)
        reference_width: int = domain(256, ge=1)
        foreground_ratio: Optional[float] = domain(ZERO123_FOREGROUND_RATIO, gt=0, le=1)  # null: keep the framing
        default_elevation_deg: float = domain(0.0, ge=-90, le=90)
        default_azimuth_deg: float = 0.0
        default_camera_distance: float = domain(2.0, gt=0)
        default_fovy_deg: float = domain(49.1, gt=0, lt=180)
        # Random guidance views. Ranges are [low, high]; null means "the reference's value".
        elevation_range: list = domain([-10.0, 80.0], ge=-90, le=90, length=2, ordered=True)
        azimuth_range: list = domain([-180.0, 180.0], length=2, ordered=True)
        camera_distance_range: Optional[list] = domain(None, gt=0, length=2, ordered=True)
        fovy_range: Optional[list] = domain(None, gt=0, lt=180, length=2, ordered=True)
        uniform_sphere_fraction: float = domain(0.5, ge=0, le=1)   # share of a batch uniform on the sphere
        batch_size: Any = domain(1, ge=1)          # int, or a list indexed by resolution_milestones
        height: Any = domain(64, ge=1)
        width: Any = domain(64, ge=1)
        resolution_milestones: list = domain([], ge=1, ordered=True)
        # Evaluation orbits (val images during training, test turntable). null: the reference's value.
        n_val_views: int = domain(4, ge=0)
        n_test_views: int = domain(40, ge=1)
        eval_height: int = domain(256, ge=1)
        eval_width: int = domain(256, ge=1)
        eval_elevation_deg: Optional[float] = domain(None, ge=-90, le=90)
        eval_camera_distance: Optional[float] = domain(None, gt=0)

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
        # The numbers' domains are declared with the fields (lift3d.config.domain) and checked by parse_config.
        if c.gt_mesh and not os.path.isfile(os.path.join(c.gt_mesh, "meshes", "model.obj")):   # else a GSO folder
            require_file(c.gt_mesh, "ground-truth mesh", f"fix gt=PATH (or {path}.gt_mesh): a mesh file or a GSO "
                         "object folder")
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
            from lift3d.preflight import check_reference_size

            check_reference_size(c.reference_height, c.reference_width)    # a memory bomb stops here, named
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
