"""A tiny plugin registry: ``@register("kebab-name")`` on a class, ``find(name)`` to get it back.

Plugins register themselves when their module is imported. To keep ``import lift3d``
light, the plugin modules are listed in :data:`PLUGIN_MODULES` and imported only the
first time :func:`find` is asked for a name it does not know yet.
"""

from __future__ import annotations

import difflib
import importlib

from lift3d.errors import ConfigError

# Modules whose import registers plugins. Each must itself import heavy libraries
# (diffusers, transformers, tinycudann, nerfacc) lazily, inside the plugin's build.
PLUGIN_MODULES = (
    "lift3d.data.single_image",
    "lift3d.geometry.voxel_rf",
    "lift3d.geometry.hashgrid_nerf",
    "lift3d.renderers.volume",
    "lift3d.backgrounds.solid",
    "lift3d.backgrounds.learned",
    "lift3d.guidance.oracle",
    "lift3d.guidance.zero123_sds",
    "lift3d.guidance.zero123_sjc",
    "lift3d.guidance.cascade",
    "lift3d.systems.image_to_3d",
)

_classes: dict[str, type] = {}
_plugins_loaded = False


def register(name: str):
    """Class decorator that makes ``cls`` findable as ``name``."""

    def decorator(cls):
        if name in _classes and _classes[name] is not cls:
            raise ValueError(f"plugin name '{name}' is registered twice "
                             f"({_classes[name].__module__} and {cls.__module__})")
        _classes[name] = cls
        cls.registered_name = name
        return cls

    return decorator


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # A plugin module that is not written yet is not an error; a missing
            # dependency *inside* an existing module is.
            if e.name != module:
                raise
    _plugins_loaded = True


def registered_names() -> list[str]:
    _load_plugins()
    return sorted(_classes)


def find(name: str, kind: str = "plugin") -> type:
    """Return the class registered as ``name``; fail with the list of known names."""
    if name not in _classes:
        _load_plugins()
    if name not in _classes:
        close = difflib.get_close_matches(str(name), _classes, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown {kind} '{name}'{hint}; registered: {', '.join(sorted(_classes))}")
    return _classes[name]
