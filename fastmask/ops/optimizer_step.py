"""The fused masked SGD / AdamW step: the wrapper of ``fastmask.kernels.masked_optim``.

One launch updates every parameter of a param group through a table of their addresses
(``tensor_table``), built once and kept by the optimizer while its tensors stay the same. This is
the one kernel of fastmask that is not a ``torch.library`` op: it updates its tensors through
those addresses, which an op's schema cannot describe (a custom op names every tensor it mutates
as an argument, and passing them all at every step is the cost the table removes). Which
parameters take the kernel and the torch reference step (``torch.optim``'s step, then the pruned
entries zeroed) are ``fastmask.optim``'s: the optimizer is where the step is defined.

Example (what ``fastmask.optim.MaskedSGD`` does on CUDA)::

    table = optimizer_step.tensor_table([(p, p.grad, momentum_buffer, None, mask)], p.device)
    optimizer_step.sgd_step(table, 0, 1, lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0,
                            nesterov=False, fresh=False)
"""
from __future__ import annotations

import torch


def tensor_table(rows: list[tuple], device: torch.device):
    """The kernels' address table of ``rows`` (param, grad, state_a, state_b, mask) on ``device``
    (``fastmask.kernels.masked_optim.TensorTable``)."""
    from fastmask.kernels.masked_optim import TensorTable

    return TensorTable(rows, device)


def sgd_step(table, first_row: int, end_row: int, **hyperparameters) -> None:
    """One masked SGD step, in place, over rows [first_row, end_row) of ``table``: one launch
    (``fastmask.kernels.masked_optim.masked_sgd_step``)."""
    from fastmask.kernels.masked_optim import masked_sgd_step

    masked_sgd_step(table, first_row, end_row, **hyperparameters)


def adamw_step(table, first_row: int, end_row: int, **hyperparameters) -> None:
    """One masked AdamW step, in place, over rows [first_row, end_row) of ``table``: one launch
    (``fastmask.kernels.masked_optim.masked_adamw_step``)."""
    from fastmask.kernels.masked_optim import masked_adamw_step

    masked_adamw_step(table, first_row, end_row, **hyperparameters)
