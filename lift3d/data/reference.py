"""The reference view: the user's image, preprocessed, and the camera it was taken from."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lift3d.cameras import Cameras


@dataclass
class ReferenceView:
    rgba: torch.Tensor       # (H, W, 4) in [0, 1], straight (not premultiplied) alpha
    camera: Cameras          # one camera with the image's height and width
    path: str = ""

    @property
    def mask(self) -> torch.Tensor:
        """(H, W, 1) foreground mask in [0, 1] (the alpha channel)."""
        return self.rgba[..., 3:]

    @property
    def rgb(self) -> torch.Tensor:
        """(H, W, 3) colour composited on white, as diffusion models see it."""
        return self.rgba[..., :3] * self.mask + (1 - self.mask)


def reference_list(reference) -> list:
    """The reference views as a list: a run with several photos passes a list of :class:`ReferenceView`
    (the first is the primary one: its camera defines azimuth 0), a single-photo run one view."""
    if isinstance(reference, ReferenceView):
        return [reference]
    views = list(reference)
    if not views or not all(isinstance(v, ReferenceView) for v in views):
        raise TypeError("expected a ReferenceView or a non-empty sequence of them")
    return views


def direction_cosines(cameras: Cameras, references: Cameras) -> torch.Tensor:
    """(B, R): the cosine between the directions from the origin to each of ``cameras`` and to each reference
    camera (on ``cameras``' device)."""
    targets = torch.nn.functional.normalize(cameras.position.float(), dim=-1)
    sources = torch.nn.functional.normalize(references.position.float().to(targets.device), dim=-1)
    return targets @ sources.T


def nearest_reference(cameras: Cameras, references: Cameras) -> torch.Tensor:
    """For each of ``cameras`` the index of the reference camera that looks from the nearest direction (the
    largest cosine between the directions from the origin to the cameras; the first of equals), (B,) long."""
    return direction_cosines(cameras, references).argmax(-1)


# One photo's camera: the keys a mapping may give (``distance`` is camera_distance's other name, as render-gso
# writes it) and the domain of each.
CAMERA_KEYS = ("elevation_deg", "azimuth_deg", "camera_distance", "fovy_deg")
_CAMERA_ALIASES = {"distance": "camera_distance"}


def parse_reference_cameras(spec, paths: list, defaults: dict, where: str) -> list:
    """Each photo's camera as a dict of :data:`CAMERA_KEYS` from ``spec``: a list (in the photos' order) whose
    entries are mappings (``{elevation_deg: 30, azimuth_deg: 90}``, missing keys from ``defaults``) or lists
    ``[elevation, azimuth[, distance[, fovy]]]``; or the path of a JSON file holding such a list, or a mapping
    with ``views`` (render-gso's cameras.json) whose entries name their ``image``: a photo takes the view of its
    file name, or with no names the views in order. ``None``: one photo at ``defaults``. Bad input raises
    :class:`lift3d.errors.UserError` in one line naming ``where``."""
    from lift3d.errors import UserError

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, (list, tuple)):
        spec = [OmegaConf.to_container(e, resolve=True) if isinstance(e, (DictConfig, ListConfig)) else e for e in spec]
    n = len(paths)
    if spec is None or spec == "" or spec == []:
        if n > 1:
            raise UserError(f"{n} photos but no {where}: give each photo's camera, e.g. {where}="
                            "[[30,0],[30,90]] (elevation, azimuth in degrees) or a JSON file (render-gso's cameras.json)")
        return [dict(defaults)]
    if not any(paths):
        raise UserError(f"{where} is given but no photo: pass image=PATH or images=[A,B,...] with it")
    source = where
    from_file = isinstance(spec, str)
    if from_file:
        from lift3d.utils.inputs import read_json

        source = f"{where} file {spec}"
        spec = read_json(spec, "reference cameras", f"fix {where}: a JSON list of cameras or render-gso's cameras.json")
        if isinstance(spec, dict):
            views = spec.get("views", spec.get("cameras"))
            if not isinstance(views, list):
                raise UserError(f"{source} has no 'views' list (a list of cameras, or render-gso's cameras.json)")
            named = {os.path.basename(str(v["image"])): v for v in views if isinstance(v, dict) and "image" in v}
            if named:
                missing = [p for p in paths if os.path.basename(p) not in named]
                if missing:
                    raise UserError(f"{source} has no view for {', '.join(os.path.basename(p) for p in missing)} "
                                    f"(its views name {', '.join(sorted(named)[:8])}{', ...' if len(named) > 8 else ''})")
                views = [named[os.path.basename(p)] for p in paths]
            spec = views
    if not isinstance(spec, (list, tuple)):
        raise UserError(f"{source} must be a list of cameras ({{elevation_deg: E, azimuth_deg: A}} or [E, A]) or the "
                        f"path of a JSON file, got {spec!r}")
    if len(spec) != n:
        raise UserError(f"{source} gives {len(spec)} camera{'s' if len(spec) != 1 else ''} for {n} "
                        f"photo{'s' if n != 1 else ''} ({', '.join(paths)}): give one camera per photo, in order")
    return [_camera_entry(entry, defaults, f"{source}[{i}]", lenient=from_file) for i, entry in enumerate(spec)]


def _camera_entry(entry, defaults: dict, where: str, lenient: bool) -> dict:
    import math

    from lift3d.errors import UserError

    if isinstance(entry, (list, tuple)):
        if not 2 <= len(entry) <= 4:
            raise UserError(f"{where} must be [elevation, azimuth[, distance[, fovy]]], got {list(entry)}")
        given = dict(zip(CAMERA_KEYS, entry))
    elif isinstance(entry, dict):
        given = {}
        for key, value in entry.items():
            key = str(key)
            if value is None and ":" in key:    # {elevation_deg:30} on a command line: YAML reads one key 'elevation_deg:30'
                key, _, value = key.partition(":")
            key = _CAMERA_ALIASES.get(key.strip(), key.strip())
            if key in CAMERA_KEYS:
                given[key] = value
            elif not lenient:                   # a JSON file's views hold more (image, c2w, K, ...)
                raise UserError(f"{where} has an unknown key '{key}'; a camera takes {', '.join(CAMERA_KEYS)}")
    else:
        raise UserError(f"{where} must be a mapping {{elevation_deg: E, azimuth_deg: A}} or a list [E, A], got {entry!r}")
    camera = dict(defaults)
    for key, value in given.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UserError(f"{where}.{key} must be a number, got {value!r}")
        camera[key] = number
    problems = {"elevation_deg": not -90 <= camera["elevation_deg"] <= 90, "camera_distance": not camera["camera_distance"] > 0,
                "fovy_deg": not 0 < camera["fovy_deg"] < 180}
    for key, bad in problems.items():
        if bad:
            raise UserError(f"{where}.{key} is {camera[key]:g}, out of its range (elevation -90..90, distance > 0, "
                            "fovy 0..180 degrees)")
    return camera
