"""The reference view: the user's image, preprocessed, and the camera it was taken from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lift3d.cameras import Cameras


@dataclass
class ReferenceView:
    rgba: torch.Tensor       # (H, W, 4) in [0, 1], straight (not premultiplied) alpha
    camera: Cameras          # one camera with the image's height and width
    path: str = ""

    @property
    def mask(self) -> torch.Tensor:
        """(H, W, 1) foreground mask in [0, 1] (the alpha channel)."""
        return self.rgba[..., 3:]

    @property
    def rgb(self) -> torch.Tensor:
        """(H, W, 3) colour composited on white, as diffusion models see it."""
        return self.rgba[..., :3] * self.mask + (1 - self.mask)
