"""Which recipe a config runs: a ``weights:`` block finds published weights (or falls back to the bundled
mini model's own recipe, saying so in one line) and an ``example:`` block holds a bundled example's data
keys, which a user's own ``image=`` does not inherit. :func:`lift3d.config.load_config` applies both.

This module does not import :mod:`lift3d.config` (which imports it): it finds files through
:mod:`lift3d.config_files`, and ``load_config`` hands :func:`apply_weights` the loader for a fallback recipe."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lift3d.config_files import CONFIG_DIR, config_summary, resolve_config

log = logging.getLogger("lift3d")


def models_dir() -> str:
    """Where published weights are looked for: ``$LIFT3D_MODELS``, else ``$LIFT3D_CACHE_DIR/models``,
    else ``~/.cache/lift3d/models``."""
    if os.environ.get("LIFT3D_MODELS"):
        return os.path.expanduser(os.environ["LIFT3D_MODELS"])
    cache = os.environ.get("LIFT3D_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lift3d")
    return os.path.join(cache, "models")


def find_weights(name: str) -> Optional[str]:
    """``models_dir()/name`` (a model folder) or ``models_dir()/name.ckpt``, if there."""
    folder = os.path.join(models_dir(), name)
    if os.path.isdir(folder):
        return folder
    return folder + ".ckpt" if os.path.isfile(folder + ".ckpt") else None


def _resolved(value: Any) -> Any:
    """A config value with its interpolations (``${pkg:...}``) resolved."""
    return OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=True)["v"]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def apply_weights(cfg: DictConfig, overrides: DictConfig, path: str,
                  load: Callable[[str], DictConfig]) -> tuple[DictConfig, dict]:
    """A config's ``weights:`` block: for each ``system.guidance`` key it names (``key: NAME``), an empty
    value is filled with published weights found as ``models_dir()/NAME``. When none are given or found,
    the config's ``fallback_recipe`` (relative to the config, else packaged) replaces it, keeping its
    ``name``: the bundled model with the recipe it was made for, said in one logged line. ``load`` reads a
    config file with its ``extends:`` (``lift3d.config._load_yaml``).
    Returns the config to use (without ``weights``) and what was applied."""
    weights = cfg.pop("weights", None)
    if not weights:
        return cfg, {}
    weights = dict(weights)
    fallback = weights.pop("fallback_recipe", None)
    merged = OmegaConf.merge(cfg, overrides)
    given = {k: OmegaConf.select(merged, f"system.guidance.{k}", default="") for k in weights}
    if any(given.values()):
        return cfg, {"weights": "given"}
    found = {k: find_weights(str(name)) for k, name in weights.items()}
    if any(found.values()):
        for key, where in found.items():
            if where:
                OmegaConf.update(cfg, f"system.guidance.{key}", where, merge=False)
                log.warning("published weights found: system.guidance.%s=%s", key, where)
        return cfg, {"weights": {k: v for k, v in found.items() if v}}
    if not fallback:
        return cfg, {}
    recipe = os.path.join(os.path.dirname(resolve_config(path)), str(fallback))
    recipe = recipe if os.path.isfile(recipe) else resolve_config(str(fallback))
    name = cfg.get("name")
    cfg = load(recipe)
    cfg.pop("weights", None)
    if name is not None:
        cfg.name = name
    real, pkg = os.path.realpath(recipe), os.path.realpath(CONFIG_DIR)
    rel = os.path.relpath(real, pkg) if real.startswith(pkg + os.sep) else recipe
    places = " and ".join(os.path.join(models_dir(), str(n)) for n in weights.values())
    keys = " ".join(f"system.guidance.{k}=PATH" for k in weights)
    log.warning("no published weights given or found at %s: running %s instead of %s's recipe: %s; for the "
                "published recipe set %s or put the weights there ($LIFT3D_MODELS)", places, rel,
                os.path.splitext(os.path.basename(path))[0], config_summary(recipe).rstrip("."), keys)
    return cfg, {"recipe": rel, "because": f"no published weights given or found at {places}"}


def apply_example(cfg: DictConfig, overrides: DictConfig) -> tuple[DictConfig, dict]:
    """A config's ``example:`` block (``data`` keys of a bundled example: image, ground truth, framing,
    elevation) goes into ``data`` unless the overrides give another image: a user's image gets the
    recipe's settings only. Returns the config (without ``example``) and what was applied."""
    example = cfg.pop("example", None)
    try:
        image = OmegaConf.select(overrides, "data.image_path", default=None)
        photos = OmegaConf.select(overrides, "data.image_paths", default=None)
    except OmegaConfBaseException:    # a bad ${pkg:...}: not the example; load_config reports it
        image, photos = "?", None
    if photos:     # images=[...]: the user's photos, never the example's
        example, image = None, image or str(photos[0])
    if example and (not image or ("image_path" in example and _same_file(str(image), _resolved(example.image_path)))):
        first = example.get("image_path") or (list(example.get("image_paths") or []) or [""])[0]
        return OmegaConf.merge(cfg, {"data": example}), {"example": _resolved(first)}
    applied = {}
    cameras = OmegaConf.select(overrides, "data.reference_cameras", default=None)
    if image and cameras is None and not OmegaConf.select(overrides, "data.default_elevation_deg", default=None):
        elevation = OmegaConf.select(cfg, "data.default_elevation_deg", default=None)
        if elevation is not None:
            log.warning("input view: assuming an elevation of %s degrees (the recipe's data.default_elevation_deg); "
                        "give your image's with data.default_elevation_deg=E", elevation)
            applied["elevation"] = "the recipe's data.default_elevation_deg (not given)"
    return cfg, applied
