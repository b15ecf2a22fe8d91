"""Masked SGD and AdamW: torch.optim's step, then the pruned entries zeroed, fused into one launch.

Sparse training keeps a boolean mask per prunable weight. The eager way to train such a network
is torch's optimizer followed, tensor by tensor, by ``grad.mul_(mask)`` and ``param.mul_(mask)``:
three or more kernels per tensor per step. ``MaskedSGD`` and ``MaskedAdamW`` do the update and the
masking of all parameters of a param group in one Triton launch on CUDA (a multi-tensor kernel
over a table of tensor addresses, ``fastmask.ops.optimizer_step``); elsewhere (CPU tensors,
float64, ``FASTMASK_BACKEND=torch``) they run the torch reference below, vectorised with
``torch._foreach`` ops.

Semantics, on either path: each step equals the torch optimizer's step (``torch.optim.SGD`` /
``torch.optim.AdamW``, same hyperparameters) followed by zeroing the pruned entries of every
masked parameter *and of its optimizer state* (momentum buffer, Adam moments). Pruned weights are
therefore exactly 0.0 after every step and never come back, and the state of a pruned entry stays
0.0, so unpruned entries follow exactly the trajectory torch + re-masking gives. (The torch path
zeroes by multiplying with the 0/1 mask: a pruned entry may be -0.0, equal to 0.0, and one that
became Inf or NaN stays NaN.) Gradients are read, never modified.

Example::

    from fastmask.optim import MaskedSGD
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                    masks={model.fc.weight: model.fc.weight.abs() > 0.01})
    # or, from a model of masked modules (fastmask.masks.by_parameter: a `weight` beside a `mask` buffer):
    opt = MaskedSGD.from_model(model, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()
    opt.set_masks(new_masks)   # IMP: prune further; zeroes the newly pruned weights and state
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from fastmask import backend, masks as masks_module
from fastmask.ops import optimizer_step

__all__ = ["MaskedSGD", "MaskedAdamW"]


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers one block of memory without gaps or overlap (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same element order in memory (strides of size-1 dimensions do not matter)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _laid_out_like(p: Tensor, t: Tensor) -> Tensor:
    """``t`` with ``p``'s memory layout (a copy only when the layouts differ)."""
    if _same_layout(p, t):
        return t
    out = torch.empty_like(p, dtype=t.dtype)
    out.copy_(t)
    return out


class _Plan:
    """The kernel path of one param group, kept between steps while its tensors stay the same.

    ``units``: per device, the kernel's address table and its classes, runs of rows that share a
    launch: [first row, end row, value], value being what differs between launches (SGD: whether
    the momentum buffers are fresh; AdamW: the step count before this step). ``kernel_params``:
    the parameters in the tables, in row order; the group's other parameters (unsupported dtype
    or layout, another backend) take the torch path.
    """

    def __init__(self, key, units, kernel_params, grad_ptrs):
        self.key = key
        self.units = units
        self.kernel_params = kernel_params
        self.kernel_ids = {id(p) for p in kernel_params}
        self.grad_ptrs = grad_ptrs
        self.steps: Tensor | None = None  # AdamW: the counter behind the kernel parameters' state["step"]


class _MaskedOptimizer(torch.optim.Optimizer):
    """What MaskedSGD and MaskedAdamW share: masks, the choice of path, the cached kernel plans.

    A subclass provides ``_structure(group)`` (what changes the kernel's tables), ``_prepare_state``
    (creates the state the kernel needs, returns the parameter's launch class), ``_row_state``,
    ``_launch``, ``_next`` (a class after one step) and ``_reference_step`` (the torch path).
    """

    def __init__(self, params, defaults: dict, masks: Mapping[Tensor, Tensor] | None):
        self._masks: dict[Tensor, Tensor] = {}
        self._plans: dict[int, _Plan] = {}
        self._version = 0  # bumped whenever tensors behind a cached plan may have been replaced
        super().__init__(params, defaults)
        self.set_masks(masks)

    @classmethod
    def from_model(cls, model: nn.Module, **hyperparameters):
        """An optimizer over ``model.parameters()`` with the masks of its masked modules
        (``fastmask.masks.by_parameter``); ``hyperparameters`` are the constructor's (``lr=...``, ...)."""
        return cls(model.parameters(), masks=masks_module.by_parameter(model), **hyperparameters)

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """The current masks (boolean, in the parameters' memory layout), by parameter."""
        return dict(self._masks)

    def set_masks(self, masks: Mapping[Tensor, Tensor] | None) -> None:
        """Replace all masks (as the constructor's ``masks``; parameters left out become dense).

        The pruned entries of the parameters and of their optimizer state are zeroed at once, so
        a further-pruned network (IMP) continues with its newly pruned weights and their momentum
        or Adam moments exactly 0.0. The optimizer keeps its own boolean copy of each mask: change
        a mask in place elsewhere and call ``set_masks`` again for it to take effect.
        """
        checked = self._copied_masks(masks)
        with torch.no_grad():
            for p, keep in checked.items():
                pruned = keep.logical_not()
                p.masked_fill_(pruned, 0)
                for name, value in self.state.get(p, {}).items():
                    if name != "step" and isinstance(value, Tensor) and value.shape == p.shape:
                        value.masked_fill_(pruned, 0)
        self._masks = checked
        self._keep_factors: dict[Tensor, Tensor] = {}  # _zero_pruned's masks in the parameters' dtypes
        self._version += 1

    def _copied_masks(self, masks) -> dict[Tensor, Tensor]:
        """``masks`` validated (``fastmask.masks.check``) and copied in their parameters' layouts."""
        if masks is None:
            return {}
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping from parameter to mask tensor, got {type(masks).__name__}")
        ours = {id(p) for group in self.param_groups for p in group["params"]}
        checked = {}
        for p, mask in masks.items():
            if not isinstance(p, Tensor) or id(p) not in ours:
                what = f"a tensor of shape {tuple(p.shape)}" if isinstance(p, Tensor) else repr(type(p).__name__)
                raise ValueError(f"masks: a mask is given for {what} that is not a parameter of this optimizer")
            mask = masks_module.check(mask, p.shape, "masks: mask", owner="a parameter", device=p.device)
            keep = torch.empty_like(p, dtype=torch.bool)  # an own copy, in the parameter's layout
            keep.copy_(mask)
            checked[p] = keep
        return checked

    def __getstate__(self):
        return {**super().__getstate__(), "_masks": self._masks}

    def __setstate__(self, state: dict) -> None:
        # Also reached from load_state_dict. Cached plans hold addresses: never carried over.
        super().__setstate__(state)
        self._plans = {}
        self._keep_factors = {}  # _zero_pruned rebuilds them from the masks
        self._version = getattr(self, "_version", 0) + 1

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._version += 1

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``; the pruned entries of the loaded state are then zeroed (on
        copies: the tensors of ``state_dict`` are not modified). Masks are not part of the state:
        give them to the constructor or to ``set_masks``."""
        super().load_state_dict(state_dict)
        for p, keep in self._masks.items():
            state = self.state.get(p, {})
            for name, value in state.items():
                if name != "step" and isinstance(value, Tensor) and value.shape == p.shape:
                    state[name] = value.masked_fill(keep.logical_not(), 0)
        self._version += 1

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every parameter that has a gradient (see the module doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # The learning rate, the step count and the address tables are host values, read at each
            # step: a replayed graph would repeat the captured ones without saying so.
            raise RuntimeError(f"{type(self).__name__}.step cannot be captured in a CUDA graph; call it after the "
                               "graph's replay (as fastmask.train.fit does)")
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise TypeError(f"{type(self).__name__} does not support sparse gradients")
            plan = self._plan(index, group, params, grads)
            if plan.kernel_params:
                self._advance(plan)
            for table, classes in plan.units:
                for first_row, end_row, value in classes:
                    self._launch(table, first_row, end_row, value, group)
                classes[:] = _merged([(first, end, self._next(value)) for first, end, value in classes])
            reference = [p for p in params if id(p) not in plan.kernel_ids]
            if reference:
                self._reference_step(group, reference, [p.grad for p in reference])
        return loss

    def _plan(self, index: int, group: dict, params: list[Tensor], grads: list[Tensor]) -> _Plan:
        """The cached plan of a group, rebuilt when its parameters or state changed, its address
        table refreshed when only the gradient tensors did (set_to_none=True allocates new ones)."""
        key = (self._version, backend.selected(), self._structure(group),
               tuple(map(id, params)), tuple(p.data_ptr() for p in params))
        plan = self._plans.get(index)
        if plan is None or plan.key != key:
            plan = self._plans[index] = self._build_plan(key, group, params, grads)
            return plan
        kernel_grads = [p.grad for p in plan.kernel_params]
        grad_ptrs = tuple(g.data_ptr() for g in kernel_grads)
        if grad_ptrs != plan.grad_ptrs:
            if all(self._fits_kernel(p, g) for p, g in zip(plan.kernel_params, kernel_grads)):
                start = 0
                for table, _ in plan.units:
                    table.refresh(kernel_grads[start:start + len(table.rows)])
                    start += len(table.rows)
                plan.grad_ptrs = grad_ptrs
            else:
                plan = self._plans[index] = self._build_plan(key, group, params, grads)
        return plan

    @staticmethod
    def _fits_kernel(p: Tensor, g: Tensor) -> bool:
        return (p.dtype == torch.float32 and g.dtype == p.dtype and g.device == p.device and p.numel() > 0
                and _dense(p) and _same_layout(p, g) and backend.use_triton(p, g, kernel_dtypes=(torch.float32,)))

    def _build_plan(self, key, group: dict, params: list[Tensor], grads: list[Tensor]) -> _Plan:
        by_device: dict[torch.device, list[Tensor]] = {}
        for p, g in zip(params, grads):
            if self._fits_kernel(p, g):
                by_device.setdefault(p.device, []).append(p)
        units, kernel_params = [], []
        for device, members in by_device.items():
            values = [self._prepare_state(p, group) for p in members]
            order = sorted(range(len(members)), key=values.__getitem__)
            members = [members[i] for i in order]
            values = [values[i] for i in order]
            rows = [(p, p.grad, *self._row_state(p), self._masks.get(p)) for p in members]
            classes = _merged([(r, r + 1, value) for r, value in enumerate(values)])
            units.append((optimizer_step.tensor_table(rows, device), classes))
            kernel_params += members
        plan = _Plan(key, units, kernel_params, tuple(p.grad.data_ptr() for p in kernel_params))
        self._after_build(plan)
        return plan

    def _after_build(self, plan: _Plan) -> None:
        """Per-plan bookkeeping (AdamW: the step counter)."""

    def _advance(self, plan: _Plan) -> None:
        """Per-step bookkeeping before the launches (AdamW: count the step)."""

    def _zero_pruned(self, params: Iterable[Tensor], state_names: tuple[str, ...]) -> None:
        """The pruned entries of ``params`` and of their state ``state_names`` set to 0 after a step
        of the torch path, as a multiply by the 0/1 mask in the parameter's dtype (cached until
        ``set_masks``): on the CPU 11x faster than ``masked_fill_`` (15 us against 166 us for a
        128 x 128 x 3 x 3 weight, 4% of a ConvNet-3 training step on digits). Exact for finite
        values; a NaN or Inf in a pruned entry stays, as it would in the unpruned ones beside it."""
        masked = [p for p in params if p in self._masks]
        if not masked:
            return
        factors = [self._keep_factors.get(p) for p in masked]
        for i, p in enumerate(masked):
            if factors[i] is None:
                factors[i] = self._keep_factors[p] = self._masks[p].to(p.dtype)
        torch._foreach_mul_(masked, factors)
        for name in state_names:
            torch._foreach_mul_([self.state[p][name] for p in masked], factors)


def _merged(classes: list[tuple]) -> list[tuple]:
    """Adjacent runs of rows with equal values joined: (first, end, value) triples."""
    out = []
    for first, end, value in classes:
        if out and out[-1][2] == value and out[-1][1] == first:
            out[-1] = (out[-1][0], end, value)
        else:
            out.append((first, end, value))
    return out


class MaskedSGD(_MaskedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) with masked parameters.

    Each step is ``torch.optim.SGD``'s step with the same hyperparameters, followed by zeroing the
    pruned entries of the masked parameters and of their momentum buffers: pruned weights are
    exactly 0.0 after every step and never come back; their momentum stays 0.0. On CUDA the whole
    step of a param group is one kernel launch.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``; read from the
            param groups at every step, so learning-rate schedulers work as usual.
        masks: ``{parameter: mask}``; a mask is boolean (or holds only 0 and 1) and has the
            parameter's shape and device. Parameters without an entry are dense.

    Example::

        opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, masks={model.fc.weight: keep})
        opt = MaskedSGD.from_model(model, lr=0.1, momentum=0.9, nesterov=True)
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, masks: Mapping[Tensor, Tensor] | None = None):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires a momentum > 0 and dampening == 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, masks)

    @staticmethod
    def _structure(group: dict):
        return group["momentum"] != 0

    def _prepare_state(self, p: Tensor, group: dict) -> bool:
        """Make the state the kernel needs; return whether the momentum buffer is fresh."""
        if group["momentum"] == 0:
            return False
        state = self.state[p]
        if state.get("momentum_buffer") is None:
            # A zero buffer that the kernel's first step turns into d, as torch's first step clones d.
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return True
        state["momentum_buffer"] = _laid_out_like(p, state["momentum_buffer"])
        return False

    def _row_state(self, p: Tensor) -> tuple:
        return (self.state.get(p, {}).get("momentum_buffer"), None)

    def _launch(self, table, first_row: int, end_row: int, fresh: bool, group: dict) -> None:
        optimizer_step.sgd_step(table, first_row, end_row, lr=group["lr"], weight_decay=group["weight_decay"],
                        momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
                        fresh=fresh)

    @staticmethod
    def _next(fresh: bool) -> bool:
        return False

    def _reference_step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        _sgd_reference(self, params, grads, lr=float(group["lr"]), momentum=group["momentum"],
                       dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"])


def _sgd_reference(opt: MaskedSGD, params, grads, *, lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's single-tensor step, op for op, vectorised with torch._foreach ops; then
    the pruned entries of parameters and momentum buffers zeroed."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        states = [opt.state[p] for p in params]
        old = [i for i, s in enumerate(states) if s.get("momentum_buffer") is not None]
        if old:
            bufs = [states[i]["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - dampening)
        for s, g in zip(states, grads):
            if s.get("momentum_buffer") is None:
                s["momentum_buffer"] = g.detach().clone()
        bufs = [s["momentum_buffer"] for s in states]
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, grads, alpha=-lr)
    opt._zero_pruned(params, ("momentum_buffer",) if momentum != 0 else ())


class MaskedAdamW(_MaskedOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay) with masked parameters.

    Each step is ``torch.optim.AdamW``'s step with the same hyperparameters, followed by zeroing
    the pruned entries of the masked parameters and of their first and second moments: pruned
    weights are exactly 0.0 after every step and never come back; their moments stay 0.0. The
    state (``step``, ``exp_avg``, ``exp_avg_sq``) is named as torch names it. On CUDA the whole
    step of a param group is one kernel launch (one per distinct step count, normally one).

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; read at every step.
        masks: ``{parameter: mask}`` (boolean or 0/1, the parameter's shape and device);
            parameters without an entry are dense.

    Example::

        opt = MaskedAdamW(model.parameters(), lr=1e-3, masks=fastmask.masks.by_parameter(model))
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, masks: Mapping[Tensor, Tensor] | None = None):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, masks)

    @staticmethod
    def _structure(group: dict):
        return None

    def _prepare_state(self, p: Tensor, group: dict) -> float:
        """Make the state the kernel needs; return the step count so far."""
        state = self.state[p]
        if not state:
            _new_adam_state(p, state)
        state["exp_avg"] = _laid_out_like(p, state["exp_avg"])
        state["exp_avg_sq"] = _laid_out_like(p, state["exp_avg_sq"])
        return float(state["step"])

    def _row_state(self, p: Tensor) -> tuple:
        return (self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"])

    def _after_build(self, plan: _Plan) -> None:
        # One counter for the plan's step tensors: state["step"] of each kernel parameter becomes a
        # 0-dim view of it, so a step costs one increment, not one tiny tensor op per parameter.
        plan.steps = torch.tensor([float(self.state[p]["step"]) for p in plan.kernel_params], dtype=torch.float32)
        for i, p in enumerate(plan.kernel_params):
            self.state[p]["step"] = plan.steps[i]

    def _advance(self, plan: _Plan) -> None:
        plan.steps += 1

    def _launch(self, table, first_row: int, end_row: int, steps_before: float, group: dict) -> None:
        optimizer_step.adamw_step(table, first_row, end_row, step=steps_before + 1, lr=group["lr"], betas=group["betas"],
                          eps=group["eps"], weight_decay=group["weight_decay"])

    @staticmethod
    def _next(steps_before: float) -> float:
        return steps_before + 1

    def _reference_step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        _adamw_reference(self, params, grads, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])


def _new_adam_state(p: Tensor, state: dict) -> None:
    # As torch.optim.AdamW: a float32 CPU step count and zero moments in the parameter's layout.
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _adamw_reference(opt: MaskedAdamW, params, grads, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch.optim.AdamW's single-tensor step, op for op, vectorised with torch._foreach ops; then
    the pruned entries of parameters and moments zeroed."""
    states = [opt.state[p] for p in params]
    for p, state in zip(params, states):
        if not state:
            _new_adam_state(p, state)
    steps = [s["step"] for s in states]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    counts = [s.item() for s in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**n) ** 0.5 for n in counts])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-(lr / (1 - beta1**n)) for n in counts])
    opt._zero_pruned(params, ("exp_avg", "exp_avg_sq"))
