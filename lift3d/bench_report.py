"""What ``lift3d bench`` shows: the per-object comparison image (ground truth above the reconstruction)
and the summary files (CSV, JSON, and a Markdown table whose header names the protocol and which
direction is better)."""

from __future__ import annotations

import os
from lift3d.utils import io


def comparison_image(gt_mesh: str, pred_mesh: str, cameras_json: str, out_png: str, size: int = 128,
                     n_views: int = 4, title: str = "") -> str:
    """Ground truth (top row, normalised as the input was rendered) and reconstruction (bottom row,
    as exported) ray-cast from the input view and ``n_views - 1`` more around the object, labelled."""
    from lift3d.cameras import orbit_views
    from lift3d.mesh.io import load_mesh
    from lift3d.mesh.raycast import MeshRaycaster
    from lift3d.utils.figures import labelled_grid

    from lift3d.utils.inputs import read_json_object

    meta = read_json_object(cameras_json, "render cameras", keys=("views",))
    view = meta["views"][meta.get("input_view", 0)]
    cameras = orbit_views(n_views, view["elevation_deg"], view["distance"], view["fovy_deg"], size, size,
                          azimuth_start_deg=view["azimuth_deg"])
    rows = []
    for name, mesh in (("ground truth", load_mesh(gt_mesh, normalize=True)), ("reconstruction", load_mesh(pred_mesh))):
        rgba = MeshRaycaster(mesh).render(cameras, shading="lambert", samples_per_pixel=4)["rgba"]
        rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        labels = [f"az {float(a) % 360:.0f}" for a in cameras.azimuth_deg]
        labels[0] = f"{name}, input view"
        rows.append(list(zip(labels, rgb)))
    io.save_image(out_png, labelled_grid(rows, title=title or None))
    return os.path.abspath(out_png)


def compare_title(name: str, protocol: str, metrics: dict) -> str:
    return (f"{name} ({protocol}): Chamfer {metrics['chamfer_distance']:.4f} (lower is better), "
            f"IoU {metrics['volume_iou']:.4f} (higher is better)")


def result_line(result: dict, protocol: str) -> str:
    seconds = result.get("seconds", {}).get("total", 0.0)
    if result.get("status") != "ok":
        return f"{result['object']}: FAILED at {result.get('stage', '?')}: {result.get('error', '')} ({seconds:.0f} s)"
    m = result["metrics"][protocol]
    return (f"{result['object']}: {protocol} chamfer {m['chamfer_distance']:.4f} volume IoU {m['volume_iou']:.4f} "
            f"({seconds:.0f} s)")


# The export's look: against the ground truth's texture at the evaluation views, and from the input camera
# against the input (the run's own metrics.json; appearance.py).
APPEARANCE = ("psnr", "ssim", "silhouette_iou")
REFERENCE = ("psnr", "ssim", "silhouette_iou", "see_through")


def _rows(results: list, protocols) -> tuple[list, list]:
    """Flat per-object rows (for CSV/Markdown) and the column names."""
    columns = ["object", "status"]
    first_ok = next((r for r in results if r.get("status") == "ok"), None)
    for p in protocols:
        columns += [f"{p}/chamfer", f"{p}/volume_iou"]
        if first_ok:
            columns += [f"{p}/f@{t}" for t in first_ok["metrics"][p]["f_score"]]
            if "gt_views" in first_ok["metrics"][p]:
                columns += [f"{p}/gt_views_{k}" for k in APPEARANCE]
    if first_ok and first_ok.get("reference_view"):
        columns += [f"reference_view/{k}" for k in REFERENCE]
    columns += ["seconds_reconstruct", "seconds_total", "error"]
    rows = []
    for r in results:
        row = {"object": r["object"], "status": r.get("status", "?"), "error": r.get("error", ""),
               "seconds_reconstruct": r.get("seconds", {}).get("reconstruct"),
               "seconds_total": r.get("seconds", {}).get("total")}
        for p in protocols if r.get("status") == "ok" else ():
            m = r["metrics"][p]
            row[f"{p}/chamfer"], row[f"{p}/volume_iou"] = m["chamfer_distance"], m["volume_iou"]
            row.update({f"{p}/f@{t}": v for t, v in m["f_score"].items()})
            row.update({f"{p}/gt_views_{k}": m["gt_views"][k] for k in APPEARANCE if k in m.get("gt_views", {})})
        ref = r.get("reference_view") or {}
        row.update({f"reference_view/{k}": ref[k] for k in REFERENCE if k in ref})
        rows.append(row)
    return rows, columns


def write_summary(out: str, results: list, protocols) -> dict:
    """Write summary.json / .csv / .md under ``out``; return the summary dict."""
    import csv
    import io as _io

    rows, columns = _rows(results, protocols)
    ok = [r for r in rows if r["status"] == "ok"]
    numeric = [c for c in columns if c not in ("object", "status", "error")]
    mean = {c: sum(r[c] for r in ok if r.get(c) is not None) / max(1, sum(r.get(c) is not None for r in ok))
            for c in numeric} if ok else {}
    summary = {"n_objects": len(rows), "n_ok": len(ok), "n_failed": len(rows) - len(ok), "protocols": list(protocols),
               "mean": mean, "objects": rows,
               "protocol_details": {p: next((r["metrics"][p]["protocol"] for r in results if r.get("status") == "ok"),
                                            None) for p in protocols}}
    io.write_json(os.path.join(out, "summary.json"), summary)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows + ([{"object": "mean", "status": f"{len(ok)}/{len(rows)} ok", **mean}] if ok else []))
    io.write_text(os.path.join(out, "summary.csv"), buf.getvalue())
    io.write_text(os.path.join(out, "summary.md"), markdown_table(rows, columns, mean, len(ok)))
    return summary


def markdown_table(rows: list, columns: list, mean: dict, n_ok: int) -> str:
    """Chamfer, IoU and F-scores at 0.01/0.02/0.05 of the first protocol, Chamfer and IoU of the
    others, and the time per object (summary.csv has every column)."""
    protocols = list(dict.fromkeys(c.split("/")[0] for c in columns if "/" in c and c.split("/")[0] != "reference_view"))
    shown = ["object", "status"]
    for i, p in enumerate(protocols):
        shown += [f"{p}/chamfer", f"{p}/volume_iou"]
        shown += [f"{p}/f@{t}" for t in ("0.01", "0.02", "0.05") if i == 0 and f"{p}/f@{t}" in columns]
        shown += [f"{p}/gt_views_psnr"] if i == 0 and f"{p}/gt_views_psnr" in columns else []
    shown += [c for c in ("reference_view/psnr", "reference_view/silhouette_iou", "reference_view/see_through")
              if c in columns]
    shown += ["seconds_total"]

    def fmt(v):
        if v is None or v == "":
            return "–"
        if isinstance(v, float):
            return f"{v:.0f}" if v >= 10 else f"{v:.4f}"
        return str(v)

    header = [_column_title(c) for c in shown]
    lines = [f"Protocol{'s' if len(protocols) > 1 else ''}: {', '.join(protocols)} (summary.json: protocol_details). "
             "↓ lower is better, ↑ higher is better. Side-by-side renders: compare/<object>.png.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in shown) + " |")
    if mean:
        lines.append(f"| **mean** | {n_ok}/{len(rows)} ok | " + " | ".join(fmt(mean.get(c)) for c in shown[2:]) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    lines += [""] + [f"- {r['object']} failed: {r['error']}" for r in failed]
    return "\n".join(lines).rstrip() + "\n"


def _column_title(column: str) -> str:
    """``surface/chamfer`` -> ``surface Chamfer ↓``: the protocol and which direction is better."""
    if column == "seconds_total":
        return "time (s)"
    protocol, _, metric = column.partition("/")
    if not metric:
        return column
    if metric == "chamfer":
        return f"{protocol} Chamfer ↓"
    if metric == "volume_iou":
        return f"{protocol} IoU ↑"
    if metric == "see_through":
        return "input view see-through ↓"
    if protocol == "reference_view":
        return f"input view {metric.replace('silhouette_iou', 'silhouette IoU').replace('psnr', 'PSNR')} ↑"
    if metric.startswith("gt_views_"):
        return f"{protocol} texture {metric[len('gt_views_'):].upper()} ↑"
    return f"{protocol} {metric.replace('f@', 'F@')} ↑"


# --------------------------------------------------------------------------- command line
