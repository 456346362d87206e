"""``zero123plus``: Zero123++ (v1.1, v1.2) as a view-conditioned prior over its six fixed views.

The model (``pretrained_model_name_or_path``: a download of ``sudo-ai/zero123plus-v1.1`` / ``-v1.2``, or the
hub id; the weights are CC-BY-NC 4.0) is loaded in ``prepare`` (:mod:`lift3d.zero123plus.model` says what it
computes, as the reference pipeline). The primary photo, composited on gray, is its condition.

- ``views()``: the six cameras it was trained on, whatever the data module drew: azimuths 30, 90, ..., 330°
  from the photo's, elevations 30/−20° alternating (v1.1) or 20/−10° (v1.2), absolute; v1.1 keeps the
  photo's field of view and distance, v1.2's field of view is 30° and the distance keeps the object's
  apparent size (``distance``: a fixed one).
- SDS (``guidance_type: score-distillation``, ``prior_type: zero123plus``): the six renders are one 3x2 tile
  (``tile``), scored at once: one noise level per tile. ``encode: views`` (the default) encodes the renders
  one at a time and tiles their latents, which keeps a published-size step within model + 3 GB on a CPU in
  float32; ``encode: tile`` encodes the tile as one image (benchmarks/zero123plus_encoder.py: memory of
  both, and how far their latents differ with a trained VAE).
- generate-then-reconstruct (``guidance_type: multiview``): the six views sampled once (Euler ancestral,
  trailing timesteps, the reference's draws from the first view's seed: the same tile as the reference
  pipeline under ``torch.manual_seed(seed)``).
Its images have a gray background (0.5): a config sets ``system.background.color`` to match.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lift3d.cameras import Cameras
from lift3d.config import domain
from lift3d.errors import UserError
from lift3d.priors.latent import DTYPES, LatentDiffusionPrior, check_choice
from lift3d.registry import register
from lift3d.utils.images import resize

# SD's VAE encoder with gradients in float32, its layers recomputed in backward, measured on a CPU above the loaded
# model (benchmarks/zero123plus_encoder.py): the 960x640 tile as one image (encode: tile; 7.3 GiB without the
# recomputation), or its six 320-px views one at a time (encode: views: the encode phase's 0.96 and a margin, so
# that the step's estimate, the sum of its parts, covers the step's measured peak).
TILE_ENCODER_GIB = 3.4
VIEW_ENCODER_GIB = 1.1
# Published sizes, for the memory estimate before any download (SD-2 UNet and VAE, 320-px views).
PUBLISHED = {"unet": {"block_out_channels": [320, 640, 1280, 1280], "sample_size": 96},
             "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}}


@register("zero123plus", "prior")
class Zero123PlusPrior(LatentDiffusionPrior):
    @dataclass
    class Config:
        pretrained_model_name_or_path: str = ""  # a Zero123++ diffusers folder or hub id (sudo-ai/zero123plus-v1.2)
        version: str = "auto"                  # auto (from the folder's name) | v1.1 | v1.2: the six cameras
        variant: Optional[str] = None          # weight-file variant of the folder, e.g. "fp16"
        dtype: str = "float32"                 # float32 | float16 (float16 only on CUDA)
        distance: float = domain(0.0, ge=0)    # the six views' camera distance; 0: from the photo's (see above)
        seed: int = domain(0, ge=0, lt=2 ** 32)  # the condition latent's posterior sample (SDS)
        encode: str = "views"                  # views | tile: SDS encodes its renders view by view (a sixth of the
                                               # encoder's memory) or as the one 960x640 tile

    background = 0.5          # "gray, the zero of the Stable Diffusion VAE" (Zero123++'s README)

    def __init__(self, cfg: Any = None, path: str = "system.guidance.prior"):
        super().__init__(cfg, path)
        check_choice(path, "version", self.cfg.version, ("auto", "v1.1", "v1.2"))
        check_choice(path, "dtype", self.cfg.dtype, tuple(DTYPES))
        check_choice(path, "encode", self.cfg.encode, ("views", "tile"))
        self.path = path
        self.model = None

    # ------------------------------------------------------------------ set-up

    def model_path(self) -> str:
        if not self.cfg.pretrained_model_name_or_path:
            raise UserError(f"no Zero123++ model given: set {self.path}.pretrained_model_name_or_path=PATH (a download "
                            "of sudo-ai/zero123plus-v1.2 or -v1.1; the weights are CC-BY-NC 4.0)")
        return os.path.expanduser(self.cfg.pretrained_model_name_or_path)

    @property
    def version(self) -> str:
        from lift3d.zero123plus.model import detect_version

        return detect_version(self.cfg.pretrained_model_name_or_path, self.cfg.version)

    def prepare(self, reference, context) -> None:
        from lift3d.data.reference import reference_list
        from lift3d.zero123plus.model import Zero123PlusModel

        self.context = context
        device = torch.device(context.device)
        self.model = Zero123PlusModel.from_pretrained(self.model_path(), self.load_dtype(device),
                                                      self.cfg.variant).to(device)
        self._version = self.version
        primary = reference_list(reference)[0]   # Zero123++ sees one photo: the primary one
        self.reference_rgb = self.condition_image(primary)
        self.reference_camera = primary.camera.to("cpu")
        self.condition = self.model.encode_condition(self.reference_rgb,
                                                     generator=torch.Generator().manual_seed(self.cfg.seed))
        self.model.release_vision_encoder()   # the photo's embeddings are kept in the condition

    def condition_image(self, reference) -> torch.Tensor:
        """The photo (1, 3, H, W) on gray, as the reference pipeline composites it."""
        rgba = reference.rgba.permute(2, 0, 1)[None].float().contiguous()
        return self.model.on_gray(rgba).to(self.model.device)

    # ------------------------------------------------------------------ the views

    def fixed_views(self, reference_camera: Cameras) -> Cameras:
        """The six views (elevation absolute, azimuth relative to the photo's), at the photo's image size."""
        from lift3d.zero123plus.model import AZIMUTHS, VERSIONS

        spec = VERSIONS[getattr(self, "_version", None) or self.version]
        _, azimuth, distance = (float(v) for v in reference_camera.spherical[0])
        fovy = float(reference_camera.fovy_deg[0])
        out_fovy = spec["fovy"] or fovy
        if self.cfg.distance > 0:
            distance = self.cfg.distance
        elif spec["fovy"]:   # the same apparent size as in the photo at the new field of view
            distance *= math.tan(math.radians(fovy) / 2) / math.tan(math.radians(out_fovy) / 2)
        elevations = [spec["elevations"][k % 2] for k in range(len(AZIMUTHS))]
        return Cameras.from_spherical(elevations, [azimuth + a for a in AZIMUTHS], distance, out_fovy,
                                      reference_camera.height, reference_camera.width)

    def views(self, cameras: Cameras) -> Cameras:
        return self.fixed_views(self.reference_camera).with_size(cameras.height, cameras.width).to(cameras.device)

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        from lift3d.zero123plus.model import tile

        return tile(images)

    def untile(self, images: torch.Tensor) -> torch.Tensor:
        from lift3d.zero123plus.model import untile

        return untile(images)

    # ------------------------------------------------------------------ the model

    @property
    def image_size(self) -> int:
        """One view's side (320 for the published models); a tile is 3 x 2 of them."""
        if self.model is not None:
            return self.model.image_size
        from lift3d.zero123plus.model import processor_size

        proc = self.folder_config("feature_extractor_vae")
        return processor_size(proc) if proc else 320

    def vae_config(self) -> dict:
        return self.folder_config("vae")

    def encode(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Its own latents (shifted and gained after the VAE's scaling): the model draws the posterior sample.
        return self.model.encode(images, noise, per_view=self.cfg.encode == "views").contiguous()

    def predict_noise(self, noisy, t, cameras, guidance_scale, render=None) -> torch.Tensor:
        """CFG ε̂ of tiles (N, 4, 3h, 2w) at timesteps ``t``: the six views of each tile at once."""
        return self.model.predict_noise(noisy, t, self.condition, guidance_scale)

    @torch.no_grad()
    def generate(self, cameras: Cameras, seeds, steps: int = 28, guidance_scale: float = 4.0, eta: float = 1.0,
                 init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
        """The six views (6N, 3, S, S) in [0, 1], a tile per six ``cameras`` (its own fixed views: the cameras
        only say how many), drawn from the seed of its first view. Euler ancestral sampling has no η. With
        ``init`` (6N, 3, S', S') images, SDEdit from them at ``strength``."""
        from lift3d.zero123plus.model import VIEWS, tile, untile

        if len(cameras) % VIEWS:
            raise UserError(f"Zero123++ generates its 6 views at once; asked for {len(cameras)} views")
        out = []
        for i in range(0, len(cameras), VIEWS):
            g = torch.Generator().manual_seed(int(seeds[i]))
            condition = self.model.encode_condition(self.reference_rgb, generator=g,
                                                    embeddings=self.condition.embeddings)
            start = None
            if init is not None:
                start = tile(resize(init[i:i + VIEWS].float(), self.image_size, mode="bicubic", antialias=True)
                             .clamp(0, 1))
            out.append(self.model.sample(condition, steps, guidance_scale, g, init=start, strength=strength).cpu())
        return untile(torch.cat(out))

    # ------------------------------------------------------------------ memory, before loading

    def folder_config(self, part: str) -> dict:
        """A part's config.json in the folder, without loading it; the published sizes for a hub id."""
        from lift3d.utils.inputs import read_json_object

        name = "preprocessor_config.json" if part.startswith("feature_extractor") else "config.json"
        folder = os.path.expanduser(self.cfg.pretrained_model_name_or_path or "")
        path = os.path.join(folder, part, name)
        if folder and os.path.isdir(folder) and os.path.isfile(path):
            cfg = read_json_object(path, f"{part} config", f"the model folder {folder} is damaged: re-download it")
        else:
            cfg = dict(PUBLISHED.get(part, {}))
        return cfg

    def memory_estimate(self, plan) -> dict:
        """The UNet's and VAE's weights, a UNet pass on one tile (both CFG halves) and the reference pass on the
        condition latent (lift3d/preflight.py's measured rates); for RGB renders the VAE encoder with
        gradients, layer by layer recomputed (:func:`lift3d.zero123plus.model.checkpoint_encoder`), one view at a
        time (VIEW_ENCODER_GIB for a 320-px view) or the whole tile (TILE_ENCODER_GIB for 960x640); for a latent
        field the decoder when the reference render is decoded. Measured at the published size in float32 on a
        CPU (benchmarks/zero123plus_encoder.py memory): a prior step peaks 2.11 GiB above the model's 3.54 with
        ``encode: views`` (estimate 2.2), 3.90 with ``encode: tile`` (estimate 4.5)."""
        from lift3d.preflight import unet_gib, vae_gib, weights_gib

        unet = self.folder_config("unet")
        f, s = self.latent_factor, self.image_size
        view = (s // f) ** 2
        tiles = max((-(-views // 6) for views, _, _ in plan.renders("guidance")), default=1)
        activations = unet_gib(unet, tiles, 6 * view) + unet_gib(unet, tiles, view)
        # Resident while training: the UNet and the VAE (the text and vision encoders are freed after
        # ``prepare``, before any step: their 3.6 GiB at the published size are less than a step's activations).
        folder = os.path.expanduser(self.cfg.pretrained_model_name_or_path or "")
        weights = sum(weights_gib(os.path.join(folder, part), self.cfg.variant) for part in ("unet", "vae")) \
            if folder else 0.0
        parts = {"model": (weights, None), "unet": (activations, None)}
        vae = self.folder_config("vae")
        width = sum(vae.get("block_out_channels", PUBLISHED["vae"]["block_out_channels"])) / 1408
        if plan.latent_field:
            parts["vae"] = (vae_gib({**vae, "sample_size": s}, 1, decoder=True) if plan.decode_reference else 0.0,
                            None)
        else:
            half = self.cfg.dtype == "float16" and torch.cuda.is_available()
            encoder = VIEW_ENCODER_GIB * s * s / (320 * 320) if self.cfg.encode == "views" else \
                TILE_ENCODER_GIB * 6 * s * s / (960 * 640)
            parts["vae"] = (encoder * width * (0.5 if half else 1.0), None)
        return parts
