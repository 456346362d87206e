"""3D Gaussians (lift3d/geometry/gaussians.py) and their renderer (lift3d/renderers/gaussian_splatting.py):
the density grid against the all-pairs field, densify/split/prune and the opacity reset against a real Adam's
state, training and resuming through the runner with a changing count, and the config errors and memory
estimate of the pair."""

import math

import pytest
import torch

from lift3d.config import load_config
from lift3d.errors import ConfigError
from lift3d.geometry.gaussians import PARAMETERS, STATISTICS, Gaussians
from lift3d.plugin import OptimizerOps, StepContext
from lift3d.runner import Experiment, load_checkpoint


def gaussians(n: int, seed: int = 0, **cfg) -> Gaussians:
    torch.manual_seed(seed)
    return Gaussians({"num_points": n, "radius": 0.6, **cfg})


def adam_after_two_steps(g: Gaussians) -> torch.optim.Adam:
    """An Adam over the geometry's groups that has taken two steps (every moment non-zero), with the
    second step's gradients still on the parameters, as in after_backward."""
    opt = torch.optim.Adam(g.param_groups(0.01), eps=1e-15)
    weights = {name: torch.randn_like(getattr(g, name)) for name in PARAMETERS}
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        sum((getattr(g, name) * w).sum() + getattr(g, name).pow(2).sum() for name, w in weights.items()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    sum((getattr(g, name) * w).sum() for name, w in weights.items()).backward()
    return opt


def optimiser_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


# --------------------------------------------------------------------------- the field


@pytest.mark.parametrize("resolution", [24, 32])
def test_density_grid_equals_the_all_pairs_field_on_the_cell_centres(resolution):
    g = gaussians(150, seed=3)
    with torch.no_grad():
        g.log_scales.copy_(math.log(0.03) + 0.5 * torch.randn(150, 3))   # anisotropic ...
        g.quats.copy_(torch.randn(150, 4))                                # ... and rotated
        g.opacity_logits.uniform_(-2.0, 2.0)
        g.log_scales[:3] += 3.0                  # windows over a quarter of the grid: the 'huge' path
    R = resolution
    cell = 2 * g.cfg.radius / R
    # The window sizes density_grid picks (3 standard deviations along the widest world axis, bucketed).
    widest = torch.sqrt(torch.diagonal(torch.linalg.inv(g.inverse_covariances()), dim1=-2, dim2=-1).amax(-1))
    half = torch.ceil(3 * widest / cell).clamp(min=1)
    bucket = torch.ceil(1.125 ** torch.ceil(torch.log(half) / math.log(1.125)))
    huge = bucket > R // 4
    assert huge[:3].all() and (~huge).sum() > 100 and len(torch.unique(bucket[~huge])) > 2   # both paths, many sizes
    assert (g.scales.amax(-1) > 2 * g.scales.amin(-1)).sum() > 50                              # anisotropic

    grid = g.density_grid(R)
    with torch.no_grad():
        ref = g(g.grid_points(R).reshape(-1, 3))["density"].reshape(R, R, R)
        # Each Gaussian is added over its window only: past it (>= bucket + 1/2 cells from the mean along some
        # axis) it is below o exp(-d^2 / 2 Sigma_max), so what is cut off sums to at most `tail` at any cell.
        tail = torch.where(huge, 0.0, g.opacities * torch.exp(-0.5 * ((bucket + 0.5) * cell / widest) ** 2)).sum()
    assert grid.shape == (R, R, R) and ref.max() > 2.0 and tail < 3e-3 * ref.max()
    assert (grid - ref).max() <= 2e-6 * ref.max()                   # never above: float rounding only
    assert (ref - grid).max() <= tail + 2e-6 * ref.max()            # below by at most the cut-off tails
    assert (grid - ref).abs().max() <= 2e-4 * ref.max()
    dense = ref > 0.2 * ref.max()
    assert ((grid - ref).abs()[dense] / ref[dense]).max() <= 1e-3

    # Without the huge ones, the grid changes by their all-pairs contribution (the path is not a no-op).
    with torch.no_grad():
        g.opacity_logits[:3] = -30.0
    assert (g.density_grid(R) - grid).abs().max() > 0.1


# --------------------------------------------------------------------------- densify, split, prune


def test_densify_clones_small_splits_large_prunes_faint_and_keeps_adam_state_bit_exact():
    n = 40
    g = gaussians(n, densify_grad_threshold=0.01, percent_dense=0.01, extent=4.0,
                  prune_opacity=0.01, prune_scale=0.4, max_points=1000)
    with torch.no_grad():
        g.log_scales.fill_(math.log(0.01))        # small: <= percent_dense x extent = 0.04
        g.log_scales[5:10] = math.log(0.1)        # large, below prune_scale
        g.log_scales[15, 1] = math.log(0.5)       # over prune_scale: pruned
        g.quats.copy_(torch.randn(n, 4))
        g.opacity_logits.fill_(0.0)               # opacity 0.5
        g.opacity_logits[10:15] = -6.0            # opacity 0.0025 < prune_opacity: pruned
    opt = adam_after_two_steps(g)
    clone, split, faint, oversize = list(range(0, 5)), list(range(5, 10)), list(range(10, 15)), [15]
    # The opacity/scale changes above happened before the steps; the steps moved values by ~1e-2 at most.
    assert (g.scales[:5].amax(-1) < 0.04).all() and (g.scales[5:10].amax(-1) > 0.04).all()
    assert (g.opacities[10:15] < 0.01).all() and g.scales[15].amax() > 0.4
    g.grad_accum.zero_()
    g.grad_count.fill_(2.0)
    g.grad_accum[clone + split] = 0.05            # mean 0.025 >= threshold
    g.grad_accum[20:25] = 0.019                   # mean 0.0095: just below, nothing happens
    g.grad_count[30] = 0.0                        # never drawn: no division by zero
    before = {name: getattr(g, name).detach().clone() for name in PARAMETERS}
    moments = {name: {k: v.clone() for k, v in opt.state[getattr(g, name)].items()} for name in PARAMETERS}
    grads = {name: getattr(g, name).grad.clone() for name in PARAMETERS}

    g.densify_and_prune(StepContext(step=100, optimizer=OptimizerOps(opt)))

    kept = [i for i in range(n) if i not in split + faint + oversize]
    expected = len(kept) + len(clone) + 2 * len(split)
    assert g.n_points == expected == 44
    assert g.last_densify["cloned"] == 5 and g.last_densify["split"] == 5 and g.last_densify["points"] == 44
    new = slice(len(kept), None)
    for name in PARAMETERS:
        p = getattr(g, name)
        assert p.shape[0] == expected and p.is_leaf and p.requires_grad
        assert torch.equal(p.detach()[:len(kept)], before[name][kept])
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(st["step"], moments[name]["step"])                   # bias correction carries on
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key][:len(kept)], moments[name][key][kept]), (name, key)
            assert moments[name][key][kept].abs().min() > 0                     # non-trivial moments
            assert (st[key][new] == 0).all(), (name, key)
        assert torch.equal(p.grad[:len(kept)], grads[name][kept]) and (p.grad[new] == 0).all()
    # Clones copy their parent; split children are drawn from it with scales / 1.6.
    cl = slice(len(kept), len(kept) + len(clone))
    for name in PARAMETERS:
        assert torch.equal(getattr(g, name).detach()[cl], before[name][clone])
    children = slice(len(kept) + len(clone), None)
    parents = torch.tensor(split).repeat(2)
    assert torch.allclose(g.scales[children], before["log_scales"][parents].exp() / 1.6, rtol=1e-6)
    for name in ("quats", "opacity_logits", "colors_dc"):
        assert torch.equal(getattr(g, name).detach()[children], before[name][parents])
    offset = g.means.detach()[children] - before["means"][parents]
    assert (offset.norm(dim=-1) > 0).all() and (offset.norm(dim=-1) < 0.1 * 6).all()
    assert not torch.equal(g.means[children][:5], g.means[children][5:])        # two different draws
    # Statistics restart at the new count.
    for name in STATISTICS:
        buf = getattr(g, name)
        assert buf.shape == (expected,) and (buf == 0).all() and name in dict(g.named_buffers())
    # The module trains what the optimiser holds, and the optimiser still works.
    assert [id(p) for p in optimiser_params(opt)] == [id(getattr(g, name)) for name in PARAMETERS]
    assert len(opt.state) == len(PARAMETERS)
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].shape == (expected, 3)
    opt.step()
    assert all(torch.isfinite(getattr(g, name)).all() for name in PARAMETERS)
    assert int(opt.state[g.means]["step"]) == 3
    opt.zero_grad(set_to_none=True)
    (g.means.sum() + g.opacities.sum()).backward()
    opt.step()


def test_max_points_keeps_the_strongest_gradients():
    g = gaussians(20, densify_grad_threshold=0.01, max_points=23)
    with torch.no_grad():
        g.log_scales.fill_(math.log(0.01))          # all clone
        g.opacity_logits.fill_(0.0)
    opt = adam_after_two_steps(g)
    g.grad_count.fill_(1.0)
    g.grad_accum[:] = torch.linspace(0.02, 0.2, 20)  # all over the threshold; the last three are strongest
    means = g.means.detach().clone()
    g.densify_and_prune(StepContext(step=1, optimizer=OptimizerOps(opt)))
    assert g.n_points == 23
    assert torch.equal(g.means.detach()[20:], means[17:])


# --------------------------------------------------------------------------- opacity reset


def test_opacity_reset_zeroes_only_the_opacity_moments():
    g = gaussians(30, opacity_reset_every=5, densify_from=1000, densify_until=2000)
    with torch.no_grad():
        g.opacity_logits.uniform_(-6.0, 3.0)
    opt = adam_after_two_steps(g)
    params = {name: getattr(g, name) for name in PARAMETERS}
    moments = {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in params.items()}
    values = {name: p.detach().clone() for name, p in params.items()}

    g.after_backward(StepContext(step=4, optimizer=OptimizerOps(opt)))        # not a reset step
    assert g.opacity_logits is params["opacity_logits"] and torch.equal(g.opacity_logits, values["opacity_logits"])

    g.after_backward(StepContext(step=5, optimizer=OptimizerOps(opt)))
    assert g.n_points == 30                                                    # no densification here
    assert (g.opacities <= 0.01 + 1e-7).all() and g.opacities.max() > 0.0099
    low = values["opacity_logits"] < math.log(0.01 / 0.99)
    assert low.any() and torch.equal(g.opacity_logits.detach()[low], values["opacity_logits"][low])
    st = opt.state[g.opacity_logits]
    assert (st["exp_avg"] == 0).all() and (st["exp_avg_sq"] == 0).all()
    assert torch.equal(st["step"], moments["opacity_logits"]["step"])
    assert any(p is g.opacity_logits for p in optimiser_params(opt)) and params["opacity_logits"] not in opt.state
    for name in PARAMETERS:
        if name == "opacity_logits":
            continue
        p = getattr(g, name)
        assert p is params[name] and torch.equal(p.detach(), values[name])
        for key, value in moments[name].items():
            assert torch.equal(opt.state[p][key], value), (name, key)
    assert opt.param_groups[0]["name"] == "means" and opt.param_groups[0]["lr"] == pytest.approx(g.position_lr_at(5))
    opt.state_dict()
    opt.step()


# --------------------------------------------------------------------------- through the runner


TINY = """
name: toy
tag: t
use_timestamp: false
trainer: {max_steps: 3, val_every: 0, ckpt_every: 3, device: cpu}
data: {reference_height: 32, reference_width: 32, height: 16, width: 16, foreground_ratio: null, batch_size: 2,
       n_val_views: 1, n_test_views: 1, eval_height: 16, eval_width: 16}
system:
  geometry_type: gaussians
  geometry: {radius: 0.6, num_points: 200, init_radius: 0.4, densify_from: 1, densify_every: 1,
             densify_grad_threshold: 1.0e-9, max_points: 600, prune_opacity: 0.0}
  renderer_type: gaussian-splatting
  renderer: {}
  guidance_type: null
  loss: {lambda_rgb: 1.0}
  export: {resolution: 16, texture_size: 32, relative_threshold: null, threshold: 0.5}
"""


@pytest.fixture()
def image(disc_image):
    return disc_image


def test_gaussians_train_densify_checkpoint_and_resume_with_their_count(tmp_path, image):
    path = tmp_path / "gs.yaml"
    path.write_text(TINY)
    args = [f"image={image}", f"exp_root_dir={tmp_path / 'out'}"]
    exp = Experiment(load_config(str(path), args))
    assert type(exp.system.geometry).__name__ == "Gaussians" and exp.system.geometry.n_points == 200
    exp.train()
    g = exp.system.geometry
    assert g.last_densify["step"] == 2 and g.last_densify["cloned"] + g.last_densify["split"] > 0
    count = g.n_points
    assert 200 < count <= 600
    ckpt = load_checkpoint(exp.ckpt_path)
    assert ckpt["step"] == 3
    for name in PARAMETERS + STATISTICS:
        assert ckpt["system"][f"geometry.{name}"].shape[0] == count, name
    saved = ckpt["optimizer"]
    groups = {group["name"]: group["params"][0] for group in saved["param_groups"] if "name" in group}
    assert set(groups) == set(PARAMETERS)
    for name in PARAMETERS:
        assert saved["state"][groups[name]]["exp_avg"].shape[0] == count, name

    resumed = Experiment(load_config(str(path), args + [f"resume={exp.ckpt_path}", "trainer.max_steps=5"]))
    assert resumed.system.geometry.n_points == 200              # a fresh model, before the checkpoint loads
    resumed.restore(exp.ckpt_path, with_optimizer=True)
    rg, opt = resumed.system.geometry, resumed.optimizer
    assert rg.n_points == count and rg.grad_accum.shape == (count,)
    for name in PARAMETERS:
        p = getattr(rg, name)
        assert torch.equal(p.detach(), ckpt["system"][f"geometry.{name}"])
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], saved["state"][groups[name]][key]), (name, key)
    assert [id(p) for p in optimiser_params(opt)] == [id(getattr(rg, name)) for name in PARAMETERS]

    resumed = Experiment(load_config(str(path), args + [f"resume={exp.ckpt_path}", "trainer.max_steps=5"]))
    resumed.train()                                              # steps 3 and 4 densify again
    rg = resumed.system.geometry
    assert resumed.step == 5 and rg.last_densify["step"] == 4 and count < rg.n_points <= 600
    after = load_checkpoint(resumed.ckpt_path)
    assert after["step"] == 5 and after["system"]["geometry.means"].shape[0] == rg.n_points
    states = list(after["optimizer"]["state"].values())
    assert len(states) == len(PARAMETERS)
    assert all(int(s["step"]) == 5 and s["exp_avg"].shape[0] == rg.n_points for s in states)   # 3 steps + 2 resumed


# --------------------------------------------------------------------------- config errors, memory estimate


def test_the_renderer_refuses_a_geometry_that_is_not_gaussians(tmp_path, image):
    path = tmp_path / "gs.yaml"
    path.write_text(TINY)
    args = [f"image={image}", f"exp_root_dir={tmp_path / 'out'}", "system.geometry_type=voxel-rf",
            "system.geometry={grid_size: 16, radius: 0.6}"]
    with pytest.raises(ConfigError) as info:
        Experiment(load_config(str(path), args))
    message = str(info.value)
    assert "\n" not in message and "gaussian-splatting" in message and "geometry_type=gaussians" in message


def test_memory_estimate_of_the_gaussian_recipe(tmp_path):
    from lift3d.preflight import estimate_step_memory

    def estimate(*overrides):
        exp = Experiment(load_config("zero123-gs-cpu", [f"exp_root_dir={tmp_path}", "use_timestamp=false", *overrides]))
        assert type(exp.system.renderer).__name__ == "GaussianSplatting"
        assert type(exp.system.geometry).__name__ == "Gaussians"
        return estimate_step_memory(exp.system, exp.data, exp.exp.trainer.mmap_threshold_mib)

    est = estimate()
    assert est.parts["render"] > 0 and "system.geometry.max_points (now 3000)" in est.settings["render"]
    assert est.total_gib > est.parts["render"] and "unet" in est.parts       # the prior's parts are there too
    small = estimate("data.height=32", "data.width=32")
    assert 0 < small.parts["render"] < est.parts["render"]
    fewer = estimate("system.geometry.max_points=1000")
    assert 0 < fewer.parts["render"] < est.parts["render"] and fewer.settings["render"].endswith("(now 1000)")
