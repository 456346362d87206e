"""Pre-flight memory check: a training step's peak estimated from the config, checked against the
memory this process can still get before anything large is loaded.

A run that would not fit stops with one line naming the setting to lower, not with an allocator
traceback half-way into step 0. The estimate adds up what each plugin says it needs for the step (its
``memory_estimate(plan)`` hook, lift3d/plugin.py: ``{part: (GiB, setting to lower)}``; this module knows
no plugin by name), given a :class:`lift3d.plugin.MemoryPlan` of the step's renders at every resolution
stage. The parts today:
- ``render`` (renderer): activations held for the backward pass by the training renders (the volume
  renderer: the geometry's measured ``bytes_per_sample``; the Gaussian rasterizer: pixel-Gaussian pairs);
- ``model``, ``unet``, ``vae`` (a diffusion prior, through its guidance): the weight files (a ``.ckpt`` is
  read whole); the UNet's forward pass (no gradients) on ``unet_chunk`` guidance views, both halves of
  classifier-free guidance, from the latent size and block widths (``UNET_GIB_PER_VIEW``, measured); the
  VAE encoder (RGB renders, ``encode_chunk`` images at a time) or decoder (a latent field's reference view)
  with gradients, from its block widths (``VAE_BYTES_PER_ELEMENT``, measured); ``lora`` (method ``vsd``): the
  UNet's activations held for the LoRA's backward pass (``UNET_GRAD_GIB_PER_VIEW``);
and, from this module:
- ``heap``: with ``trainer.mmap_threshold_mib: 0`` on glibc, the freed render and VAE tensors that stay
  resident (lift3d/utils/heap.py), counted as one more render and VAE pass (measured: 1.5-2.0 GiB at
  stable-zero123's 256 px milestone, where those parts are 1.7 GiB);
- ``reference``: the reference view's pixels (the image, its mask and colour targets, the render's per-pixel
  outputs and the losses on them, with their gradients: ``REFERENCE_BYTES_PER_PIXEL``, measured), which no
  chunking bounds; the setting is ``data.reference_height/width``;
- ``baseline``: Python, torch and the model libraries;
- ``margin``: 5 % of the rest, for the allocator's slack (the sum alone was up to 0.05 GiB under the
  measured peak of ``zero123-sjc``).
The turntable after training (``n_test_views`` views at the eval size, ``TEST_BYTES_PER_PIXEL``) is checked on
its own, naming ``data.eval_height/width`` and ``data.n_test_views``.
``benchmarks/bench_recipes.py`` prints this estimate next to the measured peaks.
``trainer.memory_check: false`` skips the check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from lift3d.config import TrainerConfig
from lift3d.errors import UserError
from lift3d.plugin import MemoryPlan
from lift3d.utils.heap import fragments_heap

GIB = 2 ** 30
# Bytes a training step holds per pixel of the reference view: the image, its targets, the render's per-pixel
# outputs (colour, opacity, depth, their composites), the losses and their gradients. Measured as the peak RSS's
# slope between 1280^2 and 2048^2 references of the tiny RGB run (CPU): 357 with the volume renderer (chunked
# rays), 213 with 200 Gaussians; the largest, so that no renderer is under-counted.
REFERENCE_BYTES_PER_PIXEL = 360
# Bytes the turntable holds per pixel of each test view after training: five RGB float panels (field, mesh
# textured and shaded, normals, opacity), their concatenation, the uint8 frames and the video encoder's copy.
# Measured: the peak RSS's slope between 512^2 and 1024^2 eval views (6 test views, the tiny trial): 433.
TEST_BYTES_PER_PIXEL = 440
BASELINE_GIB = 0.8
MARGIN = 0.05                   # of the other parts together: the allocator's slack
VAE_BYTES_PER_ELEMENT = 32      # ~8 saved fp32 tensors per activation element of each layer
# Peak extra RSS of one guidance view (a conditional + an unconditional latent) through the published
# 859 M UNet at 32x32 latents, CPU fp32, no gradients: 0.37 GiB for 4 views, 1.19 GiB for 12.
UNET_GIB_PER_VIEW = 0.1
# Activations one view's conditional UNet pass holds for a backward pass (VSD's LoRA training): the published
# UNet's widths at 32x32 latents, fp32, with a rank-4 LoRA on every attention projection; the tensors autograd
# saves, summed on the meta device (0.72 GiB; 0.12 at 16x16, 0.026 at 8x8: the linear scaling over-counts those).
UNET_GRAD_GIB_PER_VIEW = 0.75
UNET_WIDTHS = (320, 640, 1280, 1280)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Stable Diffusion's VAE and UNet, which every published Zero123 model uses (for a .ckpt or a hub id).
SD_CONFIGS = {"vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 256},
              "unet": {"block_out_channels": list(UNET_WIDTHS)}}


@dataclass
class Estimate:
    parts: dict = field(default_factory=dict)      # name -> GiB
    settings: dict = field(default_factory=dict)   # name -> "key (now value)" to lower for that part

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values())


def weights_gib(path: str, variant: Optional[str] = None) -> float:
    """Resident size of a model from its weight files (0 for a hub id: unknown before download)."""
    path = os.path.expanduser(str(path or ""))
    if os.path.isfile(path):
        return os.path.getsize(path) / GIB
    if not os.path.isdir(path):
        return 0.0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            stem, ext = os.path.splitext(name)
            has_variant = "." in stem
            if ext in WEIGHT_SUFFIXES and (stem.endswith(f".{variant}") if variant else not has_variant):
                total += os.path.getsize(os.path.join(root, name)) * (2 if variant and "16" in variant else 1)
    return total / GIB


def unet_gib(unet: dict, views: int, latent_pixels: int, grad: bool = False) -> float:
    """Peak activations of a no-gradient UNet pass on ``views`` guidance views (CFG: two latents each); with
    ``grad``, the activations a conditional pass on ``views`` latents holds for backward."""
    width = sum(unet.get("block_out_channels", UNET_WIDTHS)) / sum(UNET_WIDTHS)
    return views * (UNET_GRAD_GIB_PER_VIEW if grad else UNET_GIB_PER_VIEW) * width * latent_pixels / 32 ** 2


def vae_gib(vae: dict, images: int, decoder: bool) -> float:
    """Activations a VAE encoder/decoder holds for backward on ``images`` images at its resolution."""
    size = int(vae.get("sample_size", 256))
    layers = int(vae.get("layers_per_block", 2)) + (1 if decoder else 0)
    elements = sum(c * (size // 2 ** i) ** 2 for i, c in enumerate(vae["block_out_channels"]))
    return images * elements * layers * VAE_BYTES_PER_ELEMENT / GIB


def _nonzero(value) -> bool:
    return any(float(v) != 0 for v in (value if isinstance(value, (list, tuple)) else [value]))


def memory_plan(system, data, guidance=None) -> MemoryPlan:
    """The renders of ``system``'s training step at each of ``data``'s resolution stages."""
    loss = system.loss_weights
    c = data.cfg
    f = guidance.latent_factor if system.latent_field and guidance is not None else 1
    reference = any(_nonzero(loss[k]) for k in ("rgb", "mask", "depth_smooth_ref"))
    stages = []
    for views, h, w in data.stages():
        photos = system.reference_batch(data) if hasattr(system, "reference_batch") else 1   # several: data.image_paths
        renders = [("reference", photos, c.reference_height // f, c.reference_width // f)] if reference else []
        renders.append(("guidance", views, h, w))
        if _nonzero(loss["near_view"]):
            renders.append(("near_view", views, h, w))
        stages.append(renders)
    return MemoryPlan(stages=stages, normals=_nonzero(loss["normal_smooth"]) or _nonzero(loss["orient"]),
                      latent_field=system.latent_field, decode_reference=system.latent_field and _nonzero(loss["rgb"]))


def estimate_step_memory(system, data, mmap_threshold_mib: float = TrainerConfig.mmap_threshold_mib) -> Estimate:
    """The peak resident memory of a training step of ``system`` on ``data`` (``trainer.mmap_threshold_mib``):
    the sum of every plugin's ``memory_estimate``. The guidance is built (cheap: no weights) when the system
    has not loaded it yet."""
    from lift3d.registry import find

    guidance = system.guidance
    if guidance is None and system.cfg.guidance_type:
        guidance = find(system.cfg.guidance_type, "guidance")(system.cfg.guidance, path="system.guidance")
    plan = memory_plan(system, data, guidance)
    est = Estimate(parts={"baseline": BASELINE_GIB})
    size = (data.cfg.reference_height, data.cfg.reference_width)
    if plan.renders("reference"):
        est.parts["reference"] = reference_gib(*size) * plan.renders("reference")[0][0]
        est.settings["reference"] = reference_setting(*size)
    parts = [p for p in system.plugins() if p is not system.guidance] + ([guidance] if guidance is not None else [])
    for part in parts:
        for name, (gib, setting) in part.memory_estimate(plan).items():
            est.parts[name] = est.parts.get(name, 0.0) + gib
            if setting:
                est.settings[name] = setting
    if fragments_heap(mmap_threshold_mib):
        est.parts["heap"] = est.parts.get("render", 0.0) + est.parts.get("vae", 0.0)
        est.settings["heap"] = (f"trainer.mmap_threshold_mib={TrainerConfig.mmap_threshold_mib:g} "
                                f"(now {mmap_threshold_mib:g})")
    est.parts["margin"] = MARGIN * est.total_gib
    return est


def reference_gib(height: int, width: int) -> float:
    """What a training step holds for a reference view of ``height`` x ``width`` pixels."""
    return height * width * REFERENCE_BYTES_PER_PIXEL / GIB


def test_gib(views: int, height: int, width: int) -> float:
    """What the turntable holds after training: ``views`` test views of ``height`` x ``width``."""
    return views * height * width * TEST_BYTES_PER_PIXEL / GIB


def reference_setting(height: int, width: int) -> str:
    return f"data.reference_height/width (now {height}x{width})"


def check_reference_size(height: int, width: int) -> None:
    """Before the reference image is read at ``height`` x ``width``: one line naming data.reference_height/width
    when its pixels alone would not fit in the free memory (an image that size is read, resized and recentred
    in a few float copies, and trained on at that size)."""
    free = available_gib()
    need = reference_gib(height, width)
    if free is not None and need > free:
        raise UserError(f"a {height}x{width} reference view needs about {need:.1f} GiB but only {free:.1f} GiB is "
                        f"free: lower {reference_setting(height, width)}")


def _meminfo_gib(key: str) -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def available_gib() -> Optional[float]:
    """Memory this process can still get: the least of the free system memory, the cgroup's headroom
    and the address-space limit's (``ulimit -v``). None if none can be read."""
    import resource

    limits = []
    free = _meminfo_gib("MemAvailable")
    if free is not None:
        limits.append(free)
    cg_max, cg_cur = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if cg_max is not None and cg_cur is not None:
        limits.append((cg_max - cg_cur) / GIB)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((soft - _vm_bytes("VmSize")) / GIB)
    return min(limits) if limits else None


def _vm_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def check_memory(exp) -> None:
    """Stop before training, in one line, when the estimated step does not fit in the free memory."""
    if not getattr(exp.exp.trainer, "memory_check", True) or exp.device.type != "cpu":
        return   # on CUDA the model and activations live in device memory: benchmarks/gpu_check.py
    est = estimate_step_memory(exp.system, exp.data, exp.exp.trainer.mmap_threshold_mib)
    free = available_gib()
    if free is None:
        return
    message = verdict(est, free, _vm_bytes("VmRSS") / GIB)
    if message:
        raise UserError(message)
    c = exp.data.cfg
    if hasattr(c, "n_test_views"):      # after training: the turntable (the step's memory is freed by then)
        need = test_gib(c.n_test_views, c.eval_height, c.eval_width) + est.parts.get("model", 0.0) + BASELINE_GIB
        if need - _vm_bytes("VmRSS") / GIB > free:
            raise UserError(f"the turntable after training needs about {need:.1f} GiB ({c.n_test_views} views of "
                            f"{c.eval_height}x{c.eval_width}) but only {free:.1f} GiB is free: lower "
                            f"data.eval_height/width or data.n_test_views (trainer.memory_check=false skips this check)")


def verdict(est: Estimate, free_gib: float, resident_gib: float = 0.0) -> Optional[str]:
    """None when ``est`` fits in ``free_gib`` more than the ``resident_gib`` already held; else the one-line
    error naming the setting to lower (that of the largest part that has one)."""
    if est.total_gib - resident_gib <= free_gib:
        return None
    parts = ", ".join(f"{k} {v:.1f}" for k, v in est.parts.items())
    reducible = {k: v for k, v in est.parts.items() if k in est.settings}
    if not reducible or est.parts.get("model", 0) + BASELINE_GIB - resident_gib > free_gib:
        advice = "the model alone does not fit: use a machine with more memory"
    else:
        part = max(reducible, key=reducible.get)
        advice = f"{'set' if part == 'heap' else 'lower'} {est.settings[part]}"
    return (f"this run needs about {est.total_gib:.1f} GiB ({parts}) but only {free_gib:.1f} GiB is free: "
            f"{advice} (trainer.memory_check=false skips this check)")
