"""The losses of the first steps of every shipped config, at small sizes, against numbers recorded
before the guidance/system refactor (issue 12): a refactor must not change what a run computes.

Re-record (only when a change is *meant* to alter the numbers, and say why in the commit):
    python tests/test_step_losses.py
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "tests", "data", "step_losses.json")
STEPS = 5
CONFIGS = ("zero123-sjc-cpu", "zero123-sjc", "zero123-sds", "stable-zero123", "cascade-zero123", "oracle",
           "zero123-gs-cpu", "dreamgaussian-zero123", "zero123-vsd-cpu")

COMMON = [f"trainer.max_steps={STEPS}", "trainer.val_every=0", "trainer.ckpt_every=0", "trainer.device=cpu",
          "trainer.num_threads=1", "use_timestamp=false", "image=examples/mushroom_rgba.png",
          "data.reference_height=64", "data.reference_width=64", "data.n_val_views=1", "data.n_test_views=1",
          "data.eval_height=16", "data.eval_width=16"]
VOLUME = ["system.renderer.num_samples_per_ray=16"]
# 3D Gaussians: 200 of them, densified at steps 2 and 4 (the record covers clone/split/prune).
GAUSSIANS = ["system.geometry.num_points=200", "system.geometry.densify_from=2", "system.geometry.densify_every=2"]
SMALL = {
    # RGB fields scored by a 64-px tiny model: 16 px random views.
    "zero123-sjc-cpu": VOLUME + ["data.height=16", "data.width=16", "system.geometry.grid_size=16"],
    # 3drec: a latent field rendered at the tiny model's 8x8 latent size (reference 64 px -> 8x8).
    "zero123-sjc": VOLUME + ["data.height=8", "data.width=8", "system.geometry.grid_size=16"],
    # 3drec scored by the refiner (cascade-zero123.yaml is the published-size recipe since issue 13).
    "cascade-zero123": VOLUME + ["data.height=8", "data.width=8", "system.geometry.grid_size=16",
                        "system.guidance.prompt_steps=2", "system.guidance.prompt_cache_dir=none"],
    # threestudio's milestones, shrunk: 8 -> 16 -> 16 px at steps 2 and 4.
    "zero123-sds": VOLUME + ["data.resolution_milestones=[2,4]", "data.height=[8,16,16]", "data.width=[8,16,16]",
                    "data.batch_size=[2,1,1]", "system.geometry.n_levels=4", "system.geometry.log2_hashmap_size=12"],
    "stable-zero123": VOLUME + ["data.resolution_milestones=[2,4]", "data.height=[8,16,16]", "data.width=[8,16,16]",
                       "data.batch_size=[2,1,1]", "system.geometry.n_levels=4", "system.geometry.log2_hashmap_size=12"],
    "oracle": VOLUME + ["data.height=16", "data.width=16", "system.geometry.grid_size=16", "gt=examples/objects/mushroom/meshes/model.obj"],
    "zero123-gs-cpu": ["data.height=16", "data.width=16"] + GAUSSIANS,
    # DreamGaussian's ramp 128 -> 256 -> 512, shrunk to 8 -> 16 -> 16 px at steps 2 and 4.
    "dreamgaussian-zero123": ["data.resolution_milestones=[2,4]", "data.height=[8,16,16]", "data.width=[8,16,16]"]
    + GAUSSIANS,
    # The main job with VSD: the LoRA's loss is recorded too (loss_lora).
    "zero123-vsd-cpu": VOLUME + ["data.height=16", "data.width=16", "system.geometry.grid_size=16"],
}
# Where a config names its model, when not system.guidance.pretrained_model_name_or_path (a prior block).
MODEL_KEY = {"zero123-vsd-cpu": "system.guidance.prior.pretrained_model_name_or_path"}


def make_models(folder: str) -> dict:
    """Tiny random base and refiner folders (the same every time: fixed seeds)."""
    from lift3d.zero123.cascade import CascadeLayout
    from lift3d.zero123.random_model import random_zero123

    base, refiner = os.path.join(folder, "base"), os.path.join(folder, "refiner")
    if not os.path.isdir(refiner):
        random_zero123("tiny", seed=1).save_pretrained(base)
        random_zero123("tiny", seed=2).save_pretrained(refiner)
        CascadeLayout(nearby=[[0, 45, 0], [0, -45, 0], [30, 0, 0]], base_model=base).save(refiner)
    return {"base": base, "refiner": refiner}


def step_losses(name: str, folder: str) -> list:
    """Train ``STEPS`` steps of configs/NAME.yaml at small size; the loss terms of every step."""
    import torch

    from lift3d.config import load_config
    from lift3d.runner import Experiment

    models = make_models(folder)
    extra = []
    if name not in ("oracle",):
        extra.append(f"{MODEL_KEY.get(name, 'system.guidance.pretrained_model_name_or_path')}={models['base']}")
    if name == "cascade-zero123":
        extra.append(f"system.guidance.refiner_name_or_path={models['refiner']}")
    threads = torch.get_num_threads()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(os.path.join("configs", f"{name}.yaml"),
                          COMMON + SMALL[name] + extra + [f"exp_root_dir={os.path.join(folder, 'out')}"])
        exp = Experiment(cfg)
        records = []
        real = exp.system.training_step

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            records.append({k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items() if k.startswith("loss")})
            return out

        exp.system.training_step = spy
        exp.train()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return records


@pytest.mark.parametrize("name", CONFIGS)
def test_first_steps_match_the_record(name, tmp_path_factory):
    with open(RECORD) as f:
        expected = json.load(f)[name]
    got = step_losses(name, str(tmp_path_factory.getbasetemp() / "step_losses"))
    assert len(got) == len(expected) == STEPS
    for step, (g, e) in enumerate(zip(got, expected)):
        assert sorted(g) == sorted(e), (name, step)
        for key in e:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), (name, step, key)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = {name: step_losses(name, tmp) for name in (sys.argv[1:] or CONFIGS)}
    old = json.load(open(RECORD)) if os.path.isfile(RECORD) else {}
    old.update(record)
    with open(RECORD, "w") as f:
        json.dump(old, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(record, indent=1))
