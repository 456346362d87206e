"""Per-iteration CPU cost of the geometry fields under the volume renderer.

For voxel-rf (100^3, 4 latent channels, as 3drec) and hashgrid-nerf (threestudio's defaults) it
renders a batch of 64x64 rays x N samples, backpropagates a loss on the image and takes an Adam
step, and prints the mean forward / backward / Adam wall time. Each field is mostly empty (a small
dense blob), and is timed without and with occupancy-grid skipping.

    PYTHONPATH=. python benchmarks/bench_fields.py [--samples 128] [--iters 5] [--size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from lift3d.backgrounds.solid import SolidColorBackground
from lift3d.cameras import Cameras
from lift3d.geometry.hashgrid_nerf import HashGridNeRF
from lift3d.geometry.voxel_rf import VoxelRadianceField
from lift3d.renderers.volume import VolumeRenderer


def mostly_empty_voxels() -> VoxelRadianceField:
    field = VoxelRadianceField({"grid_size": 100, "n_feature_dims": 4})
    c = (torch.arange(100) + 0.5) / 100 * 2 - 1
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    with torch.no_grad():   # a dense ball of radius 0.35, sigma ~ 0 elsewhere
        field.density_raw[0, 0] = torch.where(xx ** 2 + yy ** 2 + zz ** 2 < 0.35 ** 2, 6.0, -12.0)
    return field


def hashgrid() -> HashGridNeRF:
    # threestudio's defaults; the Magic3D blob bias makes a ball of radius ~0.5-0.6 at init.
    return HashGridNeRF({"n_feature_dims": 3, "hash_backend": "torch"})


def time_steps(loss_fn, optimizer, iters: int) -> tuple[float, float, float, float]:
    """Mean forward, backward, optimiser and process-CPU milliseconds per step over ``iters`` steps,
    after one uncounted warm-up step (allocators)."""
    times, cpu = [], 0.0
    for it in range(iters + 1):
        c0, t0 = time.process_time(), time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if it:
            times.append((t1 - t0, t2 - t1, t3 - t2))
            cpu += time.process_time() - c0
    fwd, bwd, opt = (sum(t[i] for t in times) / len(times) * 1000 for i in range(3))
    return fwd, bwd, opt, cpu / len(times) * 1000


def bench(name: str, field, skip: bool, args) -> None:
    bg = SolidColorBackground({"color": [1.0] * field.n_feature_dims})
    renderer = VolumeRenderer({"num_samples_per_ray": args.samples, "use_occupancy_grid": skip,
                               "occ_warmup_steps": 0}, geometry=field, background=bg).train()
    refresh = ""
    if skip:   # the first refresh visits all 64^3 cells; later ones (every occ_update_every steps) fewer
        t0 = time.perf_counter()
        renderer.update_step(0)
        t1 = time.perf_counter()
        renderer.update_occupancy()
        t2 = time.perf_counter()
        refresh = f"   (grid refresh: first {(t1 - t0) * 1000:.0f} ms, later {(t2 - t1) * 1000:.0f} ms)"
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-2)
    cameras = Cameras.from_spherical(20.0, 30.0, 2.5, 40.0, args.size, args.size)

    def loss():
        out = renderer(cameras)
        return (out["comp_rgb"] - 0.5).pow(2).mean() + 0.01 * out["depth"].mean()

    fwd, bwd, adam, cpu = time_steps(loss, optimizer, args.iters)
    occ = f"{renderer.occupancy.occupied_fraction:5.1%}" if skip else "  -  "
    print(f"{name:15s} {'on' if skip else 'off':>4s} {occ:>7s} {renderer.stats['evaluated_fraction']:9.1%} "
          f"{fwd:8.0f} {bwd:8.0f} {adam:6.0f} {fwd + bwd + adam:8.0f} {cpu:8.0f}"
          + refresh, flush=True)


def bench_encoding(n_points: int, iters: int) -> None:
    """The hash encoding alone (fwd + bwd + Adam on its tables), for comparison with
    reference/cpu-measurements.md §3."""
    enc = hashgrid().encoding
    optimizer = torch.optim.Adam(enc.parameters(), lr=1e-2)
    x = torch.rand(n_points, 3)
    fwd, bwd, adam, _ = time_steps(lambda: enc(x).square().mean(), optimizer, iters)
    print(f"hash encoding only, {n_points} points: fwd {fwd:.0f} ms, bwd {bwd:.0f} ms, Adam {adam:.0f} ms, "
          f"total {fwd + bwd + adam:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.size}x{args.size} rays x {args.samples} samples, {args.threads} threads, "
          f"mean of {args.iters} iterations (ms; 'cpu' is process CPU time summed over threads, which "
          f"other jobs on the machine disturb less than wall time)")
    print(f"{'field':15s} {'skip':>4s} {'occ':>7s} {'evaluated':>9s} {'forward':>8s} {'backward':>8s} "
          f"{'Adam':>6s} {'total':>8s} {'cpu':>8s}")
    for name, make in (("voxel-rf 100^3", mostly_empty_voxels), ("hashgrid-nerf", hashgrid)):
        for skip in (False, True):
            bench(name, make(), skip, args)
    bench_encoding(65536, args.iters)


if __name__ == "__main__":
    main()
