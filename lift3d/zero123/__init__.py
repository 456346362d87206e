"""Zero123-family view-conditioned diffusion, in layers (each imports only those above it):

- :mod:`.ldm_to_diffusers`: key maps from original ldm/OpenAI-CLIP state dicts to diffusers names;
- :mod:`.ldm_checkpoint` (original ``.ckpt`` + its ldm YAML) and :mod:`.folder` (diffusers folders):
  a source -> the model's *parts* (configs and state dicts); :mod:`.loading` picks the reader;
- :mod:`.model`: :class:`Zero123Model`, assembled from parts (``from_parts``/``from_pretrained``);
- :mod:`.sampling` (DDIM, relative poses), :mod:`.cascade` (Cascade-Zero123 refiner conditioning),
  :mod:`.random_model` (random weights for tests and benchmarks);
- commands: :mod:`.nvs` (``lift3d nvs``), :mod:`.convert_ckpt` (``lift3d convert-ckpt``).
Heavy libraries (diffusers, transformers) are imported only when a model is built or loaded.
"""

from lift3d.zero123.model import Zero123Condition, Zero123Model

__all__ = ["Zero123Model", "Zero123Condition"]
