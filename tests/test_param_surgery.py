"""Densify/prune surgery keeps the optimiser state of surviving rows bit-exact (issue 23)."""

import pytest
import torch
from torch import nn

from lift3d.utils.param_surgery import extend_parameter, prune_parameter, replace_parameter, select_rows

OPTIMISERS = [
    pytest.param(torch.optim.Adam, {}, id="adam"),
    pytest.param(torch.optim.Adam, {"amsgrad": True}, id="adam-amsgrad"),
    pytest.param(torch.optim.AdamW, {"amsgrad": True, "weight_decay": 0.1}, id="adamw-amsgrad"),
    pytest.param(torch.optim.Adamax, {}, id="adamax"),
]
N = 6


def stepped(cls, kw, steps=2, shape=(N, 3)):
    """A parameter and its optimiser after ``steps`` steps on random gradients (seeded)."""
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(shape, generator=gen))
    opt = cls([param], lr=0.05, **kw)
    for _ in range(steps):
        param.grad = torch.randn(shape, generator=gen)
        opt.step()
    return param, opt


def snapshot(opt, param):
    return {k: v.clone() for k, v in opt.state[param].items()}


def same(a, b):   # parameters by identity (== on tensors compares values)
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def per_row(state):
    return {k: v for k, v in state.items() if v.dim() > 0}


@pytest.mark.parametrize("cls,kw", OPTIMISERS)
def test_extend_then_prune_keeps_surviving_state_and_state_dict_round_trips(cls, kw):
    param, opt = stepped(cls, kw)
    before = snapshot(opt, param)
    assert set(per_row(before)) >= {"exp_avg"} and before["step"].dim() == 0

    grown = extend_parameter(opt, param, torch.full((2, 3), 7.0))
    assert same(opt.param_groups[0]["params"], [grown]) and param not in opt.state
    assert torch.equal(grown[:N], param) and torch.equal(grown[N:], torch.full((2, 3), 7.0))
    for key, value in per_row(before).items():
        assert torch.equal(opt.state[grown][key][:N], value) and not opt.state[grown][key][N:].any()
    assert torch.equal(opt.state[grown]["step"], before["step"])
    opt.state_dict()   # raised KeyError when only param_groups was patched

    keep = torch.tensor([True, False, True, True, False, True, False, True])
    pruned = prune_parameter(opt, grown, keep)
    rows = keep[:N]
    for key, value in per_row(before).items():
        assert torch.equal(opt.state[pruned][key][:-1], value[rows]) and not opt.state[pruned][key][-1].any()
    assert torch.equal(opt.state[pruned]["step"], before["step"])

    fresh_param = nn.Parameter(pruned.detach().clone())
    fresh = cls([fresh_param], lr=0.05, **kw)
    fresh.load_state_dict(opt.state_dict())
    assert opt.state[pruned].keys() == fresh.state[fresh_param].keys()
    for key, value in opt.state[pruned].items():
        assert torch.equal(fresh.state[fresh_param][key], value)


@pytest.mark.parametrize("cls,kw", OPTIMISERS)
def test_next_step_after_surgery_matches_an_optimiser_that_only_ever_saw_the_kept_rows(cls, kw):
    keep = torch.tensor([True, True, False, True, False, True])
    param, opt = stepped(cls, kw, steps=1)
    gen = torch.Generator().manual_seed(0)   # the reference: the same rows, gradients, steps
    ref = nn.Parameter(torch.randn(N, 3, generator=gen)[keep])
    ref_opt = cls([ref], lr=0.05, **kw)
    ref.grad = torch.randn(N, 3, generator=gen)[keep]
    ref_opt.step()

    # as in lift3d's after_backward: the surgery runs between backward and step, so the gradient moves too
    g2 = torch.randn(N, 3)
    param.grad, ref.grad = g2.clone(), g2[keep].clone()
    param = extend_parameter(opt, param, torch.ones(2, 3))
    param = prune_parameter(opt, param, torch.cat([keep, torch.tensor([True, False])]))
    assert torch.equal(param.grad[:-1], g2[keep]) and not param.grad[-1].any()
    opt.step()
    ref_opt.step()

    assert torch.equal(param[:-1], ref)
    for key, value in ref_opt.state[ref].items():
        assert torch.equal(opt.state[param][key][:-1] if value.dim() else opt.state[param][key], value)


def test_a_parameter_without_state_gets_none_and_trains_afterwards():
    param = nn.Parameter(torch.zeros(N))
    opt = torch.optim.Adam([param], lr=0.1)
    param = select_rows(opt, param, torch.tensor([0, 0, 3]))   # general form: repeats allowed
    assert param.shape == (3,) and len(opt.state) == 0   # no empty entry left in the defaultdict
    opt.state_dict()
    param.grad = torch.ones(3)
    opt.step()
    assert opt.state[param]["exp_avg"].shape == (3,)


def test_a_parameter_not_in_the_optimiser_is_refused():
    param, opt = stepped(torch.optim.Adam, {})
    with pytest.raises(ValueError, match="not in this optimiser"):
        extend_parameter(opt, nn.Parameter(torch.zeros(N, 3)), torch.zeros(1, 3))
    prune_parameter(opt, param, torch.ones(N, dtype=torch.bool))
    with pytest.raises(ValueError, match="not in this optimiser"):   # the stale, replaced parameter
        prune_parameter(opt, param, torch.ones(N, dtype=torch.bool))
    with pytest.raises(ValueError):
        prune_parameter(opt, opt.param_groups[0]["params"][0], torch.arange(N))   # an index is not a mask


def test_only_the_given_parameter_of_a_group_changes_whatever_its_trailing_shape():
    gen = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(N,), (N, 1, 3), (N, 1, 3), (2, 2)]]
    params[2].data.copy_(params[1])   # equal values: found by identity, not by value
    opt = torch.optim.Adam([{"params": params[:3]}, {"params": params[3:], "lr": 0.5}])
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = {id(p): snapshot(opt, p) for p in params}
    keep = torch.tensor([False, True, True, False, True, True])

    new = prune_parameter(opt, params[2], keep)
    assert same(opt.param_groups[0]["params"], [params[0], params[1], new])
    assert same(opt.param_groups[1]["params"], [params[3]])
    assert new.shape == (4, 1, 3) and torch.equal(opt.state[new]["exp_avg_sq"], before[id(params[2])]["exp_avg_sq"][keep])
    for p in params[:2] + params[3:]:
        assert all(torch.equal(opt.state[p][k], v) for k, v in before[id(p)].items())

    flat = prune_parameter(opt, params[0], keep)
    assert torch.equal(opt.state[flat]["exp_avg"], before[id(params[0])]["exp_avg"][keep])
    opt.state_dict()


def test_replace_resets_the_moments_to_the_new_shape_and_keeps_step():
    param, opt = stepped(torch.optim.AdamW, {"amsgrad": True})
    step = opt.state[param]["step"].clone()
    param.grad = torch.ones(N, 3)
    new = replace_parameter(opt, param, torch.zeros(N + 1, 3))
    state = opt.state[new]
    assert torch.equal(state["step"], step) and new.grad is None and new.requires_grad
    assert all(state[k].shape == (N + 1, 3) and not state[k].any() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    opt.state_dict()
