"""Pre-flight memory check: a training step's peak estimated from the config, checked against the
memory this process can still get before anything large is loaded.

A run that would not fit stops with one line naming the setting to lower, not with an allocator
traceback half-way into step 0. The estimate adds up:
- ``model``: the weight files of the guidance model(s) (a ``.ckpt`` is read whole);
- ``render``: activations held for the backward pass by the training renders, per rendered sample
  (measured per geometry, ``BYTES_PER_SAMPLE``); a render above ``system.renderer.train_chunk_samples``
  holds one checkpointed chunk at a time, smaller ones are held whole until backward;
- ``vae``: the VAE encoder (RGB renders, ``encode_chunk`` images at a time) or decoder (a latent field's
  reference view) with gradients, from its block widths (``VAE_BYTES_PER_ELEMENT``, measured);
- ``unet``: the UNet's forward pass (no gradients) on ``unet_chunk`` guidance views at a time, both halves
  of classifier-free guidance, from the latent size and the block widths (``UNET_GIB_PER_VIEW``, measured);
- ``heap``: with ``trainer.mmap_threshold_mib: 0`` on glibc, the freed render and VAE tensors that stay
  resident (lift3d/utils/heap.py), counted as one more render and VAE pass (measured: 1.5-2.0 GiB at
  stable-zero123's 256 px milestone, where those parts are 1.7 GiB);
- ``baseline``: Python, torch and the model libraries;
- ``margin``: 5 % of the rest, for the allocator's slack (the sum alone was up to 0.05 GiB under the
  measured peak of ``zero123-sjc``).
``benchmarks/bench_recipes.py`` prints this estimate next to the measured peaks.
``trainer.memory_check: false`` skips the check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from lift3d.config import TrainerConfig
from lift3d.errors import UserError
from lift3d.utils.heap import fragments_heap

GIB = 2 ** 30
BASELINE_GIB = 0.8
# Bytes held for backward per rendered sample (forward + backward of a 2^21-sample render, CPU, fp32).
BYTES_PER_SAMPLE = {"hashgrid-nerf": 3300, "voxel-rf": 200}
NORMALS_FACTOR = 1.9            # hash grid with normals: 6.0 KB per sample instead of 3.2 KB
MARGIN = 0.05                   # of the other parts together: the allocator's slack
VAE_BYTES_PER_ELEMENT = 32      # ~8 saved fp32 tensors per activation element of each layer
# Peak extra RSS of one guidance view (a conditional + an unconditional latent) through the published
# 859 M UNet at 32x32 latents, CPU fp32, no gradients: 0.37 GiB for 4 views, 1.19 GiB for 12.
UNET_GIB_PER_VIEW = 0.1
UNET_WIDTHS = (320, 640, 1280, 1280)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


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


def _model_config(model_path: str, part: str, default: dict) -> dict:
    path = os.path.join(os.path.expanduser(str(model_path or "")), part, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return default   # a .ckpt or a hub id: Stable Diffusion's, as all published Zero123 models


def _vae_config(model_path: str) -> dict:
    return _model_config(model_path, "vae", {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                                             "sample_size": 256})


def unet_gib(unet: dict, views: int, latent_pixels: int) -> float:
    """Peak activations of a no-gradient UNet pass on ``views`` guidance views (CFG: two latents each)."""
    width = sum(unet.get("block_out_channels", UNET_WIDTHS)) / sum(UNET_WIDTHS)
    return views * UNET_GIB_PER_VIEW * width * latent_pixels / 32 ** 2


def vae_gib(vae: dict, images: int, decoder: bool) -> float:
    """Activations a VAE encoder/decoder holds for backward on ``images`` images at its resolution."""
    size = int(vae.get("sample_size", 256))
    layers = int(vae.get("layers_per_block", 2)) + (1 if decoder else 0)
    elements = sum(c * (size // 2 ** i) ** 2 for i, c in enumerate(vae["block_out_channels"]))
    return images * elements * layers * VAE_BYTES_PER_ELEMENT / GIB


def _nonzero(value) -> bool:
    return any(float(v) != 0 for v in (value if isinstance(value, (list, tuple)) else [value]))


def _prior_config(guidance: dict) -> dict:
    """The prior's keys: a preset's flat block or score-distillation's ``prior``."""
    return guidance.get("prior", guidance) or {}


def _models(guidance: dict) -> tuple[list[str], Optional[str]]:
    from lift3d.priors.zero123 import BUNDLED_MODEL

    prior = _prior_config(guidance)
    paths = [prior.get("pretrained_model_name_or_path") or BUNDLED_MODEL]
    if prior.get("refiner_name_or_path"):
        paths.append(prior["refiner_name_or_path"])
    return paths, prior.get("variant")


def estimate_step_memory(system, data, mmap_threshold_mib: float = TrainerConfig.mmap_threshold_mib) -> Estimate:
    """The peak resident memory of a training step of ``system`` on ``data`` (``trainer.mmap_threshold_mib``)."""
    from lift3d.priors.zero123 import Zero123Prior

    est = Estimate(parts={"baseline": BASELINE_GIB})
    r, g = system.renderer.cfg, system.cfg
    guidance = dict(g.guidance or {}) if g.guidance_type else {}
    paths, vae = [], None
    if g.guidance_type and g.guidance_type != "multiview-oracle":
        paths, variant = _models(guidance)
        est.parts["model"] = sum(weights_gib(p, variant) for p in paths)
        vae = _vae_config(paths[0])
    S, budget = r.num_samples_per_ray, r.train_chunk_samples
    per_sample = BYTES_PER_SAMPLE.get(g.geometry_type, max(BYTES_PER_SAMPLE.values()))
    loss = system.cfg.loss
    normals = _nonzero(loss.lambda_normal_smooth) or _nonzero(loss.lambda_orient)
    factor = 8 if vae is None else 2 ** (len(vae["block_out_channels"]) - 1)
    c = data.cfg
    ref = c.reference_height * c.reference_width // (factor ** 2 if system.latent_field else 1)
    worst, worst_unet = 0.0, 0.0
    unet = _model_config(paths[0], "unet", {}) if vae is not None else None
    unet_chunk = int(_prior_config(guidance).get("unet_chunk", Zero123Prior.Config.unet_chunk))
    for stage in range(len(c.resolution_milestones) + 1):
        data._stage = stage
        h, w = data.guidance_size
        if unet is not None:   # an RGB render is resized to the model's input; a latent field is the latent
            latent = h * w if system.latent_field else (int(vae.get("sample_size", 256)) // factor) ** 2
            views = min(data.batch_size, unet_chunk or data.batch_size)
            worst_unet = max(worst_unet, unet_gib(unet, views, latent))
        renders = [(ref * S, 1.0), (data.batch_size * h * w * S, NORMALS_FACTOR if normals else 1.0)]
        if _nonzero(loss.lambda_near_view):
            renders.append(renders[-1])
        held = sum(n * f for n, f in renders if not budget or n <= budget)
        chunk = max((min(n, budget) * f for n, f in renders if budget and n > budget), default=0)
        worst = max(worst, (held + chunk) * per_sample / GIB)
    data._stage = 0
    est.parts["render"] = worst
    if unet is not None:
        est.parts["unet"] = worst_unet
        est.settings["unet"] = f"system.guidance.unet_chunk (now {unet_chunk})"
    est.settings["render"] = (f"system.renderer.train_chunk_samples (now {budget})" if budget else
                              f"system.renderer.num_samples_per_ray (now {S}) or set train_chunk_samples")
    if vae is not None:
        if system.latent_field:
            est.parts["vae"] = vae_gib(vae, 1, decoder=True) if _nonzero(loss.lambda_rgb) else 0.0
            est.settings["vae"] = f"data.reference_height (now {c.reference_height})"
        else:
            n = min(int(guidance.get("encode_chunk", 1)), max(int(v) for v in _staged_list(c.batch_size)))
            est.parts["vae"] = vae_gib(vae, n, decoder=False)
            est.settings["vae"] = f"system.guidance.encode_chunk (now {guidance.get('encode_chunk', 1)})"
    if fragments_heap(mmap_threshold_mib):
        est.parts["heap"] = est.parts["render"] + est.parts.get("vae", 0.0)
        est.settings["heap"] = (f"trainer.mmap_threshold_mib={TrainerConfig.mmap_threshold_mib:g} "
                                f"(now {mmap_threshold_mib:g})")
    est.parts["margin"] = MARGIN * est.total_gib
    return est


def _staged_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
