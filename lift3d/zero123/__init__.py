"""Zero123-family view-conditioned diffusion: model wrapper (:mod:`.model`), checkpoint loaders and
conversion (:mod:`.loading`, :mod:`.ldm_checkpoint`, :mod:`.convert`), novel-view sampling
(:mod:`.nvs`, ``lift3d nvs``). Heavy libraries (diffusers, transformers) are imported only when a
model is built or loaded.
"""

from lift3d.zero123.loading import convert_ckpt
from lift3d.zero123.model import Zero123Condition, Zero123Model

__all__ = ["Zero123Model", "Zero123Condition", "convert_ckpt"]
