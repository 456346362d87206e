"""The ``lift3d`` command line (also ``python -m lift3d``). ``launch.py`` is ``lift3d launch``.

Every user error ends as one line on stderr and a non-zero exit code; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Callable, Optional

from lift3d.errors import UserError


LAUNCH_EPILOG = """\
Extra arguments are config overrides, key=value (no dashes). Shorthands:
  image=PATH                 the input image (data.image_path)
  images=[A,B,...]           several photos of the object, the first the primary one (data.image_paths), with
                             data.reference_cameras=[[ELEV,AZIM],...] or a JSON file (render-gso's cameras.json)
  gt=PATH                    a ground-truth mesh (data.gt_mesh): metrics.json after export
  resume=CKPT                continue from <trial>/ckpts/last.ckpt; with --test/--export, the model to use
  exp_root_dir=DIR name=N tag=T use_timestamp=false
                             the trial folder: DIR/N/T[@timestamp]/
  any config key             e.g. trainer.max_steps=100 system.loss.lambda_rgb=100
A file shipped in the package: image='${pkg:examples/car_rgba.png}'.

packaged configs (--config NAME; 'lift3d configs' describes them):
  %s
"""


def _config_names() -> str:
    from lift3d.config import packaged_configs

    return ", ".join(packaged_configs()) or "(none found)"


def _launch(argv: list[str], prog: str = "lift3d launch") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Run a lift3d reconstruction.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=LAUNCH_EPILOG % _config_names())
    p.add_argument("--config", required=True, metavar="CONFIG",
                   help="a YAML file, or the name of a packaged config (e.g. zero123-sjc-cpu); a file that exists wins")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_const", dest="mode", const="train", help="train (default)")
    mode.add_argument("--test", action="store_const", dest="mode", const="test", help="render a turntable of resume=CKPT")
    mode.add_argument("--export", action="store_const", dest="mode", const="export", help="export the mesh of resume=CKPT")
    p.add_argument("--verbose", action="store_true")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        raise UserError(f"unknown option {unknown[0]}; overrides are written key=value without dashes")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from lift3d.config import resolve_config

    config = resolve_config(args.config)       # a bad name fails here, before torch is imported
    from lift3d.runner import run_experiment

    trial = run_experiment(config, overrides, args.mode or "train")
    print(f"trial folder: {trial}")
    return 0


def _configs(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lift3d configs",
                                description="List the packaged configs (use one with 'lift3d launch --config NAME').")
    p.add_argument("--path", action="store_true", help="print each config's file path instead of its description")
    args = p.parse_args(argv)
    from lift3d.config import config_summary, packaged_configs

    configs = packaged_configs()
    width = max((len(n) for n in configs), default=0)
    for name, path in configs.items():
        print(f"{name:<{width}}  {path if args.path else config_summary(path)}")
    return 0


def _eval(argv: list[str]) -> int:
    from lift3d.config import number_arg

    p = argparse.ArgumentParser(prog="lift3d eval", description="Score a mesh against a ground-truth mesh.")
    p.add_argument("--pred", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--protocol", default="surface", help="surface, syncdreamer or surface-icp")
    turn = p.add_mutually_exclusive_group()
    turn.add_argument("--syncdreamer-object", metavar="NAME",
                      help="turn the ground truth by SyncDreamer's angle for this object of its GSO set (e.g. sofa): "
                      "for a reconstruction from SyncDreamer's published renders")
    turn.add_argument("--gt-rotation-deg", type=number_arg(float), default=0.0, metavar="DEG",
                      help="an angle in SyncDreamer's convention: the normalised ground truth turns by -DEG about z")
    args = p.parse_args(argv)
    from lift3d.evaluation.metrics import check_finite, evaluate
    from lift3d.evaluation.protocols import syncdreamer_gt_angle

    angle = syncdreamer_gt_angle(args.syncdreamer_object) if args.syncdreamer_object else args.gt_rotation_deg
    from lift3d.evaluation.appearance import export_reference_view

    result = evaluate(args.pred, args.gt, protocol=args.protocol, gt_rotation_deg=angle)
    result["gt_rotation"]["syncdreamer_object"] = args.syncdreamer_object
    reference = export_reference_view(args.pred)     # a lift3d export: also scored from its input camera
    if reference is not None:
        result["reference_view"] = reference
    print(json.dumps(check_finite(result), indent=2, sort_keys=True, allow_nan=False))   # JSON holds no NaN
    return 0


# Subcommands that live next to the code they drive: "module:function", imported on use.
# Each function takes the argument list and returns an exit code.
COMMANDS: dict[str, object] = {
    "launch": _launch,
    "configs": _configs,
    "eval": _eval,
    "bench": "lift3d.bench:main",
    "render-gso": "lift3d.data.gso:render_main",
    "nvs": "lift3d.zero123.nvs:main",
    "convert-ckpt": "lift3d.zero123.convert_ckpt:main",
    "train-zero123": "lift3d.training.train_zero123:main",
    "train-cascade": "lift3d.training.train_cascade:train_cascade",
}


def _resolve(command) -> Callable[[list[str]], int]:
    if callable(command):
        return command
    import importlib

    module, name = command.split(":")
    return getattr(importlib.import_module(module), name)


def run(fn: Callable[[list[str]], int], argv: list[str]) -> int:
    """Call a subcommand, turning user errors into one line on stderr."""
    from lift3d.runner import Interrupted

    try:
        return fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM/SIGHUP (lift3d.utils.interrupts.Stopped): 128 + the signal
        print(str(e) or "interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except MemoryError as e:   # the pre-flight estimate (lift3d/preflight.py) was too low
        return _out_of_memory(e)
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError ("CUDA out of memory" in older torch)
        if not re.search(r"can't allocate memory|out of memory", str(e), re.IGNORECASE):
            raise
        return _out_of_memory(e)
    except OSError as e:       # a full disk, a read-only or vanished folder: what the system said, on one line
        name = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot access{name}: {e.strerror or _first_line(e)}", file=sys.stderr)
        return 2


def _out_of_memory(e: BaseException) -> int:
    where = "GPU" if "CUDA" in str(e) or "MPS" in str(e) else "CPU"
    print(f"error: out of {where} memory ({_first_line(e)}); lower data.height/width, data.batch_size, "
          "data.reference_height/width, system.renderer.train_chunk_samples or system.guidance.encode_chunk",
          file=sys.stderr)
    return 2


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def version() -> str:
    """The installed distribution's version, else the source tree's ``lift3d.__version__``."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("lift3d")
    except PackageNotFoundError:
        import lift3d

        return lift3d.__version__


class _TolerantStdout:
    """``sys.stdout`` for the command line's own process: what a command prints after its work is done (the
    paths of a finished run, a JSON result) is a report, so a reader that went away (``| head``, a closed pipe)
    does not turn the run into a failure: the rest goes to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())       # Python flushes stdout again at exit
            os.close(devnull)
            return None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tolerant_output() -> None:
    """Make this process's output unable to fail a command that did its work: characters the terminal's
    encoding lacks (LANG=C, PYTHONIOENCODING=ascii) are written as escapes, and a closed stdout is ignored."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):       # None (a closed descriptor) or not a text stream
            pass
    if sys.stdout is not None and not isinstance(sys.stdout, _TolerantStdout):
        sys.stdout = _TolerantStdout(sys.stdout)


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:            # the process's own command line (tests pass argv and keep their streams)
        tolerant_output()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"lift3d {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'; commands: {names}", file=sys.stderr)
            return 2
        print(f"usage: lift3d [--version] COMMAND [options]\ncommands: {names}\n"
              "run 'lift3d COMMAND --help' for a command's options; 'lift3d configs' lists the packaged configs")
        return 0
    return run(_resolve(COMMANDS[argv[0]]), argv[1:])


def launch_main() -> None:
    """``launch.py``: ``lift3d launch`` under its historical name."""
    tolerant_output()
    sys.exit(run(lambda argv: _launch(argv, prog="launch.py"), sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
