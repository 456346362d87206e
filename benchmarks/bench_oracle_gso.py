"""The oracle benchmark: ``lift3d bench`` with configs/oracle.yaml on the bundled GSO-layout set.

Prints the Markdown table and checks the issue's targets on every object (surface protocol):
volume IoU >= 0.8 and Chamfer <= 0.02. Exit code 0 when all pass.

    python benchmarks/bench_oracle_gso.py --out /tmp/oracle-bench [--backend ray] [key=value ...]

Re-running with the same --out resumes (finished objects are skipped; --force re-runs them).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IOU_MIN, CHAMFER_MAX = 0.8, 0.02


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=os.path.join(ROOT, "examples", "objects"))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "oracle.yaml"))
    p.add_argument("--out", default="outputs/bench-oracle")
    p.add_argument("--objects", default="")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", default=None)
    p.add_argument("--force", action="store_true")
    args, overrides = p.parse_known_args()

    from lift3d.bench import run_bench

    summary = run_bench(args.dataset, args.config, args.out, objects=[o for o in args.objects.split(",") if o] or None,
                        backend=args.backend, address=args.address, protocols=("surface", "syncdreamer"),
                        overrides=tuple(overrides), force=args.force)
    print(open(os.path.join(args.out, "summary.md")).read())
    failures = []
    for row in summary["objects"]:
        if row["status"] != "ok":
            failures.append(f"{row['object']}: failed ({row['error']})")
            continue
        iou, cd = row["surface/volume_iou"], row["surface/chamfer"]
        if iou < IOU_MIN or cd > CHAMFER_MAX:
            failures.append(f"{row['object']}: volume IoU {iou:.4f} (>= {IOU_MIN}), Chamfer {cd:.4f} (<= {CHAMFER_MAX})")
    print("checks (surface protocol): " + ("all objects pass" if not failures else "FAIL\n  " + "\n  ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
