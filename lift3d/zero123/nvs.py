"""``lift3d nvs``: novel views of an image from a Zero123-family model, written as PNG files and a
JSON record (the job of Zero123's gradio demo). Pose conventions and the DDIM sampler are
:mod:`lift3d.zero123.sampling`'s.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch

from lift3d.config import number_arg
from lift3d.errors import UserError
from lift3d.utils.device import pick_device
from lift3d.utils.images import load_image, open_image
from lift3d.utils.io import save_image, write_json
from lift3d.zero123.cascade import CascadeLayout, cascade_sample, encode_cascade_condition, generate_prompts
from lift3d.zero123.model import Zero123Model
from lift3d.zero123.sampling import relative_pose, sample

MAX_STEPS = 1000     # the DDIM steps of a Zero123-family model: at most its training timesteps (1000 for all)


def nvs(model_path: Union[str, "torch.nn.Module"], image: str, elevation: float, azimuth: float, radius: float = 0.0,
        out_dir: str = "nvs", steps: int = 50, scale: float = 3.0, seed: int = 0, n_samples: int = 4,
        eta: float = 1.0, pose_variant: str = "zero123", condition_elevation: float = 0.0,
        device: str = "auto", variant: Optional[str] = None, refiner: Optional[str] = None) -> list[str]:
    """``lift3d nvs``: write ``n_samples`` novel views (``view_00.png`` ...), ``grid.png`` (input
    then samples) and ``nvs.json`` to ``out_dir``. Returns the written paths.
    ``model_path`` may also be an already loaded :class:`Zero123Model`.

    With ``refiner`` (a Cascade-Zero123 refiner folder) the model is the base: it generates the
    self-prompts and a coarse view per sample (``base_view_XX.png``, ``prompt_XX.png``), and the
    refiner's views conditioned on all of them are the ``view_XX.png``."""
    if pose_variant not in ("zero123", "stable"):
        raise UserError(f"pose variant '{pose_variant}' is unknown; use zero123 or stable")
    if refiner and pose_variant != "zero123":
        raise UserError("--refiner: Cascade-Zero123 refiners use the zero123 pose vector (drop --stable)")
    if not 1 <= steps <= MAX_STEPS or n_samples < 1:
        raise UserError(f"--steps must be in [1, {MAX_STEPS}] and --n-samples at least 1, got {steps} and {n_samples}")
    if not all(math.isfinite(v) for v in (elevation, azimuth, radius, scale, eta, condition_elevation)):
        raise UserError("--elevation, --azimuth, --radius, --scale, --eta and --condition-elevation must be finite "
                        "numbers")
    dev = pick_device(device)
    open_image(image)  # a missing or unreadable image fails before the model loads
    if refiner:
        CascadeLayout.load(refiner, required=True)      # so does a refiner folder that is a plain model
    if isinstance(model_path, Zero123Model):
        model = model_path
    else:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        model = Zero123Model.from_pretrained(model_path, torch_dtype=dtype, variant=variant).to(dev)
    x = load_image(image, model.image_size).to(model.device)
    condition = model.encode_condition(x)
    pose = relative_pose(elevation, azimuth, radius, n_samples, pose_variant == "stable", condition_elevation)
    generator = torch.Generator().manual_seed(int(seed))
    if steps > model.num_train_timesteps:
        raise UserError(f"--steps {steps} is more than the model's {model.num_train_timesteps} training timesteps")
    views = _finite(sample(model, condition, pose, steps, scale, eta, generator).cpu(), scale)

    paths, row = [], [x[0].float().cpu()]
    if refiner:
        extra, views = _refine(model, refiner, x, views, elevation, azimuth, radius, condition_elevation, steps,
                               scale, eta, seed, dtype=model.dtype, variant=variant)
        for name, images in extra.items():
            for i, view in enumerate(images):
                paths.append(os.path.join(out_dir, f"{name}_{i:02d}.png"))
                save_image(paths[-1], view.permute(1, 2, 0))
            row += list(images)
    for i, view in enumerate(views):
        paths.append(os.path.join(out_dir, f"view_{i:02d}.png"))
        save_image(paths[-1], view.permute(1, 2, 0))
    grid = torch.cat(row + list(views), dim=2)  # one row: input, (prompts, base views,) then the samples
    paths.append(os.path.join(out_dir, "grid.png"))
    save_image(paths[-1], grid.permute(1, 2, 0))
    paths.append(os.path.join(out_dir, "nvs.json"))
    write_json(paths[-1], {"model": getattr(model, "source", str(model_path)), "image": image, "elevation": elevation,
                           "azimuth": azimuth, "radius": radius, "pose": pose[0].tolist(), "steps": steps,
                           "scale": scale, "eta": eta, "seed": seed, "n_samples": n_samples,
                           "pose_variant": pose_variant, "refiner": refiner})
    return paths


def _refine(base, refiner_path: str, x: torch.Tensor, base_views: torch.Tensor, elevation: float, azimuth: float,
            radius: float, condition_elevation: float, steps: int, scale: float, eta: float, seed: int, dtype,
            variant) -> tuple[dict, torch.Tensor]:
    """Cascade-Zero123 views: self-prompts from the base, the base's views as coarse targets."""
    from lift3d.zero123.cascade import CascadeLayout, cascade_sample, encode_cascade_condition, generate_prompts
    layout = CascadeLayout.load(refiner_path, required=True)
    refiner = Zero123Model.from_pretrained(refiner_path, torch_dtype=dtype, variant=variant).to(base.device)
    view = torch.tensor([condition_elevation, 0.0, 0.0])  # only differences of views enter the poses
    prompts, prompt_views = generate_prompts(base, x, view, layout.nearby, steps, scale, seed)
    cond = encode_cascade_condition(refiner, x, view, prompts, prompt_views)
    targets = (view + torch.tensor([elevation, azimuth, radius])).expand(len(base_views), 3)
    views = cascade_sample(refiner, cond, targets, steps, scale, coarse_01=base_views.to(refiner.device), eta=eta,
                           generator=torch.Generator().manual_seed(int(seed) + 1)).cpu()
    return {"prompt": prompts.cpu(), "base_view": base_views}, _finite(views, scale)


def _finite(views: torch.Tensor, scale: float) -> torch.Tensor:
    """The sampled views, or one line when they are not numbers (they would be written as black images)."""
    if not bool(torch.isfinite(views).all()):
        raise UserError(f"the sampled views are not finite (NaN or infinity): --scale {scale:g} is far too large "
                        "for this model (the Zero123 demo uses 3)")
    return views


def main(argv: list[str]) -> int:
    """``lift3d nvs``."""
    import argparse

    p = argparse.ArgumentParser(prog="lift3d nvs", description="Novel views of an image from a Zero123-family "
                                "model (DDIM), relative to the input view.")
    p.add_argument("--model", required=True,
                   help="diffusers folder (kxic or bennyguo layout), original .ckpt, or hub id")
    p.add_argument("--image", required=True, help="input image (RGBA composited on white, or RGB on white)")
    p.add_argument("--elevation", type=number_arg(float, ge=-180, le=180), required=True,
                   help="degrees up from the input view")
    p.add_argument("--azimuth", type=number_arg(float), required=True,
                   help="degrees around the object (counter-clockwise seen from above)")
    p.add_argument("--radius", type=number_arg(float), default=0.0,
                   help="change of camera distance (Zero123: -0.5 .. 0.5)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=number_arg(int, ge=1, le=MAX_STEPS), default=50,
                   help=f"DDIM steps, at most the model's {MAX_STEPS} training timesteps")
    p.add_argument("--scale", type=number_arg(float, ge=0), default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=number_arg(int, ge=0, lt=2 ** 32), default=0)
    p.add_argument("--n-samples", type=number_arg(int, ge=1), default=4)
    p.add_argument("--eta", type=number_arg(float, ge=0), default=1.0, help="DDIM eta (the Zero123 demo uses 1.0)")
    p.add_argument("--stable", action="store_true", help="Stable-Zero123 pose vector (needs --condition-elevation)")
    p.add_argument("--condition-elevation", type=number_arg(float, ge=-90, le=90), default=0.0,
                   help="elevation of the input view (--stable)")
    p.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16")
    p.add_argument("--device", default="auto")
    p.add_argument("--refiner", default=None, help="a Cascade-Zero123 refiner folder: --model is then its base")
    a = p.parse_args(argv)
    paths = nvs(a.model, a.image, a.elevation, a.azimuth, a.radius, out_dir=a.out, steps=a.steps, scale=a.scale,
                seed=a.seed, n_samples=a.n_samples, eta=a.eta, pose_variant="stable" if a.stable else "zero123",
                condition_elevation=a.condition_elevation, device=a.device, variant=a.variant,
                refiner=a.refiner)
    print(f"wrote {len(paths) - 2} views and {os.path.basename(paths[-2])} to {a.out}")
    return 0
