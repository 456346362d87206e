"""Typed configs: YAML + command-line dotlist -> validated dataclasses.

Every plugin has a nested ``@dataclass Config``. :func:`parse_config` turns a mapping
into that dataclass and rejects unknown keys (naming close matches) and wrong types.
:func:`validate_tree` walks a whole experiment config before anything is built:
wherever a block has a key ``X_type`` next to a mapping ``X``, the plugin registered
under that name validates ``X``. So ``system.loss.lamda_rgb=1`` fails in a fraction of a
second, not after a model has loaded. :func:`merge_configs` merges a config into the one it ``extends:``
and the command line into that: where a plugin type ``X_type`` changes, the old plugin's keys leave ``X``
with one log line, rather than failing validation under the new plugin.

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
from typing import Any, Callable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# Finding and reading config files is lift3d.config_files (lift3d.recipes uses it too, and neither imports this
# module); its names are re-exported here, where callers have always found them.
from lift3d.config_files import (CONFIG_DIR, PACKAGE_DIR, config_summary, package_file,  # noqa: F401
                                 packaged_configs, read_yaml, resolve_base, resolve_config)
from lift3d.errors import ConfigError
from lift3d.recipes import apply_example, apply_weights
from lift3d.utils.heap import MAX_THRESHOLD_MIB

log = logging.getLogger("lift3d")

SCHEDULE_HELP = "a number or a schedule [start_step, start_value, end_value, end_step]"


@dataclass(frozen=True)
class Domain:
    """The values a number may take, declared next to it (:func:`domain`, :func:`schedulable`, :func:`number_arg`):
    bounds ``gt``/``ge``/``lt``/``le``, always finite. For a list it holds for every number, with ``length``
    numbers when given and, with ``ordered``, ends in order (``[low, high]``). None passes (an unset option)."""
    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None
    length: Optional[int] = None
    ordered: bool = False
    why: str = ""                       # said after the problem: what the bound protects

    def describe(self) -> str:
        lo = f"{'(' if self.gt is not None else '['}{_num(self.gt if self.gt is not None else self.ge)}"
        hi = f"{_num(self.lt if self.lt is not None else self.le)}{')' if self.lt is not None else ']'}"
        has_lo, has_hi = self.gt is not None or self.ge is not None, self.lt is not None or self.le is not None
        if has_lo and has_hi:
            return f"in {lo}, {hi}"
        if has_lo:
            return f"{'>' if self.gt is not None else '>='} {_num(self.gt if self.gt is not None else self.ge)}"
        if has_hi:
            return f"{'<' if self.lt is not None else '<='} {_num(self.lt if self.lt is not None else self.le)}"
        return "finite"

    def _bad(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return True
        return not (math.isfinite(x) and (self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                    and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))

    def problem(self, value: Any) -> Optional[str]:
        """None when ``value`` is in the domain, else what is wrong ("must be ..., got ...")."""
        if value is None:
            return None
        each = "" if self.describe() == "finite" else f" {self.describe()}"
        if isinstance(value, (list, tuple, ListConfig)):
            items = list(value)
            count = f"{self.length} numbers" if self.length else "numbers"
            wanted = f"a list of {count}{' each' if each else ''}{each}" + (", low to high" if self.ordered else "")
            if ((self.length is not None and len(items) != self.length) or any(self._bad(x) for x in items)
                    or (self.ordered and any(b < a for a, b in zip(items, items[1:])))):
                return f"must be {wanted}, got {items}{self._why()}"
            return None
        if self.length is not None:
            return f"must be a list of {self.length} numbers{each}, got {value!r}{self._why()}"
        if isinstance(value, str):      # a field that also takes a word (density_bias: "blob_magic3d" or a number)
            return None
        if self._bad(value):
            finite = not isinstance(value, float) or math.isfinite(value)
            return f"must be a {'number' if each and finite else 'finite number'}{each}, got {value!r}{self._why()}"
        return None

    def _why(self) -> str:
        return f" ({self.why})" if self.why else ""


def _num(x: Any) -> str:
    return "" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


def _field(default: Any, metadata: dict):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def domain(default: Any, **bounds):
    """A dataclass field whose value :func:`parse_config` checks against ``Domain(**bounds)`` before any work:
    ``lr: float = domain(0.01, gt=0)``, ``betas: list = domain([0.9, 0.99], ge=0, lt=1, length=2)``."""
    return _field(default, {"domain": Domain(**bounds)})


def schedulable(default: Any, **bounds):
    """A dataclass field that accepts a number or a schedule (see :func:`C`); ``bounds`` (:class:`Domain`)
    hold for the number and for each value of a schedule."""
    return _field(default, {"schedulable": True, **({"domain": Domain(**bounds)} if bounds else {})})


LOSS_WEIGHT = Domain(ge=0)      # a loss weight (system.loss.lambda_*, a plugin's loss_defaults): never negative


def schedule_values(value: Any) -> list:
    """The values of a schedule ``[s0, v0, v1, s1, v2, s2, ...]`` (the number itself for a number)."""
    if not isinstance(value, (list, tuple, ListConfig)):
        return [value]
    items = list(value)
    return items[1:3] + items[4::2]


def number_arg(kind: type = float, dom: Optional[Domain] = None, **bounds) -> Callable[[str], Any]:
    """An argparse ``type=`` that reads an ``int`` or ``float`` and checks it against ``dom`` or ``Domain(**bounds)``:
    ``p.add_argument("--steps", type=number_arg(int, ge=1, le=1000))``; argparse then names the flag."""
    import argparse

    dom = dom or Domain(**bounds)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}"
                                             f"{'' if dom.describe() == 'finite' else ' ' + dom.describe()}, "
                                             f"got {text!r}") from None
        problem = dom.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def check_schedule(value: Any, path: str) -> None:
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


def unknown_key_message(path: str, key: str, valid: list[str]) -> str:
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
            raise ConfigError(unknown_key_message(path, str(key), valid))
        sub, where = hints.get(key), f"{path}.{key}" if path else str(key)
        if dataclasses.is_dataclass(sub) and isinstance(cfg[key], (dict, DictConfig)):
            _check_keys(sub, cfg[key], where)
        elif dataclasses.is_dataclass(sub) and cfg[key] is not None:
            first = dataclasses.fields(sub)[0].name
            raise ConfigError(f"{where} is a block of keys, not a value: set {where}.{first}=... (its keys: "
                              f"{', '.join(f.name for f in dataclasses.fields(sub))}), got {where}={cfg[key]!r}")


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


def _check_values(schema: type, obj: Any, path: str) -> None:
    """Every field of ``obj``: finite, a valid schedule where :func:`schedulable`, in its declared :class:`Domain`."""
    for f in dataclasses.fields(schema):
        where = f"{path}.{f.name}" if path else f.name
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):
            _check_finite(value, where)
        dom = f.metadata.get("domain")
        if f.metadata.get("schedulable"):
            check_schedule(value, where)
            for v in schedule_values(value) if dom else ():
                if dom.problem(v):
                    what = "" if isinstance(value, (int, float)) else " (each value of the schedule)"
                    raise ConfigError(f"{where}{what} must be {dom.describe()}, got {value}")
        elif dataclasses.is_dataclass(value):
            _check_values(type(value), value, where)
        elif dom is not None and dom.problem(value):
            raise ConfigError(f"{where} {dom.problem(value)}")


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
        if msg.startswith("Incompatible value 'None'") or "is not Optional" in msg:   # `key=` with nothing after it
            short = [k for k, v in SHORTHANDS.items() if v == where]
            raise ConfigError(f"{where} is empty; give it a value: {short[0] if short else where}=..."
                              + (" (the input image, an RGBA PNG)" if where == SHORTHANDS["image"] else "")) from None
        raise ConfigError(f"bad value for '{where}': {msg}") from None
    _check_values(schema, obj, path)
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
    max_steps: int = domain(1000, ge=1)
    val_every: int = domain(200, ge=0)     # steps between validation images (0: never)
    ckpt_every: int = domain(200, ge=0)    # steps between checkpoints (0: only at the end)
    log_every: int = domain(10, ge=0)      # steps between loss-log rows (save/losses.csv) and progress-bar refreshes
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    num_threads: int = domain(0, ge=0, le=4096)   # torch CPU threads (0: torch's default)
    memory_check: bool = True     # stop before training when a step will not fit in free memory (lift3d/preflight.py)
    # CPU allocations of this many MiB and more are returned to the system when freed (glibc; 0: its default,
    # which keeps 1-2 GiB of freed tensors resident at the SDS recipes' 256 px milestone). lift3d/utils/heap.py
    mmap_threshold_mib: float = domain(4.0, ge=0, le=MAX_THRESHOLD_MIB)


@dataclass
class ExperimentConfig:
    name: str = "default"
    tag: str = "run"
    exp_root_dir: str = "outputs"
    use_timestamp: bool = True
    seed: int = domain(0, ge=0, lt=2 ** 32)       # numpy's seeds are 32-bit
    resume: Optional[str] = None
    data_type: str = "single-image"
    data: dict = field(default_factory=dict)
    system_type: str = "image-to-3d"
    system: dict = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval_protocol: str = "surface"   # lift3d eval protocol used for metrics.json when data.gt_mesh is set
    applied: dict = field(default_factory=dict)   # written by load_config: the recipe, weights, example that ran


SHORTHANDS = {"image": "data.image_path", "images": "data.image_paths", "gt": "data.gt_mesh"}


# --------------------------------------------------------------------------- merging


def _plugin(kind: str, name: Any) -> Optional[type]:
    """The plugin class ``name`` of ``kind``, or None when there is none (validate_tree names the problem)."""
    from lift3d.registry import find

    try:
        return None if name is None else find(str(name), kind=kind)
    except ConfigError:
        return None


def _trim_block(base: dict, over: dict, key: str, old_type: Any, new_type: Any, cleared: bool, path: str) -> None:
    """Trim the plugin block ``base[key]`` to what the new plugin can take, before ``over`` is merged into it:
    keys its Config lacks are dropped (they belong to the old plugin and would fail validation); keys it has
    stay, as a plugin kind's keys of one name mean one thing (``radius``, ``pretrained_model_name_or_path``:
    recipes/cascade-mini.yaml keeps zero123-mini's guidance settings so); ``cleared`` (``X: null``) drops all.
    One log line names what was dropped and was not given again in ``over``."""
    where = f"{path}.{key}" if path else key
    plugin = _plugin(key, new_type)
    valid = {f.name for f in dataclasses.fields(plugin.Config)} if hasattr(plugin, "Config") else set()
    old, given = base[key], over.get(key) or {}
    base[key] = {} if cleared else {k: v for k, v in old.items() if k in valid}
    dropped = [f"{where}.{k}" for k in old if k not in base[key] and k not in given]
    if not dropped or (plugin is None and new_type is not None):     # an unknown type: validate_tree says so
        return
    if new_type != old_type:
        why = f"{where}=null" if cleared else f"not keys of {new_type}"
        log.warning("%s_type: %s -> %s; dropped %s (%s)", where, old_type, new_type, ", ".join(dropped), why)
    else:
        log.warning("%s=null: dropped %s (%s's defaults apply)", where, ", ".join(dropped), new_type)


def _trim_blocks(base: dict, over: dict, schema: Optional[type], path: str, nulled: frozenset) -> None:
    """Prepare ``base`` for merging ``over`` into it (plain containers, changed in place): each plugin block
    ``X`` whose ``X_type`` ``over`` changes, or that ``over`` sets to null, is trimmed (:func:`_trim_block`);
    the blocks both have are handled the same way, level by level. ``schema`` (the dataclass of this level,
    when known) gives the default ``X_type`` where ``base`` names none; ``nulled`` names blocks set to null
    before ``over`` gave them keys (``X=null X.k=v`` on the command line)."""
    is_dc = dataclasses.is_dataclass(schema)
    defaults = {f.name: f.default for f in dataclasses.fields(schema)} if is_dc else {}
    hints = typing.get_type_hints(schema) if is_dc else {}

    def is_plugin_block(key: str) -> bool:
        return any(f"{key}_type" in where for where in (base, over, defaults))

    cleared = {key for key in over if is_plugin_block(key)
               and (over[key] is None or (f"{path}.{key}" if path else key) in nulled)}
    for key in cleared:      # `X: null` means "X from its plugin's defaults" (a None block would not validate)
        over[key] = over[key] or {}
    for key, block in list(base.items()):
        if not isinstance(block, dict):
            continue
        if is_plugin_block(key):
            old_type = base.get(f"{key}_type", defaults.get(f"{key}_type"))
            new_type = over.get(f"{key}_type", old_type)
            if new_type != old_type or key in cleared:
                _trim_block(base, over, key, old_type, new_type, key in cleared, path)
                continue
            schema_of_block = getattr(_plugin(key, new_type), "Config", None)
        else:
            schema_of_block = hints.get(key)
        if isinstance(over.get(key), dict):
            _trim_blocks(block, over[key], schema_of_block, f"{path}.{key}" if path else key, nulled)


def merge_configs(base: DictConfig, over: DictConfig, schema: Optional[type] = None,
                  nulled: Any = ()) -> DictConfig:
    """``over`` merged into ``base`` (an ``extends:``-ing file into its base, command-line overrides into the
    config), except where ``over`` changes a plugin type ``X_type`` at any depth: the old block ``X`` loses the
    keys the new plugin does not have, so ``X`` holds the keys both plugins have, then what ``over`` gives, on
    the new plugin's defaults. ``X: null`` in ``over`` starts ``X`` from the defaults (with ``X_type``: the new
    plugin's defaults only; ``nulled``: the dotted keys of such blocks that ``over`` then gave keys). ``schema``
    is the dataclass of the root (default :class:`ExperimentConfig`)."""
    base_c = OmegaConf.to_container(base, resolve=False)      # interpolations stay as written
    over_c = OmegaConf.to_container(over, resolve=False)
    _trim_blocks(base_c, over_c, schema or ExperimentConfig, "", frozenset(nulled))
    return OmegaConf.merge(OmegaConf.create(base_c), OmegaConf.create(over_c))


def _load_yaml(path: str, seen: tuple = ()) -> DictConfig:
    path = resolve_config(path)
    cfg = read_yaml(path)
    # `extends: other.yaml` merges this file over another one: a file relative to this one, else a packaged config.
    base = cfg.pop("extends", None)
    if base is not None:
        base_path = resolve_base(path, base)
        if os.path.abspath(base_path) in seen or os.path.abspath(base_path) == os.path.abspath(path):
            raise ConfigError(f"config {path} extends itself through {base}")
        cfg = merge_configs(_load_yaml(base_path, seen + (os.path.abspath(path),)), cfg)
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
    extra = parse_overrides(list(overrides))
    # lift3d.recipes does not import this module (no import cycle): it is handed the loader for a fallback recipe.
    cfg, applied = apply_weights(_load_yaml(path), extra, path, load=_load_yaml)
    cfg, from_example = apply_example(cfg, extra)
    applied.update(from_example)
    # An override that changes a plugin type trims its block. `X=null X.k=v` is X from its defaults, then k:
    # the dotlist holds only {k: v} for X, so the nulled keys are passed along.
    nulled = [item.split("=", 1)[0] for item in overrides if item.split("=", 1)[-1].strip() == "null"]
    cfg = merge_configs(cfg, extra, nulled=nulled)
    if applied:
        cfg.applied = OmegaConf.merge(cfg.get("applied") or {}, applied)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {str(e).splitlines()[0]}") from None
    validate_tree(cfg, ExperimentConfig)
    return cfg
