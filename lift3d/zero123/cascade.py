"""Cascade-Zero123 (Chen et al., ECCV 2024): a refiner Zero123 that sees several condition images.

A base Zero123 first generates a few *nearby* views of the input (the "self-prompts", by default
azimuth ±45° and elevation +30°). The refiner has the base's architecture; its cross-attention
context is one token per condition image, each ``projection(clip ⊕ pose of the target relative to
that image)``, in this order (as the paper's released training code):

1. the input image, pose input → target;
2. the coarse target: an estimate of the target view itself with a zero pose vector (all four
   entries 0), or a zero embedding when there is none;
3. one token per self-prompt, pose prompt → target.

Only the input image's latent is concatenated into the UNet input, as in Zero123.
Classifier-free guidance follows the paper's dropout: the unconditional half zeroes the CLIP
embeddings of the input and coarse tokens *before* the projection (their poses stay), keeps the
self-prompt tokens, and zeroes the concat latent.

Views are (elevation°, azimuth°, distance) triples; the Zero123 pose of a target w.r.t. a source is
[Δpolar, sin Δazimuth, cos Δazimuth, Δdistance] with polar = 90° − elevation (cameras.zero123_pose).
A refiner folder is a Zero123 folder (kxic layout) plus its ``cascade.json`` (:class:`CascadeLayout`; a
refiner given as a file or a hub id gets the paper's defaults); a folder without one is refused where a
refiner is loaded, as it is most likely a plain Zero123 model.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from lift3d.cameras import zero123_pose_vectors
from lift3d.utils.io import write_json
from lift3d.zero123.sampling import ddim, sample

PAPER_NEARBY = ((0.0, 45.0, 0.0), (0.0, -45.0, 0.0), (30.0, 0.0, 0.0))  # (Δelevation°, Δazimuth°, Δdistance)
LAYOUT_FILE = "cascade.json"


@dataclass
class CascadeLayout:
    """What a refiner was trained with (saved as ``cascade.json`` next to its weights)."""

    nearby: list = field(default_factory=lambda: [list(v) for v in PAPER_NEARBY])
    base_model: str = ""            # the base it was trained from (provenance only)
    coarse_source: str = ""         # what its coarse token was in training: sample | estimate ("": not recorded)

    @classmethod
    def load(cls, folder: str, required: bool = False) -> "CascadeLayout":
        """The layout of the refiner ``folder`` (the paper's for a file or a hub id). With ``required`` a folder
        without ``cascade.json`` is refused: a plain Zero123 folder would run as a refiner, giving meaningless
        views without a word."""
        from lift3d.errors import UserError
        from lift3d.utils.inputs import read_json_object

        path = os.path.join(folder, LAYOUT_FILE) if os.path.isdir(folder) else ""
        if not path or (not os.path.lexists(path) and not required):
            return cls()
        hint = ("a refiner folder holds the cascade.json that lift3d train-cascade writes; for a refiner from "
                'elsewhere write one, e.g. {"nearby": [[0, 45, 0], [0, -45, 0], [30, 0, 0]]}')
        if not os.path.lexists(path):
            raise UserError(f"refiner {folder} has no {LAYOUT_FILE}: it looks like a plain Zero123 model, not a "
                            f"Cascade-Zero123 refiner ({hint})")
        data = read_json_object(path, "refiner layout", hint)
        layout = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        if not isinstance(layout.nearby, list) or not layout.nearby or any(
                not isinstance(v, list) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v)
                for v in layout.nearby):
            raise UserError(f"refiner layout {path}: 'nearby' must be a list of [Δelevation, Δazimuth, Δdistance] "
                            f"triples, got {layout.nearby!r}")
        return layout

    def save(self, folder: str) -> None:
        write_json(os.path.join(folder, LAYOUT_FILE), asdict(self))


def nearby_views(view: torch.Tensor, offsets) -> torch.Tensor:
    """The self-prompt views (P, 3) of an input view (3,): the input plus each offset."""
    return view.reshape(1, 3).float() + torch.as_tensor(offsets, dtype=torch.float32).reshape(-1, 3)


@dataclass
class CascadeCondition:
    """Everything the refiner conditions on except the target view: the input image (its CLIP
    embedding (1, 1, D), unscaled latent (1, 4, h, w) and view (3,)) and the self-prompts
    (CLIP embeddings (P, D), views (P, 3))."""

    embedding: torch.Tensor
    latent: torch.Tensor
    view: torch.Tensor
    prompt_embeddings: torch.Tensor
    prompt_views: torch.Tensor


@torch.no_grad()
def embed(model, images_01: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings (B, D) of images (B, 3, H, W) in [0, 1]."""
    x = (images_01 * 2 - 1).to(model.device, model.dtype)
    return model.image_encoder(pixel_values=model.clip_preprocess(x)).image_embeds


def encode_cascade_condition(refiner, input_01: torch.Tensor, view: torch.Tensor, prompts_01: torch.Tensor,
                             prompt_views: torch.Tensor) -> CascadeCondition:
    """Encode the input image (1, 3, H, W) and self-prompt images (P, 3, H, W) with the refiner."""
    c = refiner.encode_condition(input_01)
    return CascadeCondition(c.embedding, c.latent, view.reshape(3).float(), embed(refiner, prompts_01),
                            prompt_views.reshape(-1, 3).float())


def token_inputs(input_emb: torch.Tensor, coarse: Optional[torch.Tensor], prompt_emb: torch.Tensor,
                 input_view: torch.Tensor, prompt_views: torch.Tensor, targets: torch.Tensor):
    """Embeddings (B, 2 + P, D) and poses (B, 2 + P, 4) of the refiner's tokens, batched:
    ``input_emb`` (B, D), ``coarse`` (B, D) or None (zero), ``prompt_emb`` (B, P, D), views (B, 3),
    ``prompt_views`` (B, P, 3), ``targets`` (B, 3)."""
    b = len(targets)
    coarse = torch.zeros_like(input_emb) if coarse is None else coarse.to(input_emb)
    embeddings = torch.cat([input_emb[:, None], coarse[:, None], prompt_emb.to(input_emb)], 1)
    poses = torch.cat([zero123_pose_vectors(targets, input_view)[:, None],
                       torch.zeros(b, 1, 4, device=targets.device),                     # coarse: zero pose
                       zero123_pose_vectors(targets[:, None], prompt_views)], 1)
    return embeddings, poses


def drop_embeddings(embeddings: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero the input and coarse embeddings (tokens 0 and 1) where ``drop`` (B,) is true: the
    paper's CFG dropout, and with ``drop`` all true the unconditional half of CFG."""
    keep = torch.ones_like(embeddings[:, :, :1])
    keep[:, :2] = (~drop).to(keep)[:, None, None]
    return embeddings * keep


def refiner_contexts(refiner, cond: CascadeCondition, targets: torch.Tensor,
                     coarse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional contexts (B, 2 + P, D) for target views (B, 3); ``coarse``:
    CLIP embeddings (B, D) of coarse target estimates, or None (zero embedding)."""
    b, dev = len(targets), refiner.device
    targets = targets.to(dev).float()
    d = cond.embedding.shape[-1]
    embeddings, poses = token_inputs(cond.embedding.reshape(1, d).expand(b, d), coarse,
                                     cond.prompt_embeddings.to(dev)[None].expand(b, -1, -1),
                                     cond.view.to(dev)[None].expand(b, 3), cond.prompt_views.to(dev)[None].expand(b, -1, 3),
                                     targets)
    dropped = drop_embeddings(embeddings, torch.ones(b, dtype=torch.bool, device=dev))
    return refiner.context_tokens(embeddings, poses), refiner.context_tokens(dropped, poses)


def refiner_noise(refiner, noisy: torch.Tensor, t, cond: CascadeCondition, targets: torch.Tensor,
                  guidance_scale: float, coarse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CFG noise prediction of the refiner for scaled noisy latents (B, 4, h, w) of views ``targets``."""
    noisy = noisy.to(refiner.device, refiner.dtype)
    ctx, uncond = refiner_contexts(refiner, cond, targets, coarse)
    unet_in, both = refiner.guidance_batch(noisy, cond.latent, ctx, uncond)
    return refiner.guided_noise(noisy, t, unet_in, both, guidance_scale)


@torch.no_grad()
def generate_prompts(base, input_01: torch.Tensor, view: torch.Tensor, offsets, steps: int = 50,
                     scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-prompting: the base model's DDIM views of the input at ``view + offset`` for each offset.
    Returns images (P, 3, H, W) in [0, 1] and their views (P, 3)."""
    views = nearby_views(view, offsets)
    condition = base.encode_condition(input_01)
    pose = zero123_pose_vectors(views, view.reshape(1, 3).float())
    images = sample(base, condition, pose, steps, scale, eta=0.0, generator=torch.Generator().manual_seed(seed))
    return images, views


@torch.no_grad()
def cascade_sample(refiner, cond: CascadeCondition, targets: torch.Tensor, steps: int = 50, scale: float = 3.0,
                   coarse_01: Optional[torch.Tensor] = None, eta: float = 0.0,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDIM views (B, 3, H, W) of the refiner at target views (B, 3); ``coarse_01``: coarse
    target images (B, 3, H, W) (e.g. the base model's views), or None."""
    coarse = None if coarse_01 is None else embed(refiner, coarse_01)
    return ddim(refiner, lambda x, t: refiner_noise(refiner, x, t, cond, targets, scale, coarse), len(targets),
                tuple(cond.latent.shape[-2:]), steps, eta, generator)


def weights_fingerprint(model) -> str:
    """A short content hash of a model's weights (a few tensors), for caches keyed by model."""
    import hashlib

    h = hashlib.sha256()
    for tensor in (model.projection.weight, model.unet.conv_in.weight, model.unet.conv_out.weight,
                   model.vae.encoder.conv_in.weight):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
