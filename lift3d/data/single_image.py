"""The data module of an image-to-3D run: the reference view and the cameras of every other view.

Default cameras follow Zero123's ``3drec`` (SJC) set-up: the reference camera sits at distance
2.0 from the origin with a 49.1 degree vertical field of view (the fixed FoV of Zero123's
Objaverse renders), looking at the origin; its elevation should be the elevation the photo was
taken from (``default_elevation_deg``; Zero123 needs it and cannot infer it). Guidance views
are sampled around the object at the same distance and FoV unless ranges are given.

Guidance-view ``height``/``width``/``batch_size`` may be single numbers or lists that change at
``resolution_milestones`` (threestudio style): ``height: [64, 128]`` with
``resolution_milestones: [300]`` renders 64 px views before step 300 and 128 px after.

Several photos of one object (``images=[a.png,b.png]``, i.e. ``image_paths``) come with their cameras
(``reference_cameras``: a list of ``{elevation_deg, azimuth_deg[, camera_distance, fovy_deg]}`` or
``[elevation, azimuth]``, or a JSON file such as render-gso's ``cameras.json``; missing keys take the
``default_*`` values). The first photo is the primary one: its camera is the run's reference camera, at
``default_azimuth_deg``; the others' azimuths are taken relative to it (so ``[[30, 0], [30, 90]]`` and
``[[30, 40], [30, 130]]`` are the same run). With a ``foreground_ratio`` every photo is centred on its object
and all are zoomed by one factor (:func:`lift3d.data.image.load_reference_images`): cameras at one distance
see the object at one scale, so zooming each photo on its own would contradict them.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lift3d.cameras import Cameras, orbit_views, sample_views
from lift3d.config import domain
from lift3d.data.image import ZERO123_FOREGROUND_RATIO, load_reference_images
from lift3d.data.reference import ReferenceView, parse_reference_cameras
from lift3d.errors import UserError
from lift3d.plugin import Plugin
from lift3d.registry import register
from lift3d.utils.inputs import require_file


@register("single-image", "data")
class SingleImageData(Plugin):
    @dataclass
    class Config:
        image_path: str = ""                       # RGBA PNG (or RGB on a plain background)
        # Several photos of the object (images=[a.png,b.png]), the first the primary one, and their cameras: a list
        # of {elevation_deg, azimuth_deg[, camera_distance, fovy_deg]} or [elev, azim], or a JSON file (module doc).
        image_paths: list = field(default_factory=list)
        reference_cameras: Any = None
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
        self._references: Optional[list] = None
        self._stage = 0
        self.cameras = parse_reference_cameras(c.reference_cameras, self.image_paths() or [c.image_path],
                                               self._default_camera(), f"{path}.reference_cameras")
        # The run's frame: the first photo's camera at default_azimuth_deg, the others' azimuths relative to it.
        first = self.cameras[0]["azimuth_deg"]
        for camera in self.cameras:
            camera["azimuth_deg"] = c.default_azimuth_deg + (camera["azimuth_deg"] - first)

    # ------------------------------------------------------------------ reference view

    @property
    def gt_mesh(self) -> Optional[str]:
        """The ground-truth mesh to score against (and for the oracle guidance), or None."""
        return self.cfg.gt_mesh or None

    def _default_camera(self) -> dict:
        c = self.cfg
        return {"elevation_deg": c.default_elevation_deg, "azimuth_deg": c.default_azimuth_deg,
                "camera_distance": c.default_camera_distance, "fovy_deg": c.default_fovy_deg}

    @property
    def primary(self) -> dict:
        """The primary (first) photo's camera in the run's frame: elevation_deg, azimuth_deg, camera_distance,
        fovy_deg (the ``default_*`` values for a single photo without ``reference_cameras``)."""
        return self.cameras[0]

    def image_paths(self) -> list:
        """The photos, the primary first ([] when none is given)."""
        c = self.cfg
        paths = [str(p) for p in c.image_paths]
        if paths and c.image_path and c.image_path != paths[0]:
            raise UserError(f"both {self.path}.image_path ({c.image_path}) and {self.path}.image_paths ({', '.join(paths)}) "
                            "are given: pass image=PATH for one photo or images=[A,B,...] for several")
        return paths or ([c.image_path] if c.image_path else [])

    def reference_camera(self, index: int = 0) -> Cameras:
        """The camera of photo ``index`` (0: the primary one) at the reference size."""
        c, cam = self.cfg, self.cameras[index]
        return Cameras.from_spherical(cam["elevation_deg"], cam["azimuth_deg"], cam["camera_distance"],
                                      cam["fovy_deg"], c.reference_height, c.reference_width)

    def reference_view(self) -> ReferenceView:
        """The primary photo, preprocessed, and its camera (loaded once, with the others)."""
        return self.reference_views()[0]

    def reference_views(self) -> list:
        """Every photo preprocessed, with its camera, the primary first (loaded once): a list of ReferenceView."""
        if self._references is None:
            c = self.cfg
            paths = self.image_paths()
            if not paths:
                raise UserError(f"{self.path}.image_path is empty; pass image=PATH (an RGBA PNG of the object)")
            from lift3d.preflight import check_reference_size

            check_reference_size(c.reference_height, c.reference_width)    # a memory bomb stops here, named
            images = load_reference_images(paths, (c.reference_height, c.reference_width), c.foreground_ratio)
            self._references = [ReferenceView(rgba, self.reference_camera(i), path)
                                for i, (rgba, path) in enumerate(zip(images, paths))]
        return self._references

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
        distance = c.camera_distance_range or [self.primary["camera_distance"]] * 2
        fovy = c.fovy_range or [self.primary["fovy_deg"]] * 2
        return sample_views(self.batch_size, c.elevation_range, c.azimuth_range, distance, fovy, height, width,
                            uniform_sphere_fraction=c.uniform_sphere_fraction, generator=generator)

    # ------------------------------------------------------------------ evaluation views

    def _orbit(self, n: int) -> Cameras:
        c = self.cfg
        p = self.primary
        elevation = p["elevation_deg"] if c.eval_elevation_deg is None else c.eval_elevation_deg
        distance = p["camera_distance"] if c.eval_camera_distance is None else c.eval_camera_distance
        # View 0 looks from the reference azimuth, so the first frame is comparable with the input.
        return orbit_views(n, elevation, distance, p["fovy_deg"], c.eval_height, c.eval_width,
                           azimuth_start_deg=p["azimuth_deg"])

    def val_views(self) -> Cameras:
        return self._orbit(self.cfg.n_val_views)

    def test_views(self) -> Cameras:
        return self._orbit(self.cfg.n_test_views)
