"""One masked optimizer step over CIFAR ResNet-18's parameters (62 tensors) at 90% sparsity of the
conv and linear weights (BatchNorm and the fc bias dense): width 64 (11.17M values) on a GPU,
width 16 (0.70M values) on the CPU.

Contenders, each on its own copy of the tensors:

- ``eager_loop``: what researchers write: ``torch.optim`` with ``foreach=False``, and per masked
  tensor ``grad.mul_(mask)`` before the step and ``param.mul_(mask)`` after it (float masks, as
  ``torch.nn.utils.prune`` keeps them);
- ``foreach``: ``torch.optim``'s ``foreach=True`` step with ``torch._foreach_mul_`` masking the
  gradients before and the parameters after it;
- ``fused_foreach``: the same with ``fused=True``;
- ``fastmask``: ``MaskedSGD`` / ``MaskedAdamW``: one launch per step on a GPU, the torch
  reference (``torch._foreach`` ops) on the CPU.

The roofline (GPU) is the fused kernel's traffic (it reads every parameter, gradient, state value
and mask byte, and writes every parameter and state value) over the HBM bandwidth measured in the
same session; ``fraction_of_hbm`` is roofline time over measured time. Targets (issue 4, SGD):
>= 10x vs eager_loop, >= 1.5x vs fused_foreach, >= 0.7 of the measured bandwidth.
"""
import dataclasses

import pytest
import torch

from fastmask.optim import MaskedAdamW, MaskedSGD

from bench.harness import case, cases, medians

SPARSITY = 0.9


@dataclasses.dataclass(frozen=True)
class OptimCase:
    optimizer: str  # "sgd" or "adamw"
    width: int


def _table(width: int, headline: bool):
    return [case(f"resnet18-w{width}-{name}", OptimCase(name, width), headline=headline) for name in ("sgd", "adamw")]


CASES = cases(gpu=_table(64, headline=True), cpu=_table(16, headline=False), smoke=_table(4, headline=True))


def resnet18_cifar_shapes(width: int = 64, num_classes: int = 10) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape) of every parameter of a CIFAR ResNet-18 (3x3 stem, no max-pool), in order."""
    shapes = [("conv", (width, 3, 3, 3)), ("bn", (width,)), ("bn", (width,))]
    in_ch = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        out_ch = width * 2**stage
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [("conv", (out_ch, in_ch, 3, 3)), ("bn", (out_ch,)), ("bn", (out_ch,)),
                       ("conv", (out_ch, out_ch, 3, 3)), ("bn", (out_ch,)), ("bn", (out_ch,))]
            if s != 1 or in_ch != out_ch:
                shapes += [("conv", (out_ch, in_ch, 1, 1)), ("bn", (out_ch,)), ("bn", (out_ch,))]
            in_ch = out_ch
    return shapes + [("linear", (num_classes, in_ch)), ("bias", (num_classes,))]


def make_problem(width: int, device: torch.device):
    """Parameters with gradients, and a random 90% mask for every conv / linear weight."""
    g = torch.Generator().manual_seed(0)
    shapes = resnet18_cifar_shapes(width)
    values = [torch.randn(shape, generator=g) * 0.05 for _, shape in shapes]
    grads = [torch.randn(shape, generator=g) * 0.01 for _, shape in shapes]
    masks = [torch.rand(shape, generator=g) >= SPARSITY if kind in ("conv", "linear") else None
             for kind, shape in shapes]
    return [(v.to(device), gr.to(device), None if m is None else m.to(device)) for v, gr, m in zip(values, grads, masks)]


def contenders(problem, make_torch, make_fastmask):
    """The step functions, each over its own copy of ``problem``."""
    def copies():
        params = []
        for value, grad, _ in problem:
            p = torch.nn.Parameter(value.clone())
            p.grad = grad.clone()
            params.append(p)
        return params

    eager_params = copies()
    eager_opt = make_torch(eager_params, foreach=False)
    eager_pairs = [(p, m.float()) for p, (_, _, m) in zip(eager_params, problem) if m is not None]

    def eager_loop():
        for p, mask in eager_pairs:
            p.grad.mul_(mask)
        eager_opt.step()
        with torch.no_grad():
            for p, mask in eager_pairs:
                p.mul_(mask)

    def masked_by_foreach(**implementation):
        params = copies()
        opt = make_torch(params, **implementation)
        masked = [p for p, (_, _, m) in zip(params, problem) if m is not None]
        masks = [m.float() for _, _, m in problem if m is not None]
        grads = [p.grad for p in masked]

        def step():
            torch._foreach_mul_(grads, masks)
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(masked, masks)

        return step

    ours = copies()
    our_opt = make_fastmask(ours, {p: m for p, (_, _, m) in zip(ours, problem) if m is not None})
    return {"eager_loop": eager_loop, "foreach": masked_by_foreach(foreach=True),
            "fused_foreach": masked_by_foreach(fused=True), "fastmask": our_opt.step}


OPTIMIZERS = {  # name -> (torch optimizer, fastmask optimizer, state values per parameter value)
    "sgd": (lambda params, **impl: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, **impl),
            lambda params, masks: MaskedSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, masks=masks), 1,
            "SGD momentum=0.9 wd=5e-4"),
    "adamw": (lambda params, **impl: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **impl),
              lambda params, masks: MaskedAdamW(params, lr=1e-3, weight_decay=1e-2, masks=masks), 2,
              "AdamW wd=1e-2"),
}


@pytest.mark.parametrize("c", CASES)
def bench_masked_optimizer_step_resnet18(bench, roofline, c):
    make_torch, make_fastmask, state_values_per_param, described = OPTIMIZERS[c.optimizer]
    problem = make_problem(c.width, bench.device)
    numel = sum(v.numel() for v, _, _ in problem)
    masked = sum(v.numel() for v, _, m in problem if m is not None)
    assert len(problem) == 62
    if c.width == 64:
        assert numel == 11_173_962, numel
    # Read param, grad, state; write param, state (float32); read one mask byte per masked value.
    traffic = 4 * numel * (3 + 2 * state_values_per_param) + masked
    times = bench.measure(contenders(problem, make_torch, make_fastmask))
    extra = {}
    if roofline is not None:
        roofline_ms = traffic / roofline["hbm_bytes_per_s"] * 1e3
        extra = {"roofline_ms": roofline_ms, "fraction_of_hbm": roofline_ms / medians(times)["fastmask"]}
    bench.row(f"resnet18-cifar width {c.width} {described}, 90% sparse", times, baseline="eager_loop",
              speedup_vs_fused_foreach=bench.speedup(times, "fastmask", "fused_foreach"),
              speedup_vs_foreach=bench.speedup(times, "fastmask", "foreach"), **extra, bytes_moved=traffic,
              num_tensors=len(problem), num_values=numel, sparsity=SPARSITY)
