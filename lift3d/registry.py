"""A tiny plugin registry: ``@register("kebab-name", "kind")`` on a class, ``find(name, kind)`` to get it back.

Kinds are the plugin slots of a config: a key ``X_type`` names a plugin of kind ``X`` (``data``,
``system``, ``geometry``, ``background``, ``renderer``, ``guidance``, ``prior``, ``method``). Names are
unique within a kind, so a prior and a guidance may share one (``cascade-zero123``).

Plugins register themselves when their module is imported. To keep ``import lift3d`` light, the
built-in plugin modules are listed in :data:`PLUGIN_MODULES` and imported only the first time
:func:`find` is asked for a name it does not know yet. Another package adds plugins by declaring
its modules as entry points in the group ``lift3d.plugins``; they are imported at the same time.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Optional

from lift3d.errors import ConfigError

# Modules whose import registers the built-in plugins. Each must import heavy libraries
# (diffusers, transformers, tinycudann) lazily, inside the plugin's methods.
PLUGIN_MODULES = (
    "lift3d.data.single_image",
    "lift3d.geometry.voxel_rf",
    "lift3d.geometry.hashgrid_nerf",
    "lift3d.geometry.gaussians",
    "lift3d.renderers.volume",
    "lift3d.renderers.gaussian_splatting",
    "lift3d.backgrounds.solid",
    "lift3d.backgrounds.learned",
    "lift3d.priors.zero123",
    "lift3d.priors.cascade_zero123",
    "lift3d.priors.eschernet",
    "lift3d.priors.zero123plus",
    "lift3d.guidance.sds",
    "lift3d.guidance.sjc",
    "lift3d.guidance.vsd",
    "lift3d.guidance.distillation",
    "lift3d.guidance.presets",
    "lift3d.guidance.oracle",
    "lift3d.guidance.multiview",
    "lift3d.systems.image_to_3d",
)
ENTRY_POINT_GROUP = "lift3d.plugins"

_classes: dict[str, dict[str, type]] = {}   # kind -> name -> class
_plugins_loaded = False


def register(name: str, kind: str):
    """Class decorator that makes ``cls`` findable as ``name`` among plugins of ``kind``."""

    def decorator(cls):
        known = _classes.setdefault(kind, {})
        if name in known and known[name] is not cls:
            raise ValueError(f"{kind} plugin name '{name}' is registered twice "
                             f"({known[name].__module__} and {cls.__module__})")
        known[name] = cls
        cls.registered_name = name
        return cls

    return decorator


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    for module in PLUGIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    _plugins_loaded = True


def registered_names(kind: Optional[str] = None) -> list[str]:
    """Sorted plugin names of one kind, or of every kind."""
    _load_plugins()
    if kind is not None:
        return sorted(_classes.get(kind, {}))
    return sorted({name for names in _classes.values() for name in names})


def _lookup(name: str, kind: Optional[str]) -> list[type]:
    if kind is not None:
        return [_classes[kind][name]] if name in _classes.get(kind, {}) else []
    return [names[name] for names in _classes.values() if name in names]


def find(name: str, kind: Optional[str] = None) -> type:
    """The class registered as ``name`` (of ``kind``, when given); fails with the valid names."""
    found = _lookup(str(name), kind)
    if not found:
        _load_plugins()
        found = _lookup(str(name), kind)
    if len(found) == 1:
        return found[0]
    if found:
        kinds = sorted(k for k, names in _classes.items() if name in names)
        raise ConfigError(f"'{name}' names a plugin of several kinds ({', '.join(kinds)}); say which")
    valid = registered_names(kind)
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    what = f"{kind} plugin" if kind else "plugin"
    raise ConfigError(f"unknown {what} '{name}'{hint}; valid: {', '.join(valid)}")
