"""Typed configs: YAML + command-line dotlist -> validated dataclasses.

Every plugin has a nested ``@dataclass Config``. :func:`parse_config` turns a mapping
into that dataclass and rejects unknown keys (naming close matches) and wrong types.
:func:`validate_tree` walks a whole experiment config before anything is built:
wherever a block has a key ``X_type`` next to a mapping ``X``, the plugin registered
under that name validates ``X``. So ``system.loss.lamda_rgb=1`` fails in a fraction of a
second, not after a model has loaded.

Any field declared with :func:`schedulable` may be a number or a schedule
``[start_step, start_value, end_value, end_step]`` (linear, clamped) or the piecewise form
``[s0, v0, v1, s1, v2, s2, ...]``; :func:`C` evaluates it at a step.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lift3d.errors import ConfigError

log = logging.getLogger("lift3d")

SCHEDULE_HELP = "a number or a schedule [start_step, start_value, end_value, end_step]"


def schedulable(default: Any):
    """A dataclass field that accepts a number or a schedule (see :func:`C`)."""
    return field(default=default, metadata={"schedulable": True})


def _check_schedule(value: Any, path: str) -> None:
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected {SCHEDULE_HELP}, got {value!r}")
    if isinstance(value, (int, float)):
        return
    if isinstance(value, (list, tuple, ListConfig)):
        items = list(value)
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
        if ok and (len(items) == 4 or (len(items) >= 6 and len(items) % 2 == 0)):
            steps = [items[0]] + items[3::2]
            if all(b > a for a, b in zip(steps, steps[1:])):
                return
        raise ConfigError(f"{path}: expected {SCHEDULE_HELP} with increasing steps, got {items}")
    raise ConfigError(f"{path}: expected {SCHEDULE_HELP}, got {value!r}")


def C(value: Any, step: int) -> float:
    """Evaluate a schedulable value at ``step``."""
    if isinstance(value, (int, float)):
        return float(value)
    v = [float(x) for x in value]
    # Knots (step, value): [s0, v0, v1, s1] is one segment; [.., v2, s2, v3, s3] add more.
    knots = [(v[0], v[1]), (v[3], v[2])] + [(v[i + 1], v[i]) for i in range(4, len(v) - 1, 2)]
    if step <= knots[0][0]:
        return knots[0][1]
    for (s0, a), (s1, b) in zip(knots, knots[1:]):
        if step <= s1:
            return a + (b - a) * (step - s0) / (s1 - s0)
    return knots[-1][1]


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    where = f"{path}.{key}" if path else key
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown config key '{where}'{hint} (valid keys under '{path or '<root>'}': {', '.join(valid)})"


def _check_keys(schema: type, cfg: Any, path: str) -> None:
    """Reject keys the dataclass does not declare, recursing into nested dataclass fields."""
    hints = typing.get_type_hints(schema)
    valid = [f.name for f in dataclasses.fields(schema)]
    for key in cfg:
        if key not in valid:
            raise ConfigError(_unknown_key_message(path, str(key), valid))
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(cfg[key], (dict, DictConfig)):
            _check_keys(sub, cfg[key], f"{path}.{key}" if path else str(key))


def _check_finite(value: Any, where: str) -> None:
    """NaN or infinity in a config is a typo or a broken script, never a setting: say so before any work."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value}")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")


def _check_schedules(schema: type, obj: Any, path: str) -> None:
    for f in dataclasses.fields(schema):
        where = f"{path}.{f.name}" if path else f.name
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):
            _check_finite(value, where)
        if f.metadata.get("schedulable"):
            _check_schedule(value, where)
        elif dataclasses.is_dataclass(value):
            _check_schedules(type(value), value, where)


def parse_config(schema: type, cfg: Any = None, path: str = "") -> Any:
    """Build the dataclass ``schema`` from ``cfg`` (dict, DictConfig, dataclass or None).

    Raises :class:`ConfigError` naming the full key for unknown keys and bad values.
    """
    if cfg is None:
        cfg = {}
    if dataclasses.is_dataclass(cfg) and isinstance(cfg, schema):
        return cfg
    if not isinstance(cfg, (dict, DictConfig)):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {cfg!r}")
    _check_keys(schema, cfg, path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        obj = OmegaConf.to_object(merged)
    except ConfigKeyError as e:  # nested structured configs
        raise ConfigError(f"{path}: {e.msg if hasattr(e, 'msg') else e}".split("\n")[0]) from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", "") or ""
        where = f"{path}.{key}" if path and key else (path or key)
        msg = str(e).split("\n")[0]
        raise ConfigError(f"bad value for '{where}': {msg}") from None
    _check_schedules(schema, obj, path)
    return obj


def validate_tree(cfg: Any, schema: Optional[type] = None, path: str = "") -> None:
    """Validate ``cfg`` against ``schema`` and, recursively, every ``X_type``/``X`` plugin pair."""
    from lift3d.registry import find

    if schema is not None:
        # Walk the config with the schema's defaults filled in, so a default `X_type` is checked too.
        cfg = OmegaConf.create(dataclasses.asdict(parse_config(schema, cfg, path)))
    if not isinstance(cfg, (dict, DictConfig)):
        return
    for key in list(cfg.keys()):
        key = str(key)
        if not key.endswith("_type") or cfg[key] is None:
            continue
        sub = key[: -len("_type")]
        plugin = find(str(cfg[key]), kind=sub)
        sub_schema = getattr(plugin, "Config", None)
        sub_cfg = cfg.get(sub, None) or {}
        validate_tree(sub_cfg, sub_schema, f"{path}.{sub}" if path else sub)


# --------------------------------------------------------------------------- experiment


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    val_every: int = 200          # steps between validation images (0: never)
    ckpt_every: int = 200         # steps between checkpoints (0: only at the end)
    log_every: int = 10           # steps between loss-log rows (save/losses.csv) and progress-bar refreshes
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    num_threads: int = 0          # torch CPU threads (0: torch's default)
    memory_check: bool = True     # stop before training when a step will not fit in free memory (lift3d/preflight.py)
    # CPU allocations of this many MiB and more are returned to the system when freed (glibc; 0: its default,
    # which keeps 1-2 GiB of freed tensors resident at the SDS recipes' 256 px milestone). lift3d/utils/heap.py
    mmap_threshold_mib: float = 4.0


@dataclass
class ExperimentConfig:
    name: str = "default"
    tag: str = "run"
    exp_root_dir: str = "outputs"
    use_timestamp: bool = True
    seed: int = 0
    resume: Optional[str] = None
    data_type: str = "single-image"
    data: dict = field(default_factory=dict)
    system_type: str = "image-to-3d"
    system: dict = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval_protocol: str = "surface"   # lift3d eval protocol used for metrics.json when data.gt_mesh is set
    applied: dict = field(default_factory=dict)   # written by load_config: the recipe, weights, example that ran


SHORTHANDS = {"image": "data.image_path", "gt": "data.gt_mesh"}


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
    if found is None:
        raise ConfigError(f"config '{name_or_path}' not found: no such file and no packaged config of that name "
                          f"(packaged configs: {', '.join(packaged_configs()) or 'none'})")
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


def _load_yaml(path: str, seen: tuple = ()) -> DictConfig:
    path = resolve_config(path)
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
    # `extends: other.yaml` merges this file over another one: a file relative to this one, else a packaged config.
    base = cfg.pop("extends", None)
    if base is not None:
        base_path = os.path.join(os.path.dirname(path), str(base))
        if not os.path.isfile(base_path):
            base_path = _packaged(str(base))
            if base_path is None:
                raise ConfigError(f"config {path} extends '{base}': no such file next to it and no packaged config "
                                  f"of that name (packaged configs: {', '.join(packaged_configs()) or 'none'})")
        if os.path.abspath(base_path) in seen or os.path.abspath(base_path) == os.path.abspath(path):
            raise ConfigError(f"config {path} extends itself through {base}")
        cfg = OmegaConf.merge(_load_yaml(base_path, seen + (os.path.abspath(path),)), cfg)
    return cfg


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Turn ``["image=x.png", "system.loss.lambda_rgb=100"]`` into a config, expanding shorthands."""
    expanded = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. system.loss.lambda_rgb=100)")
        key, value = item.split("=", 1)
        expanded.append(f"{SHORTHANDS.get(key, key)}={value}")
    try:
        return OmegaConf.from_dotlist(expanded)
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def load_config(path: str, overrides: list[str] = ()) -> DictConfig:
    """Load YAML (a file, or a packaged config name: see :func:`resolve_config`), apply overrides,
    resolve interpolations (``${pkg:examples/...}``: a file shipped in the package) and validate the whole tree.

    A ``weights:`` block (:func:`apply_weights`) and an ``example:`` block (:func:`apply_example`) are
    applied first; the result records what they did under ``applied``, so ``configs/parsed.yaml`` shows it."""
    from lift3d.recipes import apply_example, apply_weights

    extra = parse_overrides(list(overrides))
    cfg, applied = apply_weights(_load_yaml(path), extra, path)
    cfg, from_example = apply_example(cfg, extra)
    applied.update(from_example)
    cfg = OmegaConf.merge(cfg, extra)
    if applied:
        cfg.applied = OmegaConf.merge(cfg.get("applied") or {}, applied)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {str(e).splitlines()[0]}") from None
    validate_tree(cfg, ExperimentConfig)
    return cfg
