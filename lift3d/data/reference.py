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


def reference_list(reference) -> list:
    """The reference views as a list: a run with several photos passes a list of :class:`ReferenceView`
    (the first is the primary one: its camera defines azimuth 0), a single-photo run one view."""
    if isinstance(reference, ReferenceView):
        return [reference]
    views = list(reference)
    if not views or not all(isinstance(v, ReferenceView) for v in views):
        raise TypeError("expected a ReferenceView or a non-empty sequence of them")
    return views
