"""Where config files are and how one is read: packaged config names, ``${pkg:...}`` paths, YAML with
one-line errors. It imports no other lift3d config module, so both :mod:`lift3d.config` (which merges
and validates configs) and :mod:`lift3d.recipes` (which picks the recipe a config runs) build on it
without importing each other."""

from __future__ import annotations

import os
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from lift3d.errors import ConfigError
from lift3d.utils.inputs import file_kind

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")       # the packaged configs (repository-root configs/ links here)
_CONFIG_EXTS = (".yaml", ".yml")


def packaged_configs() -> dict[str, str]:
    """Name -> path of every config shipped in ``lift3d/configs/`` (``zero123-sjc-cpu`` -> ``.../zero123-sjc-cpu.yaml``)."""
    if not os.path.isdir(CONFIG_DIR):
        return {}
    return {os.path.splitext(f)[0]: os.path.join(CONFIG_DIR, f)
            for f in sorted(os.listdir(CONFIG_DIR)) if f.endswith(_CONFIG_EXTS)}


def config_summary(path: str) -> str:
    """The first comment line of a config file, without its ``#`` (what ``lift3d configs`` prints)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip().startswith("#"):
                return line.strip().lstrip("#").strip()
    return ""


def _packaged(name: str) -> Optional[str]:
    """The packaged config called ``name`` (``zero123-sjc`` or ``zero123-sjc.yaml``), or None."""
    if os.path.basename(name) != name:     # a name has no directory part
        return None
    return packaged_configs().get(os.path.splitext(name)[0] if name.endswith(_CONFIG_EXTS) else name)


def resolve_config(name_or_path: str) -> str:
    """A config argument -> a file: a path that exists wins, else a packaged config name.

    Raises :class:`ConfigError` (one line, naming the packaged configs) when it is neither.
    """
    name_or_path = str(name_or_path)
    if os.path.isfile(name_or_path):
        return name_or_path
    found = _packaged(name_or_path)
    if found is None and os.path.isfile(os.path.join(CONFIG_DIR, name_or_path)):   # recipes/zero123-mini.yaml
        found = os.path.join(CONFIG_DIR, name_or_path)
    if found is None and os.path.lexists(name_or_path):     # there, but a folder, a FIFO, a link loop, ...
        raise ConfigError(f"config {name_or_path} is {file_kind(name_or_path)}; pass a YAML file or the name of a "
                          "packaged config ('lift3d configs' lists them)")
    if found is None:
        raise ConfigError(f"config '{name_or_path}' not found: no such file and no packaged config of that name "
                          f"(packaged configs: {', '.join(packaged_configs()) or 'none'})")
    return found


def resolve_base(path: str, base: str) -> str:
    """The file that ``extends: base`` in the config ``path`` means: a file next to it, else a packaged config."""
    base_path = os.path.join(os.path.dirname(path), str(base))
    if os.path.isfile(base_path):
        return base_path
    if os.path.lexists(base_path):
        raise ConfigError(f"config {path} extends '{base}', but {base_path} is {file_kind(base_path)}")
    found = _packaged(str(base))
    if found is None:
        raise ConfigError(f"config {path} extends '{base}': no such file next to it and no packaged config "
                          f"of that name (packaged configs: {', '.join(packaged_configs()) or 'none'})")
    return found


def package_file(rel: str) -> str:
    """``${pkg:examples/mushroom_rgba.png}`` in a config: the absolute path of a file shipped in the lift3d package."""
    path = os.path.join(PACKAGE_DIR, *str(rel).split("/"))
    if not os.path.exists(path):
        raise ValueError(f"${{pkg:{rel}}}: no file {rel} in the lift3d package ({PACKAGE_DIR})")
    return path


try:
    OmegaConf.register_resolver("pkg", package_file, replace=True)        # omegaconf >= 2.4
except TypeError:
    OmegaConf.register_new_resolver("pkg", package_file, replace=True)    # omegaconf 2.1 - 2.3


def read_yaml(path: str) -> DictConfig:
    """One config file as written (its ``extends:`` not applied), or a one-line :class:`ConfigError`."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry several lines; say where the problem is
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start is not None and start is not mark:
            what += f" ({context} at line {start.line + 1})"
        raise ConfigError(f"cannot parse config {path}{where}: {what}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a mapping of keys")
    return cfg
