"""Issue 26's fault cases of numbers, files and outputs (scripts/fault_pass.py runs them; see tests/faultcases.py):
every number checked where it is declared (config fields and subcommand flags), every file read through the
project's loaders (a path that is not a regular file named for what it is), outputs that are valid (finite
scores, JSON without NaN, a finished run not failed by its terminal). ``ISSUE_CASES`` are the issue's own
examples, ``MORE_CASES`` the classes they stand for, tried further."""

from __future__ import annotations

import os
import shutil

from faultcases import (COPY, LOCK, NVS, ROOT, TINY, Case, L, copy_trial, evil_pickle, no_trial_folder,
                        not_pwned, obj_file, random_bytes, write)

MINI = os.path.join(ROOT, "lift3d", "assets", "zero123-mini")
NVS_BASE = [*NVS[:3], "--image", "{img}", *NVS[3:]]           # nvs of the mini model on the disc, 2 steps
RENDER = ["render-gso", "--object", "{pkg}/examples/objects/car", "--out", "{dir}/r", "--resolution", "8",
          "--views", "1"]
EVAL = ["eval", "--gt", "{pkg}/examples/objects/car", "--protocol", "surface", "--pred"]
# The tiny run on 3D Gaussians (a config of its own: switching plugin types by overrides logs what it drops).
GS_TINY = (TINY.replace("geometry_type: voxel-rf", "geometry_type: gaussians\n  renderer_type: gaussian-splatting")
           .replace("geometry: {grid_size: 16, radius: 0.6}", "geometry: {num_points: 200, radius: 0.6}")
           .replace("renderer: {num_samples_per_ray: 16, use_occupancy_grid: false}", "renderer: {tile_size: 16}"))
GS = ["launch", "--config", "{dir}/gs.yaml", "image={img}", "{out}"]
GS_SETUP = write("gs.yaml", GS_TINY)
TZ = ["train-zero123", "--out", "{dir}/run"]
TC = ["train-cascade", "--data", "{dir}/data", "--out", "{dir}/run"]
SJC = ["launch", "--config", "zero123-sjc-cpu", "image={img}", "{out}", "data.default_elevation_deg=30"]
TETRA = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
TETRA_FACES = [(1, 2, 3), (1, 2, 4), (1, 3, 4), (2, 3, 4)]


# --------------------------------------------------------------------------- setups and checks


def fifo(rel: str):
    def setup(ws, d):
        os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
        os.mkfifo(os.path.join(d, rel))
    return setup


def link_loop(rel: str):
    def setup(ws, d):
        os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
        os.symlink(os.path.join(d, rel), os.path.join(d, rel))
    return setup


def folder(rel: str):
    return lambda ws, d: os.makedirs(os.path.join(d, rel))


def tetra(rel: str, offset: float = 0.0, scale: float = 1.0):
    return obj_file(rel, [tuple(offset + scale * c for c in v) for v in TETRA], TETRA_FACES)


def nan_checkpoint(ws, d):
    """The finished trial, copied, its checkpoint's first weight set to NaN (a run that had diverged)."""
    import torch

    copy_trial(ws, d)
    path = os.path.join(d, "trial", "ckpts", "last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["system"].items() if torch.is_tensor(v) and v.is_floating_point())
    ckpt["system"][name] = torch.full_like(ckpt["system"][name], float("nan"))
    torch.save(ckpt, path)


def loose_checkpoint(ws, d):
    os.makedirs(os.path.join(d, "loose"))
    shutil.copy(os.path.join(ws.trial, "ckpts", "last.ckpt"), os.path.join(d, "loose", "last.ckpt"))


def export_in_its_own_trial(ws, d):
    if os.path.exists(os.path.join(d, "export")):
        return f"wrote export/ into {d}, the checkpoint's grandparent folder"
    if not os.path.isfile(os.path.join(d, "out", "tiny", "t", "export", "model.obj")):
        return "no export in the trial folder exp_root_dir/name/tag names"
    return None


def broken_vae_config(ws, d):
    """$LIFT3D_MODELS/zero123: the mini model with a cut-off vae/config.json."""
    model = os.path.join(d, "models", "zero123")
    os.makedirs(os.path.join(model, "vae"))
    for name in os.listdir(MINI):
        if name != "vae":
            os.symlink(os.path.join(MINI, name), os.path.join(model, name))
    os.symlink(os.path.join(MINI, "vae", "diffusion_pytorch_model.safetensors"),
               os.path.join(model, "vae", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(model, "vae", "config.json"), "w") as f:
        f.write('{"block_out_channels": [64, 128')


def plain_refiner(ws, d):
    """A Zero123 folder without cascade.json given as the refiner (links to the mini model)."""
    os.makedirs(os.path.join(d, "plain"))
    for name in os.listdir(MINI):
        os.symlink(os.path.join(MINI, name), os.path.join(d, "plain", name))


def broken_cascade_json(ws, d):
    plain_refiner(ws, d)
    with open(os.path.join(d, "plain", "cascade.json"), "w") as f:
        f.write('{"nearby": [[0, 45, 0], [0, -45')


def run_folder_with(setup):
    """A train-zero123 run folder whose checkpoint ``setup`` writes."""
    def inner(ws, d):
        os.makedirs(os.path.join(d, "run", "ckpts"), exist_ok=True)
        setup(ws, d)
    return inner


def lift3d_ckpt_as_run(ws, d):
    """A lift3d launch checkpoint where train-zero123 --export-only expects its own."""
    os.makedirs(os.path.join(d, "run", "ckpts"))
    shutil.copy(os.path.join(ws.trial, "ckpts", "last.ckpt"), os.path.join(d, "run", "ckpts", "last.ckpt"))


def finished(rel_trial: str):
    """The run went to its end: a checkpoint at step 4 and the lock released."""
    def check(ws, d):
        trial = os.path.join(d, rel_trial)
        if os.path.exists(os.path.join(trial, LOCK)):
            return "the lock was left behind"
        if not os.path.isfile(os.path.join(trial, "export", "model.obj")):
            return f"the run did not finish: no {trial}/export/model.obj"
        return None
    return check


def nan_ckpt_untouched(ws, d):
    from faultcases import ckpt_problem

    problem = ckpt_problem(os.path.join(d, "trial", "ckpts", "last.ckpt"))
    return None if problem and "non-finite" in problem else "the NaN checkpoint was replaced"


def info_next_to_mesh(ws, d):
    tetra("m/model.obj", -0.25, 0.5)(ws, d)
    write("m/input_view.png", b"\x89PNG")(ws, d)
    write("m/model_info.json", '{"reference_camera": {"elevation_deg": 30,')(ws, d)


ASCII_TERMINAL = """
sys.stdout.reconfigure(encoding="ascii")
sys.stderr.reconfigure(encoding="ascii")
"""
STDOUT_CLOSED = """
import os
_r, _w = os.pipe()
os.close(_r)
os.dup2(_w, 1)
"""
MODELS_HERE = """
import logging, os
os.environ["LIFT3D_MODELS"] = "{dir}/models"
logging.getLogger("lift3d").setLevel(logging.ERROR)   # not the recipe's lines (weights found, elevation assumed)
"""

# --------------------------------------------------------------------------- the issue's examples

ISSUE_CASES = [
    # numbers no one checked
    Case("betas=[0.9]", L + ["system.optimizer.betas=[0.9]"], message="system.optimizer.betas", check=no_trial_folder),
    Case("betas=[2,3]", L + ["system.optimizer.betas=[2,3]"], message="system.optimizer.betas"),
    Case("optimizer eps=-1", L + ["system.optimizer.eps=-1"], message="system.optimizer.eps"),
    Case("seed=-1", L + ["seed=-1"], message="seed", check=no_trial_folder),
    Case("seed=99999999999999", L + ["seed=99999999999999"], message="seed"),
    Case("min_component_fraction=2 (before training)", L + ["system.export.min_component_fraction=2"],
         message="system.export.min_component_fraction", check=no_trial_folder),
    Case("train-zero123 --threads 0", TZ + ["--data", "{dir}", "--threads", "0"], message="--threads"),
    Case("nvs --steps 5000", NVS_BASE[:-6] + ["--steps", "5000"], message="--steps"),
    Case("nvs --scale 1e30", NVS_BASE + ["--scale", "1e30"], message="--scale",
         check=lambda ws, d: "wrote black views" if os.path.exists(os.path.join(d, "nvs", "view_00.png")) else None),
    Case("bench --protocols ''", ["bench", "--dataset", "{pkg}/examples/objects", "--config", "{tiny}", "--out",
                                  "{dir}/bench", "--protocols", ""], message="--protocols"),
    # files read without the project's loaders
    Case("train-zero123 --export-only: random bytes as last.ckpt", TZ + ["--export-only"], message="last.ckpt",
         setup=run_folder_with(random_bytes("run/ckpts/last.ckpt"))),
    Case("train-zero123 --export-only: a pickle that runs code", TZ + ["--export-only"], message="refusing",
         setup=run_folder_with(evil_pickle("run/ckpts/last.ckpt", torch_format=True)), check=not_pwned),
    Case("broken vae/config.json under $LIFT3D_MODELS (pre-flight)",
         ["launch", "--config", "zero123-sjc", "image={img}", "{out}", "trainer.device=cpu"], message="config.json",
         avoid="Traceback", setup=broken_vae_config, prelude=MODELS_HERE, check=no_trial_folder),
    # outputs
    Case("eval: mesh far outside the frame", EVAL + ["{dir}/far.obj"], message="frame",
         setup=tetra("far.obj", 1000.0)),
    Case("nvs --refiner without cascade.json", NVS_BASE + ["--refiner", "{dir}/plain"], message="cascade.json",
         setup=plain_refiner, timeout=60),
    Case("data.fovy_range=[0,0]", L + ["data.fovy_range=[0,0]"], message="data.fovy_range"),
    Case("data.camera_distance_range=[0,0]", L + ["data.camera_distance_range=[0,0]"],
         message="data.camera_distance_range"),
    Case("render-gso --distance 0", RENDER + ["--distance", "0"], message="--distance",
         check=lambda ws, d: "rendered" if os.path.exists(os.path.join(d, "r")) else None),
    Case("render-gso --fovy 0", RENDER + ["--fovy", "0"], message="--fovy"),
    Case("render-gso --distance -1", RENDER + ["--distance", "-1"], message="--distance"),
    Case("render-gso --fovy 180", RENDER + ["--fovy", "180"], message="--fovy"),
    Case("render-gso --elevation nan", RENDER + ["--elevation", "nan"], message="--elevation"),
    # misleading lines
    Case("NaN checkpoint as resume=", ["launch", "--config", "{copy}/configs/parsed.yaml", f"resume={COPY}",
                                       "trainer.max_steps=8"], message="not finite", avoid="learning rate",
         setup=nan_checkpoint, check=nan_ckpt_untouched),
    Case("a FIFO as the image", L[:3] + ["image={dir}/pipe.png", "{out}"], message="FIFO", avoid="not found",
         setup=fifo("pipe.png"), timeout=60),
    Case("a symlink loop as the image", L[:3] + ["image={dir}/loop.png", "{out}"], message="loop", avoid="not found",
         setup=link_loop("loop.png")),
    Case("a directory as --config", ["launch", "--config", "{dir}"], message="directory", avoid="not found"),
    Case("empty image=", L[:3] + ["image=", "{out}"], message="image=", avoid="Incompatible"),
    Case("trainer=5", L + ["trainer=5"], message="trainer.max_steps"),
    Case("memory bomb through data.reference_height", L + ["data.reference_height=300000",
                                                           "data.reference_width=300000"],
         message="data.reference_height", avoid="data.height/", check=no_trial_folder),
    Case("--export resume= a checkpoint copied out of its trial",
         ["launch", "--config", "{trial}/configs/parsed.yaml", "--export", "resume={dir}/loose/last.ckpt",
          "exp_root_dir={dir}/out"], expect=0, setup=loose_checkpoint, check=export_in_its_own_trial),
    # a run that finished stays a success
    Case("ASCII-only terminal (non-ASCII trial path)", ["launch", "--config", "{tiny}", "image={img}",
                                                        "exp_root_dir={dir}/caf\u00e9"], expect=0,
         prelude=ASCII_TERMINAL, check=finished("caf\u00e9/tiny/t")),
    Case("stdout closed by its reader", L, expect=0, prelude=STDOUT_CLOSED, check=finished("out/tiny/t")),
]

# --------------------------------------------------------------------------- the classes, tried further

MORE_CASES = [
    # config fields
    Case("optimizer weight_decay=-1", L + ["system.optimizer.weight_decay=-1"], message="weight_decay"),
    Case("data.uniform_sphere_fraction=1.5", L + ["data.uniform_sphere_fraction=1.5"],
         message="uniform_sphere_fraction"),
    Case("data.default_fovy_deg=180", L + ["data.default_fovy_deg=180"], message="default_fovy_deg"),
    Case("data.elevation_range=[-100,10]", L + ["data.elevation_range=[-100,10]"], message="elevation_range"),
    Case("data.azimuth_range=[0]", L + ["data.azimuth_range=[0]"], message="azimuth_range"),
    Case("data.resolution_milestones=[300,100]", L + ["data.resolution_milestones=[300,100]",
                                                      "data.height=[16,16,16]"], message="resolution_milestones"),
    Case("negative loss weight", L + ["system.loss.lambda_rgb=-1"], message="lambda_rgb"),
    Case("schedule with a negative value", L + ["system.loss.lambda_mask=[0,1.0,-1.0,100]"], message="lambda_mask"),
    Case("renderer occ_ema_decay=1.5", L + ["system.renderer.occ_ema_decay=1.5"], message="occ_ema_decay"),
    Case("renderer near_plane=-1", L + ["system.renderer.near_plane=-1"], message="near_plane"),
    Case("trainer.log_every=-1", L + ["trainer.log_every=-1"], message="trainer.log_every"),
    Case("trainer.num_threads=100000", L + ["trainer.num_threads=100000"], message="num_threads"),
    Case("export level=bogus (before training)", L + ["system.export.level=bogus"], message="system.export.level",
         check=no_trial_folder),
    Case("export texture_size=8 (before training)", L + ["system.export.texture_size=8"], message="texture_size",
         check=no_trial_folder),
    Case("learned background envmap_size=[0,8]", L + ["system.background_type=learned",
                                                      "system.background.envmap_size=[0,8]"], message="envmap_size"),
    Case("gaussians prune_opacity=1", GS + ["system.geometry.prune_opacity=1"], message="prune_opacity",
         setup=GS_SETUP),
    Case("gaussians densify_grad_threshold=-0.1", GS + ["system.geometry.densify_grad_threshold=-0.1"],
         message="densify_grad_threshold", setup=GS_SETUP),
    Case("gaussians extent=0", GS + ["system.geometry.extent=0"], message="system.geometry.extent", setup=GS_SETUP),
    Case("gaussians position_lr=0", GS + ["system.geometry.position_lr=0"], message="position_lr", setup=GS_SETUP),
    Case("gaussians init_radius beyond radius", GS + ["system.geometry.init_radius=2"], message="init_radius",
         setup=GS_SETUP),
    Case("gaussian-splatting tile_size=0", GS + ["system.renderer.tile_size=0"], message="tile_size", setup=GS_SETUP),
    Case("gaussian-splatting eps2d=-1", GS + ["system.renderer.eps2d=-1"], message="eps2d", setup=GS_SETUP),
    Case("guidance min_step_percent=1.5", SJC + ["system.guidance.min_step_percent=1.5"],
         message="min_step_percent"),
    Case("guidance guidance_scale=-3", SJC + ["system.guidance.guidance_scale=-3"], message="guidance_scale"),
    Case("memory bomb through data.eval_height (turntable)", L + ["data.eval_height=200000",
                                                                  "data.eval_width=200000"],
         message="data.eval_height", check=no_trial_folder),
    # subcommand flags
    Case("nvs --eta -1", NVS_BASE[:-6] + ["--eta", "-1"], message="--eta"),
    Case("nvs --seed -1", NVS_BASE[:-6] + ["--seed", "-1"], message="--seed"),
    Case("nvs --condition-elevation 100", NVS_BASE[:-6] + ["--condition-elevation", "100"],
         message="--condition-elevation"),
    Case("render-gso --resolution 100000", RENDER[:5] + ["--resolution", "100000"], message="--resolution"),
    Case("bench --num-gpus -1", ["bench", "--dataset", "{pkg}/examples/objects", "--config", "{tiny}", "--out",
                                 "{dir}/bench", "--num-gpus", "-1"], message="--num-gpus"),
    Case("bench --protocols bogus", ["bench", "--dataset", "{pkg}/examples/objects", "--config", "{tiny}", "--out",
                                     "{dir}/bench", "--protocols", "surface,bogus"], message="bogus"),
    Case("train-cascade --momentum 2", TC + ["--momentum", "2"], message="--momentum"),
    Case("train-cascade --coarse-prob -0.5", TC + ["--coarse-prob", "-0.5"], message="--coarse-prob"),
    Case("train-zero123 --ema-decay 1.5", TZ + ["--data", "{dir}", "--ema-decay", "1.5"], message="--ema-decay"),
    Case("train-zero123 --ckpt-every 0", TZ + ["--data", "{dir}", "--ckpt-every", "0"], message="--ckpt-every"),
    Case("eval --gt-rotation-deg inf", EVAL + ["{pkg}/examples/objects/car", "--gt-rotation-deg", "inf"],
         message="--gt-rotation-deg"),
    # files: what a path is, and every reader
    Case("a FIFO as resume=", L + ["resume={dir}/pipe.ckpt"], message="FIFO", setup=fifo("pipe.ckpt"), timeout=60),
    Case("a FIFO as --config", ["launch", "--config", "{dir}/pipe.yaml"], message="FIFO", setup=fifo("pipe.yaml"),
         timeout=60),
    Case("a broken symlink as the image", L[:3] + ["image={dir}/gone.png", "{out}"], message="broken symbolic link",
         setup=lambda ws, d: os.symlink(os.path.join(d, "nowhere.png"), os.path.join(d, "gone.png"))),
    Case("gt= a folder without a mesh", L + ["gt={dir}/nomesh"], message="directory", setup=folder("nomesh"),
         check=no_trial_folder),
    Case("eval --pred a symlink loop", EVAL + ["{dir}/loop.obj"], message="loop", setup=link_loop("loop.obj")),
    Case("nvs --model a FIFO", ["nvs", "--model", "{dir}/pipe", "--image", "{img}", "--elevation", "0",
                                "--azimuth", "30", "--out", "{dir}/nvs"], message="FIFO", setup=fifo("pipe"),
         timeout=60),
    Case("train-zero123 --resume: last.ckpt is a directory", TZ + ["--data", "{dir}/data", "--resume"],
         message="directory", setup=lambda ws, d: (os.makedirs(os.path.join(d, "run", "ckpts", "last.ckpt")),
                                                   write("data/split.json", '{"train": ["a"]}')(ws, d))),
    Case("train-zero123 --export-only: a lift3d launch checkpoint", TZ + ["--export-only"],
         message="not a checkpoint of this command", setup=lift3d_ckpt_as_run),
    Case("train-zero123: split.json cut off", TZ + ["--data", "{dir}/data"], message="split.json",
         setup=write("data/split.json", '{"train": ["a", ')),
    Case("nvs --refiner with a cut-off cascade.json", NVS_BASE + ["--refiner", "{dir}/plain"],
         message="cascade.json", setup=broken_cascade_json, timeout=60),
    Case("eval: cut-off model_info.json next to the mesh", EVAL + ["{dir}/m/model.obj"], message="model_info.json",
         setup=info_next_to_mesh),
    Case("eval: coordinates of 1e200", EVAL + ["{dir}/huge.obj"], message="coordinates",
         setup=tetra("huge.obj", 1e200, 1e200)),
    Case("eval: mesh partly outside the grid is scored", ["eval", "--gt", "{dir}/gt.obj", "--pred", "{dir}/wide.obj"],
         expect=0, setup=lambda ws, d: (tetra("wide.obj", -0.5, 2.0)(ws, d), tetra("gt.obj", -0.3, 0.6)(ws, d))),
]
for _case in ISSUE_CASES + MORE_CASES:
    _case.listed = False
INPUT_CASES = ISSUE_CASES + MORE_CASES
