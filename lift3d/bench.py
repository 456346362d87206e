"""``lift3d bench``: reconstruct and score every object of a GSO-layout dataset.

For each object: render the input and evaluation views (``render_gso``), run a config on the
input view (``launch.py`` in-process), score the exported mesh against the ground truth under
one or more protocols. Each object's result is written to ``<out>/results/<object>.json``
(atomically) the moment it is done, so a killed run resumes where it stopped: objects with an
``ok`` result are skipped, failed ones are retried. A failing object is recorded and the others
go on. After every object the summary is rewritten: ``summary.csv``, ``summary.json`` and
``summary.md`` (a Markdown table, per object and mean, with the time per object; its header names
the protocol and which direction is better). ``compare/<object>.png`` shows the ground truth and
the reconstruction side by side, ray-cast from the input view and three more.

``--photos 0,8`` gives each run several of the rendered views as its photos (``images=`` with the render's
``cameras.json`` as ``data.reference_cameras``), the first the primary one; the default is the input view alone.

Backends: ``local`` runs the objects one after the other in this process; ``ray`` runs them as
Ray tasks (``ray.init(address)``: a local Ray by default, or a cluster whose nodes have lift3d
installed and see the dataset and output folders at the same paths), each asking for
``num_cpus`` / ``num_gpus``. A run killed during an object's training resumes that training from
the object's last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from lift3d.bench_report import compare_title, result_line, comparison_image, write_summary
from lift3d.config import number_arg, resolve_config
from lift3d.errors import UserError
from lift3d.utils import io

log = logging.getLogger("lift3d")

# reconstruct(input_png, gt_mesh, out_dir, config, overrides) -> trial folder holding export/model.obj
Reconstruct = Callable[[str, str, str, str, list], str]


@dataclass
class ObjectTask:
    """Everything one object's run needs; plain data so it travels to Ray workers."""

    name: str
    object_dir: str
    out: str
    config: str
    overrides: list = field(default_factory=list)
    protocols: list = field(default_factory=lambda: ["surface", "syncdreamer"])
    camera_overrides: bool = True
    fresh: bool = False                                   # ignore a checkpoint left by a killed run
    render_options: dict = field(default_factory=dict)    # render_gso keywords (tests: small renders)
    eval_options: dict = field(default_factory=dict)      # protocol overrides (tests: few points)
    photos: list = field(default_factory=list)            # rendered views given as photos (indices); []: the input

    @property
    def result_path(self) -> str:
        return os.path.join(self.out, "results", f"{self.name}.json")

    @property
    def compare_path(self) -> str:
        return os.path.join(self.out, "compare", f"{self.name}.png")


def camera_overrides(cameras_json: str) -> list[str]:
    """single-image data overrides that put the reference camera exactly where the input was rendered."""
    from lift3d.utils.inputs import read_json_object

    meta = read_json_object(cameras_json, "render cameras", "delete its folder to render again", keys=("views",))
    view = meta["views"][meta.get("input_view", 0)]
    return ["data.foreground_ratio=null", f"data.default_elevation_deg={view['elevation_deg']}",
            f"data.default_azimuth_deg={view['azimuth_deg']}", f"data.default_camera_distance={view['distance']}",
            f"data.default_fovy_deg={view['fovy_deg']}"]


def photo_overrides(cameras_json: str, photos: list) -> tuple[list, Optional[str]]:
    """(``images=[...]`` and ``data.reference_cameras`` overrides, the primary photo) for the rendered views
    ``photos`` (indices into the render's views); ([], None) for fewer than two."""
    from lift3d.utils.inputs import read_json_object

    if len(photos) < 2:
        return [], None
    views = read_json_object(cameras_json, "render cameras", "delete its folder to render again", keys=("views",))["views"]
    bad = [i for i in photos if not 0 <= int(i) < len(views)]
    if bad:
        raise UserError(f"--photos {bad[0]} is not a rendered view (the render has views 0..{len(views) - 1})")
    folder = os.path.dirname(cameras_json)
    paths = [os.path.join(folder, views[int(i)]["image"]) for i in photos]
    return [f"images=[{','.join(paths)}]", f"data.reference_cameras={cameras_json}"], paths[0]


def launch_overrides(input_png: str, gt_mesh: str, out_dir: str, config: str) -> list[str]:
    """Where ``launch.py`` puts the object's trial: ``<out_dir>/trial/<config name>/``."""
    return [f"image={input_png}", f"gt={gt_mesh}", f"exp_root_dir={out_dir}", "name=trial",
            f"tag={os.path.splitext(os.path.basename(config))[0]}", "use_timestamp=false"]


def launch_reconstruct(input_png: str, gt_mesh: str, out_dir: str, config: str, overrides: list,
                       fresh: bool = False) -> str:
    """The default reconstruction: ``launch.py --config CONFIG image=.. gt=..`` in this process.

    A checkpoint left by a killed run of the same object is resumed unless ``fresh``.
    """
    from lift3d.runner import run_experiment

    fixed = launch_overrides(input_png, gt_mesh, out_dir, config)
    ckpt = os.path.join(out_dir, "trial", os.path.splitext(os.path.basename(config))[0], "ckpts", "last.ckpt")
    resume = [f"resume={ckpt}"] if os.path.isfile(ckpt) and not fresh else ["resume=null"]
    return run_experiment(config, fixed + resume + list(overrides), "train")


def _reference_view(trial: str) -> Optional[dict]:
    """The run's own score of its export from the input camera (its metrics.json), if it wrote one."""
    metrics = io.read_json_if_any(os.path.join(trial, "metrics.json"))
    return metrics.get("reference_view") if isinstance(metrics, dict) else None


def run_object(task: ObjectTask, reconstruct: Optional[Reconstruct] = None) -> dict:
    """Render, reconstruct, score one object; write and return its result (failures included)."""
    from lift3d.data.gso import mesh_path, render_gso
    from lift3d.evaluation.metrics import evaluate

    if reconstruct is None:
        reconstruct = lambda *a: launch_reconstruct(*a, fresh=task.fresh)  # noqa: E731
    work = os.path.join(task.out, "objects", task.name)
    result = {"object": task.name, "object_dir": os.path.abspath(task.object_dir), "config": task.config,
              "overrides": list(task.overrides), "host": socket.gethostname(), "seconds": {}}
    if task.photos:
        result["photos"] = list(task.photos)
    t_start = time.time()
    stage = "render"
    try:
        gt = mesh_path(task.object_dir)
        render_dir = os.path.join(work, "render")
        t0 = time.time()
        if not os.path.isfile(os.path.join(render_dir, "cameras.json")):     # written last by render_gso
            render_gso(task.object_dir, render_dir, **task.render_options)
        result["seconds"]["render"] = time.time() - t0
        stage = "reconstruct"
        cameras_json = os.path.join(render_dir, "cameras.json")
        overrides = (camera_overrides(cameras_json) if task.camera_overrides else [])
        photos, input_png = photo_overrides(cameras_json, task.photos)
        t0 = time.time()
        trial = reconstruct(input_png or os.path.join(render_dir, "input.png"), gt, work, task.config,
                            overrides + photos + list(task.overrides))
        result["seconds"]["reconstruct"] = time.time() - t0
        result["trial_dir"] = os.path.abspath(trial)
        pred = os.path.join(trial, "export", "model.obj")
        if not os.path.isfile(pred):
            raise UserError(f"the run wrote no mesh at {pred}")
        result["mesh"] = os.path.abspath(pred)
        stage = "evaluate"
        t0 = time.time()
        result["metrics"] = {p: evaluate(pred, gt, p, **task.eval_options) for p in task.protocols}
        result["reference_view"] = _reference_view(trial)
        result["seconds"]["evaluate"] = time.time() - t0
        result["status"] = "ok"
        try:  # a picture that cannot be drawn does not fail the object
            result["compare_image"] = comparison_image(
                gt, pred, os.path.join(render_dir, "cameras.json"), task.compare_path,
                title=compare_title(task.name, task.protocols[0], result["metrics"][task.protocols[0]]))
        except Exception as e:
            log.warning("%s: no comparison image: %s", task.name, e)
            result["compare_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # recorded; the other objects go on
        message = str(e).splitlines()[0] if str(e) else ""
        result.update(status="failed", stage=stage, error=f"{type(e).__name__}: {message}",
                      traceback=traceback.format_exc())
    result["seconds"]["total"] = time.time() - t_start
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    io.write_json(task.result_path, result)
    return result


def _load_result(path: str) -> Optional[dict]:
    """An object's earlier result, or None (none, or a damaged one: the object runs again)."""
    from lift3d.utils.inputs import read_json_object

    try:
        return read_json_object(path, "result") if os.path.lexists(path) else None
    except UserError:
        return None


def run_bench(dataset: str, config: str, out: str, objects: Optional[list] = None, backend: str = "local",
              address: Optional[str] = None, protocols: tuple = ("surface", "syncdreamer"), overrides: tuple = (),
              num_cpus: Optional[float] = None, num_gpus: Optional[float] = None, force: bool = False,
              camera_overrides: bool = True, reconstruct: Optional[Reconstruct] = None,
              render_options: Optional[dict] = None, eval_options: Optional[dict] = None,
              photos: Optional[list] = None) -> dict:
    """Run the benchmark; returns the summary (also written to ``<out>/summary.{json,csv,md}``).

    ``objects``: names (default: every object of ``dataset``). ``force`` re-runs finished objects
    from scratch. Ray requests per task, when None, come from the config: ``num_cpus`` =
    ``trainer.num_threads`` (1 if 0); ``num_gpus`` = 0 for ``trainer.device: cpu``, else 1 when the
    Ray cluster has GPUs.
    ``reconstruct`` replaces the launch.py run (tests, other engines). ``photos``: rendered views (indices, the
    primary first) each run gets as its photos, with their cameras; default: the input view alone.
    """
    from lift3d.data.gso import list_objects
    from lift3d.evaluation.protocols import get_protocol

    if backend not in ("local", "ray"):
        raise UserError(f"unknown backend '{backend}'; use local or ray")
    if not protocols:
        raise UserError("no evaluation protocol given; pass --protocols, e.g. surface,syncdreamer")
    config = resolve_config(config)      # a file, else a packaged config name: as ``lift3d launch``
    for p in protocols:
        get_protocol(p, **(eval_options or {}))
    names = list_objects(dataset, list(objects) if objects else None)
    device, threads = "auto", 0
    if reconstruct is None:
        exp = _check_config(config, list(overrides), camera_overrides)
        device, threads = str(exp.trainer.device), int(exp.trainer.num_threads)
    if num_cpus is None:
        num_cpus = threads or 1
    # Absolute paths: Ray workers do not share the driver's working directory.
    dataset, config, out = os.path.abspath(dataset), os.path.abspath(config), os.path.abspath(out)
    tasks = [ObjectTask(n, os.path.join(dataset, n), out, config, list(overrides), list(protocols),
                        camera_overrides, force, dict(render_options or {}), dict(eval_options or {}),
                        [int(i) for i in photos or []])
             for n in names]
    results = {}
    todo = []
    for task in tasks:
        previous = _load_result(task.result_path)
        if previous and previous.get("status") == "ok" and not force:
            results[task.name] = previous
        else:
            todo.append(task)
    if len(todo) < len(tasks):
        print(f"bench: {len(tasks) - len(todo)} of {len(tasks)} objects already done in {out}; running {len(todo)}",
              file=sys.stderr)

    def done(result: dict) -> None:
        results[result["object"]] = result
        print(f"bench [{len(results)}/{len(tasks)}] {result_line(result, protocols[0])}", file=sys.stderr)
        write_summary(out, [results[t.name] for t in tasks if t.name in results], protocols)

    if backend == "local":
        for task in todo:
            done(run_object(task, reconstruct))
    elif todo:
        _run_ray(todo, address, num_cpus, num_gpus, device, reconstruct, done)
    return write_summary(out, [results[t.name] for t in tasks if t.name in results], protocols)


def _check_config(config: str, overrides: list, with_cameras: bool):
    """Fail before the first object on a bad config key, not once per object; returns the parsed config."""
    from lift3d.config import ExperimentConfig, load_config, parse_config

    cams = ["data.foreground_ratio=null", "data.default_elevation_deg=30"] if with_cameras else []
    return parse_config(ExperimentConfig, load_config(config, launch_overrides("input.png", "gt.obj", "out", config)
                                                      + cams + overrides))


def _run_ray(tasks: list, address: Optional[str], num_cpus: float, num_gpus: Optional[float], device: str,
             reconstruct: Optional[Reconstruct], done: Callable[[dict], None]) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'lift3d[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        kwargs = {"address": address, "include_dashboard": False, "logging_level": logging.WARNING}
        if address is None:
            # Local workers import lift3d from this checkout even when it is not pip-installed.
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        ray.init(**kwargs)
    if num_gpus is None:
        num_gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(run_object)
    pending = {remote.remote(t, reconstruct): t for t in tasks}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as e:  # the worker died (out of memory, crash): record it here
            result = {"object": task.name, "status": "failed", "stage": "ray",
                      "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "seconds": {}}
            io.write_json(task.result_path, result)
        done(result)


# --------------------------------------------------------------------------- summary


def protocol_list(text) -> list:
    """``--protocols``: one or more known protocol names, comma-separated (argparse names the flag)."""
    from lift3d.evaluation.protocols import PROTOCOLS

    if isinstance(text, list):
        return text
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or any(n not in PROTOCOLS for n in names):
        bad = [n for n in names if n not in PROTOCOLS]
        raise argparse.ArgumentTypeError(f"{'unknown protocol ' + repr(bad[0]) if bad else 'no protocol given'}; "
                                         f"give one or more of {', '.join(PROTOCOLS)}, comma-separated")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lift3d bench", description="Reconstruct and score every object of a "
                                "GSO-layout dataset; re-running resumes (finished objects are skipped).",
                                epilog="Extra key=value arguments are config overrides for every object's run.")
    p.add_argument("--dataset", required=True, help="folder of objects laid out as <NAME>/meshes/model.obj")
    p.add_argument("--config", required=True,
                   help="a YAML file, or the name of a packaged config (e.g. oracle), as for 'lift3d launch'")
    p.add_argument("--out", required=True, help="output folder (results/, objects/, summary.*)")
    p.add_argument("--objects", default="", help="comma-separated object names (default: all)")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--protocols", type=protocol_list, default="surface,syncdreamer",
                   help="evaluation protocols, comma-separated (surface, syncdreamer, surface-icp)")
    p.add_argument("--num-cpus", type=number_arg(float, gt=0), default=None,
                   help="CPUs per Ray task (default: the config's trainer.num_threads, or 1)")
    p.add_argument("--num-gpus", type=number_arg(float, ge=0), default=None,
                   help="GPUs per Ray task (default: 1 if the cluster has GPUs and trainer.device is not cpu)")
    p.add_argument("--force", action="store_true", help="re-run objects that already have a result")
    p.add_argument("--no-camera-overrides", action="store_true",
                   help="do not set data.default_* from the rendered input camera")
    p.add_argument("--photos", type=photo_list, default=[],
                   help="rendered views given as the run's photos with their cameras, the first the primary one, "
                        "e.g. 0,8 (the input view and the one opposite; default: the input view alone)")
    return p


def photo_list(text) -> list:
    """``--photos``: view indices, comma-separated (argparse names the flag)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct view indices >= 0, comma-separated (e.g. 0,8), got {text!r}")
    return values


def main(argv: list) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        raise UserError(f"unknown option {bad[0]}; config overrides are written key=value")
    summary = run_bench(args.dataset, args.config, args.out,
                        objects=[o for o in args.objects.split(",") if o] or None, backend=args.backend,
                        address=args.address, protocols=tuple(protocol_list(args.protocols)),
                        overrides=tuple(overrides), num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                        force=args.force, camera_overrides=not args.no_camera_overrides, photos=args.photos)
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read(), end="")
    return 0 if summary["n_failed"] == 0 else 1
