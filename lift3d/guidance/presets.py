"""The guidance names of threestudio-style configs, each one method over one prior with a flat config:

| ``guidance_type`` | method | prior |
|---|---|---|
| ``zero123-sds`` | ``sds`` | ``zero123`` |
| ``zero123-sjc`` | ``sjc`` | ``zero123`` |
| ``cascade-zero123`` | ``sjc`` or ``sds`` (key ``method``) | ``cascade-zero123`` |

A preset's keys are its prior's and its method's keys side by side (``system.guidance.guidance_scale``,
``system.guidance.pretrained_model_name_or_path``, ...), plus ``render_space``; the preset splits them
and builds a ``score-distillation`` guidance. Nothing else is special about them: a new pair needs no
preset, ``score-distillation`` with ``method_type``/``prior_type`` names it in YAML.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from lift3d.config import parse_config
from lift3d.guidance.distillation import ScoreDistillation
from lift3d.guidance.sds import SDS
from lift3d.guidance.sjc import SJC
from lift3d.priors.cascade_zero123 import CascadeZero123Prior
from lift3d.priors.zero123 import Zero123Prior, check_choice
from lift3d.registry import register


def flat_config(name: str, *schemas: type, extra: tuple = ()) -> type:
    """One dataclass with the fields of ``schemas`` (earlier ones win) and ``extra`` fields
    ``(name, type, default[, metadata])``."""
    fields, seen = [], set()
    for schema in schemas:
        types = typing.get_type_hints(schema)  # real types, not the strings of postponed annotations
        for f in dataclasses.fields(schema):
            if f.name not in seen:
                seen.add(f.name)
                default = {"default": f.default} if f.default is not dataclasses.MISSING else \
                    {"default_factory": f.default_factory}
                fields.append((f.name, types[f.name], dataclasses.field(metadata=f.metadata, **default)))
    fields += [(n, t, dataclasses.field(default=d, metadata=m[0] if m else {})) for n, t, d, *m in extra]
    return dataclasses.make_dataclass(name, fields)


class FlatPreset(ScoreDistillation):
    """A ``score-distillation`` guidance configured by one flat mapping."""
    prior_class: type = Zero123Prior
    method_classes: dict = {}
    default_method: str = ""

    def __init__(self, cfg: Any = None, path: str = "system.guidance"):
        flat = parse_config(type(self).Config, cfg, path)
        self.cfg = flat
        method_type = getattr(flat, "method", self.default_method)
        check_choice(path, "method", method_type, tuple(self.method_classes))
        method_class = self.method_classes[method_type]
        pick = lambda schema: {f.name: getattr(flat, f.name) for f in dataclasses.fields(schema)  # noqa: E731
                               if hasattr(flat, f.name)}
        self.build(method_type, pick(method_class.Config), path, self.prior_class.registered_name,
                   pick(self.prior_class.Config), path, path)


# The guidance's own keys, with ScoreDistillation's types and defaults (one place to change them).
_GUIDANCE_TYPES = typing.get_type_hints(ScoreDistillation.Config)
RENDER_SPACE, ENCODE_CHUNK = ((f.name, _GUIDANCE_TYPES[f.name], f.default, f.metadata)     # with its domain
                              for f in dataclasses.fields(ScoreDistillation.Config)
                              if f.name in ("render_space", "encode_chunk"))


@register("zero123-sds", "guidance")
class Zero123SDS(FlatPreset):
    Config = flat_config("Zero123SDSConfig", SDS.Config, Zero123Prior.Config, extra=(RENDER_SPACE, ENCODE_CHUNK))
    method_classes, default_method = {"sds": SDS}, "sds"


@register("zero123-sjc", "guidance")
class Zero123SJC(FlatPreset):
    Config = flat_config("Zero123SJCConfig", SJC.Config, Zero123Prior.Config, extra=(RENDER_SPACE, ENCODE_CHUNK))
    method_classes, default_method = {"sjc": SJC}, "sjc"


@register("cascade-zero123", "guidance")
class CascadeZero123(FlatPreset):
    # The SJC defaults (3drec's) for both methods; `method: sds` keeps them unless overridden.
    Config = flat_config("CascadeZero123Config", SJC.Config, CascadeZero123Prior.Config,
                         extra=(RENDER_SPACE, ENCODE_CHUNK, ("method", str, "sjc")))
    prior_class = CascadeZero123Prior
    method_classes, default_method = {"sjc": SJC, "sds": SDS}, "sjc"

