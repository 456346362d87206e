"""Zero123++ SDS: encode the six renders as one 960x640 tile, or view by view? (issue 25)

Two measurements, each mode in a subprocess of its own so that each peak is its own:

- ``memory``: a published-size prior step on a CPU in float32: the SD-2 UNet and VAE at their published shapes
  (random weights, built in memory), six 320-px renders with gradients -> tile -> ``Zero123PlusModel.encode``
  (``per_view`` off / on) -> one CFG noise prediction with reference attention (no gradient) -> the SDS
  gradient back through the encoder. Prints the peak resident memory above the weights (bar: 3 GiB) and
  each phase's peak and seconds. "Resident after loading" is the weights plus the interpreter.
- ``latents``: how far the two encodings differ with a *trained* VAE (the bundled mini prior's; no published
  VAE can be downloaded here): six albedo renders of a bundled object at Zero123++ v1.2's cameras on gray,
  as one tile; the posterior means of both encodings, and their decodes, compared (whole tile, and the
  latents within one cell of a view's border against the rest).

    python benchmarks/zero123plus_encoder.py memory [--threads 2]
    python benchmarks/zero123plus_encoder.py latents [--object car]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_zero123_step import PeakRSS, rss_gib  # noqa: E402

GRAY_DEFAULT = 127.0 / 255.0   # Zero123++'s background


def published_model():
    """A Zero123PlusModel with the published UNet and VAE shapes and random weights (no text or vision
    encoder: a step only needs the condition they made, drawn here at its published shapes)."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    from lift3d.zero123plus.model import Zero123PlusCondition, Zero123PlusModel
    from lift3d.zero123plus.random_model import UNET, VAE, scheduler_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET["full"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **VAE["full"])
    scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler_config("v1.2"))
    processor = {"crop_size": {"height": 320, "width": 320}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    model = Zero123PlusModel(unet, vae, None, scheduler, torch.randn(1, 77, 1024), torch.rand(77), processor,
                             processor)
    condition = Zero123PlusCondition(torch.randn(2, 77, 1024), torch.randn(2, 4, 40, 40))
    return model, condition


def one_step(per_view: bool, threads: int) -> dict:
    import torch

    from lift3d.zero123plus.model import tile

    torch.set_num_threads(threads)
    model, condition = published_model()
    weights = rss_gib()
    renders = torch.rand(6, 3, 320, 320, requires_grad=True)
    seconds, peaks = {}, {}
    t = torch.tensor([500])
    with PeakRSS() as mem:
        start = time.perf_counter()
        z = model.encode(tile(renders), per_view=per_view)
        seconds["encode"], peaks["encode"] = time.perf_counter() - start, mem.peak - weights
    noise = torch.randn_like(z)
    with PeakRSS() as mem, torch.no_grad():
        start = time.perf_counter()
        a = model.alpha_at(t).reshape(-1, 1, 1, 1)
        eps = model.predict_noise(a.sqrt() * z + (1 - a).sqrt() * noise, t, condition, 4.0)
        seconds["unet"], peaks["unet"] = time.perf_counter() - start, mem.peak - weights
    with PeakRSS() as mem:
        start = time.perf_counter()
        z.backward(eps - noise)
        seconds["backward"], peaks["backward"] = time.perf_counter() - start, mem.peak - weights
    assert renders.grad is not None and torch.isfinite(renders.grad).all()
    model_gib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 30
    return {"per_view": per_view, "model_gib": model_gib, "weights_gib": weights,
            "above_weights_gib": max(peaks.values()), "above_model_gib": weights + max(peaks.values()) - model_gib,
            "peaks": peaks, "seconds": seconds}


def memory(args) -> None:
    rows = []
    for mode in ("tile", "views"):
        out = subprocess.run([sys.executable, __file__, "_step", mode, "--threads", str(args.threads)],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(f"the {mode} step failed (exit {out.returncode})")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((mode, row))
        print(json.dumps({"mode": mode, **row}), flush=True)
    print("\n| encode | model GiB | resident after loading GiB | step peak above the model GiB (bar 3) | "
          "above the loaded process GiB | encode: peak GiB, s | UNet (CFG, reference pass): peak GiB, s | "
          "backward: peak GiB, s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in rows:
        s, p = r["seconds"], r["peaks"]
        print(f"| {mode} | {r['model_gib']:.2f} | {r['weights_gib']:.2f} | {r['above_model_gib']:.2f} | "
              f"{r['above_weights_gib']:.2f} | "
              + " | ".join(f"{p[k]:.2f}, {s[k]:.0f}" for k in ("encode", "unet", "backward")) + " |")


def latents(args) -> None:
    import torch

    from lift3d.cameras import Cameras
    from lift3d.evaluation.appearance import render_albedo
    from lift3d.mesh import load_mesh
    from lift3d.zero123.model import Zero123Model
    from lift3d.zero123plus.model import AZIMUTHS, VERSIONS, encode_views, tile

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vae = Zero123Model.from_pretrained(os.path.join(here, "lift3d", "assets", "zero123-mini")).vae
    size = int(vae.config.sample_size)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    elevations = [VERSIONS["v1.2"]["elevations"][k % 2] for k in range(6)]
    cameras = Cameras.from_spherical(elevations, list(AZIMUTHS), 2.0, VERSIONS["v1.2"]["fovy"], size, size)
    mesh = load_mesh(os.path.join(here, "examples", "objects", args.object, "meshes", "model.obj"), normalize=True)
    rgba = render_albedo(mesh, cameras)
    rgb = rgba[..., :3] * rgba[..., 3:] + args.background * (1 - rgba[..., 3:])
    x = tile(rgb.permute(0, 3, 1, 2)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).latent_dist.mean
        views = encode_views(vae, x).mean
        dec_whole = vae.decode(whole).sample.clamp(-1, 1)
        dec_views = vae.decode(views).sample.clamp(-1, 1)
    h, w = whole.shape[-2] // 3, whole.shape[-1] // 2
    border = torch.zeros(whole.shape[-2:], dtype=torch.bool)
    for r in range(3):
        for c in range(2):
            cell = border[r * h:(r + 1) * h, c * w:(c + 1) * w]
            cell[:1], cell[-1:], cell[:, :1], cell[:, -1:] = True, True, True, True
    diff = (views - whole).abs()
    rel = float((views - whole).norm() / whole.norm())

    def psnr(a, b):
        return float(10 * torch.log10(4.0 / ((a - b) ** 2).mean()))

    result = {"object": args.object, "vae": "zero123-mini (trained)", "view_px": size, "latent_factor": f,
              "relative_l2": rel, "mean_abs_border": float(diff[..., border].mean()),
              "mean_abs_interior": float(diff[..., ~border].mean()), "mean_abs_latent": float(whole.abs().mean()),
              "decode_psnr_views_vs_tile": psnr(dec_views, dec_whole), "decode_psnr_tile_vs_input": psnr(dec_whole, x),
              "decode_psnr_views_vs_input": psnr(dec_views, x)}
    print(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["memory", "latents", "_step"])
    ap.add_argument("mode", nargs="?", choices=["tile", "views"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--object", default="car")
    ap.add_argument("--background", type=float, default=GRAY_DEFAULT)
    args = ap.parse_args()
    if args.what == "_step":
        print(json.dumps(one_step(args.mode == "views", args.threads)))
    elif args.what == "memory":
        memory(args)
    else:
        latents(args)


if __name__ == "__main__":
    main()
