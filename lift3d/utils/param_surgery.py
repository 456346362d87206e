"""Change a parameter's first dimension together with its optimiser state (densify and prune, issue 23).

A geometry whose points are cloned, split or pruned replaces each per-point ``nn.Parameter`` with a
longer or shorter one. Swapping it in ``optimizer.param_groups`` alone leaves the old parameter's state
behind, keyed by the old tensor: the next ``optimizer.state_dict()`` raises ``KeyError`` and the next
step finds moments of the wrong shape. These functions put a new parameter in the old one's place (in
the same group and position, found by identity) and map its state with the same row operation:

- ``extend_parameter``: rows appended; old rows keep their state bit-exact, new rows start at zeros
  (as 3D Gaussian Splatting does for cloned and split points);
- ``prune_parameter`` / ``select_rows``: rows kept (or gathered) with their state, bit-exact;
- ``replace_parameter``: a new value of any shape; its moments restart at zeros (3DGS's opacity reset).

Each returns the new parameter; the caller must store it on its module, or the module keeps training
the old, orphaned tensor::

    self.means = extend_parameter(optimizer, self.means, new_means)

Per-element state (Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad; Adamax
``exp_avg``, ``exp_inf``) is recognised by having the parameter's shape; scalar state (``step``) is kept
as it is, so bias correction carries on where it was. A parameter that has taken no step has no state,
and gets none. lift3d calls ``after_backward`` between backward and the optimiser step, so the gradient
is mapped with the same row operation too (zeros for new rows): otherwise the optimiser would skip the
parameter for that step, as it skips any parameter whose ``grad`` is None.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

RowOp = Callable[[Tensor], Tensor]


def find_group(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> tuple[dict, int]:
    """The optimiser's param group holding ``param`` and its position there, found by identity (an
    equal-valued parameter elsewhere is not this one)."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is param:
                return group, i
    raise ValueError(f"parameter of shape {tuple(param.shape)} is not in this optimiser "
                     "(was it replaced before without storing the returned parameter?)")


def _swap(optimizer: torch.optim.Optimizer, old: nn.Parameter, new_value: Tensor,
          rows: Optional[RowOp]) -> nn.Parameter:
    """Put ``new_value`` in ``old``'s place; map every per-element state tensor (and the gradient) with
    ``rows``, or, when ``rows`` is None, reset the state to zeros and drop the gradient."""
    group, i = find_group(optimizer, old)

    with torch.no_grad():
        new = nn.Parameter(new_value.detach().to(old), requires_grad=old.requires_grad)
        if rows is not None and old.grad is not None:
            new.grad = rows(old.grad)
        # pop, not index: optimizer.state is a defaultdict and would gain an empty entry for a stateless param
        state = optimizer.state.pop(old, None)
        if state:
            mapped = {}
            for key, value in state.items():
                if not torch.is_tensor(value) or value.dim() == 0:
                    mapped[key] = value   # step counters and the like: per parameter, not per row
                elif value.shape == old.shape:
                    mapped[key] = rows(value) if rows is not None else value.new_zeros(new.shape)
                else:   # e.g. a factored second moment: no row operation is known to be right for it
                    raise ValueError(f"optimiser state {key!r} of shape {tuple(value.shape)} does not match its "
                                     f"parameter's {tuple(old.shape)}; cannot resize it row by row")
            optimizer.state[new] = mapped
    group["params"][i] = new
    return new


def replace_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new_value: Tensor) -> nn.Parameter:
    """A new parameter holding ``new_value`` (any shape) in ``old``'s place; its moments restart at zeros,
    ``step`` is kept, the old gradient is dropped (it was for the old value)."""
    return _swap(optimizer, old, new_value, None)


def extend_parameter(optimizer: torch.optim.Optimizer, param: nn.Parameter, extension: Tensor) -> nn.Parameter:
    """``param`` with the rows of ``extension`` appended; existing rows keep their state, new rows get zeros."""
    if extension.shape[1:] != param.shape[1:]:
        raise ValueError(f"cannot append rows of shape {tuple(extension.shape[1:])} "
                         f"to a parameter of shape {tuple(param.shape)}")
    n = extension.shape[0]
    return _swap(optimizer, param, torch.cat([param.detach(), extension.to(param)]),
                 lambda t: torch.cat([t, t.new_zeros((n,) + t.shape[1:])]))


def select_rows(optimizer: torch.optim.Optimizer, param: nn.Parameter, index: Tensor) -> nn.Parameter:
    """``param[index]`` (a LongTensor of row numbers, repeats allowed, or a boolean mask over the rows),
    each row with its own state."""
    if index.dtype == torch.bool and index.shape != param.shape[:1]:
        raise ValueError(f"row mask of shape {tuple(index.shape)} for a parameter with {param.shape[0]} rows")
    index = index.to(param.device)
    return _swap(optimizer, param, param.detach()[index], lambda t: t[index])


def prune_parameter(optimizer: torch.optim.Optimizer, param: nn.Parameter, keep: Tensor) -> nn.Parameter:
    """The rows of ``param`` where the boolean ``keep`` is True, with their state."""
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a boolean mask over the rows, not {keep.dtype}")
    return select_rows(optimizer, param, keep)
