"""CaPE, EscherNet's camera positional encoding, and the multi-view attention that applies it.

EscherNet (kxhit/EscherNet) turns every attention layer of a Stable-Diffusion UNet into a multi-view
one: the T target views of one object are a single token sequence (self-attention runs across all
views), cross-attention reads the image-encoder tokens of all reference views, and each token's
query and key are transformed by its view's camera so that their dot product depends only on the
*relative* camera:

- **4-DoF** (``variant="4dof"``): a view's pose is the vector ``p = (θ, φ, ρ, 0)`` (polar angle,
  azimuth, log-scaled radius; :func:`pose_4dof`). A feature of width d is cut into four contiguous
  quarters, quarter k rotated by the angle ``p_k`` in the plane of each adjacent channel pair
  (2i, 2i+1): ``(x, y) -> (x cos p_k - y sin p_k, y cos p_k + x sin p_k)``. Queries and keys are
  rotated by their own views' poses, so q·k depends on ``p_query - p_key`` only.
- **6-DoF** (``variant="6dof"``): a view's pose is its 4x4 world-to-camera matrix P
  (:func:`pose_6dof`). A feature is cut into d/4 consecutive 4-vectors, each multiplied on the right:
  a query's by ``(P_q^-1)^T``, a key's by ``P_k``, so q·k sees ``P_k P_q^-1`` only.

In self-attention both the query and the key are the target views' (their own poses); in
cross-attention the keys are the reference tokens with the reference views' poses. The encoding is
applied to the full projected width (all heads together), before the heads are split, and values are
left as they are. An unconditional (classifier-free) pass keeps the poses and zeroes the reference
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

VARIANTS = ("4dof", "6dof")
# EscherNet's training views were 1.5 to 2.2 units from the object; the 4-DoF radius slot maps that
# range log-linearly onto [0, π] (distances outside it are clamped).
RADIUS_RANGE = (1.5, 2.2)


def pose_4dof(position: torch.Tensor) -> torch.Tensor:
    """4-DoF pose vectors (..., 4) = (polar θ, azimuth φ, ρ, 0) of cameras at ``position`` (..., 3)
    looking at the origin, world z up: θ = atan2(√(x²+y²), z), φ = atan2(y, x),
    ρ = π (ln r − ln 1.5) / (ln 2.2 − ln 1.5) with r clamped to [1.5, 2.2]."""
    p = position.double()
    xy = p[..., 0] ** 2 + p[..., 1] ** 2
    r = (xy + p[..., 2] ** 2).sqrt()
    theta = torch.atan2(xy.sqrt(), p[..., 2])
    phi = torch.atan2(p[..., 1], p[..., 0])
    lo, hi = RADIUS_RANGE
    rho = (r.clamp(lo, hi).log() - math.log(lo)) / (math.log(hi) - math.log(lo)) * math.pi
    return torch.stack([theta, phi, rho, torch.zeros_like(rho)], -1)


def pose_6dof(c2w: torch.Tensor) -> torch.Tensor:
    """6-DoF poses (..., 4, 4): world-to-camera matrices (float64) of OpenGL/Blender cameras (looking
    down their -z axis, +y up) given camera-to-world ``c2w`` (..., 4, 4)."""
    return torch.linalg.inv(c2w.double())


@dataclass
class ViewPoses:
    """The CaPE poses of one multi-view UNet pass: ``target`` (B, T, 4) or (B, T, 4, 4) for the T
    target views (the noisy latents, ordered view-major within each of the B batch entries) and
    ``reference`` (B, R, ...) for the R reference views whose tokens are the cross-attention context.
    B is 1 (broadcast over the classifier-free halves) or the UNet batch divided by T."""

    variant: str
    target: torch.Tensor
    reference: torch.Tensor

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"CaPE variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "6dof":
            # A query is multiplied by the inverse transpose of its pose (computed in float64).
            self.target_query = torch.linalg.inv(self.target.double()).transpose(-1, -2)

    @property
    def n_target(self) -> int:
        return self.target.shape[1]

    def encode(self, tokens: torch.Tensor, views: int, poses: torch.Tensor, query: bool) -> torch.Tensor:
        """Encode ``tokens`` (B, views·L, d) of ``views`` views with ``poses`` (B or 1, views, ...)."""
        b, n, d = tokens.shape
        x = tokens.reshape(b, views, n // views, d)
        if self.variant == "4dof":
            if d % 8:
                raise ValueError(f"4-DoF CaPE needs a feature width divisible by 8, got {d}")
            angles = poses.to(tokens.dtype).repeat_interleave(d // 4, dim=-1)[:, :, None]   # (B, V, 1, d)
            pairs = x.reshape(b, views, n // views, d // 2, 2)
            turned = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape_as(x)
            out = x * angles.cos() + turned * angles.sin()
        else:
            if d % 4:
                raise ValueError(f"6-DoF CaPE needs a feature width divisible by 4, got {d}")
            matrices = (self.target_query if query else poses).to(tokens.dtype)[:, :, None]  # (B, V, 1, 4, 4)
            out = (x.reshape(b, views, n // views, d // 4, 4) @ matrices).reshape_as(x)
        return out.reshape(b, n, d)

    def encode_query_key(self, query: torch.Tensor, key: torch.Tensor, self_attention: bool):
        t = self.n_target
        q = self.encode(query, t, self.target, query=True)
        if self_attention:
            k = self.encode(key, t, self.target, query=False)
        else:
            k = self.encode(key, self.reference.shape[1], self.reference, query=False)
        return q, k


class CaPEAttnProcessor:
    """A diffusers attention processor: multi-view attention with CaPE when the UNet is called with
    ``cross_attention_kwargs={"cape": ViewPoses(...)}``, plain attention without it."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 cape: Optional[ViewPoses] = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("EscherNet's attention takes no attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        rows, length, _ = hidden_states.shape
        views = cape.n_target if cape is not None else 1
        # The T target views of each batch entry become one token sequence.
        hidden_states = hidden_states.reshape(rows // views, views * length, -1)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        if self_attention:
            context = hidden_states
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross \
                else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise ValueError("EscherNet's attention has no query/key normalisation")
        if cape is not None:
            query, key = cape.encode_query_key(query, key, self_attention)

        b, heads = query.shape[0], attn.heads
        split = lambda x: x.reshape(b, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(query), split(key), split(value), scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        out = out.reshape(rows, length, -1)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
