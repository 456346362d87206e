"""Milliseconds per render of the PyTorch Gaussian rasterizer (lift3d/renderers/gaussian_raster.py).

    python benchmarks/bench_gaussian_raster.py [--threads T] [--sizes 64 128 256] [--counts 1000 5000 20000]

One view at lift3d's default camera (distance 2, fovy 49.1) of N Gaussians initialised as DreamGaussian
does: uniform in a ball of radius 0.5, scale about the nearest-neighbour spacing, opacity 0.1. Prints,
per (size, N): Gaussian-tile pairs, the pixel-Gaussian pairs the tiles evaluate as a share of all
pixel x Gaussian pairs, and the best of --repeats of a forward render without gradients and of a
forward + backward (RGB, depth and normals), in wall-clock and process-CPU milliseconds.
"""

import argparse
import math
import time

import torch

from lift3d.cameras import Cameras
from lift3d.renderers.gaussian_raster import bin_tiles, project, rasterize


def scene(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = direction * 0.5 * torch.rand(n, 1, generator=g) ** (1 / 3)
    spacing = (4 / 3 * math.pi * 0.5 ** 3 / n) ** (1 / 3)
    scales = 0.6 * spacing * torch.exp(0.3 * torch.randn(n, 3, generator=g))
    quats = torch.randn(n, 4, generator=g)
    return means, scales, quats, torch.full((n,), 0.1), torch.rand(n, 3, generator=g)


def best_ms(fn, repeats: int) -> str:
    """'wall/cpu' milliseconds, the best of ``repeats``: on a shared machine the process CPU time is the
    steadier number (with one thread it is what the wall time would be on an idle core)."""
    fn()                                                    # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return f"{1e3 * min(wall):.0f}/{1e3 * min(cpu):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'px':>4} {'N':>6} {'tile pairs':>10} {'evaluated':>9} {'forward ms wall/cpu':>20} {'fwd+bwd ms wall/cpu':>20}")
    for size in args.sizes:
        cam = Cameras.from_spherical(15.0, 30.0, 2.0, 49.1, size, size)
        for n in args.counts:
            params = scene(n)
            p = project(*params[:3], cam)
            gids, _, counts = bin_tiles(p["means2d"], p["radii"], p["depths"], size, size)
            share = len(gids) * 256 / (size * size * n)

            def forward():
                with torch.no_grad():
                    rasterize(*params, cam, torch.ones(3), normals=True)

            def forward_backward():
                leaves = [t.clone().requires_grad_() for t in params]
                out = rasterize(*leaves, cam, torch.ones(3), normals=True)
                (out["comp_rgb"].sum() + out["depth"].sum() + out["comp_normal"].sum()).backward()

            print(f"{size:>4} {n:>6} {len(gids):>10} {share:>9.2%} {best_ms(forward, args.repeats):>20} "
                  f"{best_ms(forward_backward, args.repeats):>20}", flush=True)


if __name__ == "__main__":
    main()
