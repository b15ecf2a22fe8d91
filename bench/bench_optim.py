"""One masked optimizer step over CIFAR ResNet-18's parameters (62 tensors, 11.17M values) at 90%
sparsity of the conv and linear weights (BatchNorm and the fc bias dense).

Contenders, each on its own copy of the tensors:

- ``eager_loop``: what researchers write: ``torch.optim`` with ``foreach=False``, and per masked
  tensor ``grad.mul_(mask)`` before the step and ``param.mul_(mask)`` after it (float masks, as
  ``torch.nn.utils.prune`` keeps them).
- ``fused_foreach``: ``torch.optim``'s ``fused=True`` step with ``torch._foreach_mul_`` masking
  the gradients before and the parameters after it.
- ``fastmask``: ``MaskedSGD`` / ``MaskedAdamW``, one launch per step.

The roofline is the fused kernel's traffic (it reads every parameter, gradient, state value and
mask byte, and writes every parameter and state value) over the HBM bandwidth measured in the same
session; ``fraction_of_hbm`` is roofline time over measured time. Targets (issue 4, SGD):
>= 10x vs eager_loop, >= 1.5x vs fused_foreach, >= 0.7 of the measured bandwidth.
"""
import torch

from fastmask.optim import MaskedAdamW, MaskedSGD

SPARSITY = 0.9


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
    """The three step functions, each over its own copy of ``problem``."""
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

    fused_params = copies()
    fused_opt = make_torch(fused_params, fused=True)
    fused_masked = [p for p, (_, _, m) in zip(fused_params, problem) if m is not None]
    fused_masks = [m.float() for _, _, m in problem if m is not None]
    fused_grads = [p.grad for p in fused_masked]

    def fused_foreach():
        torch._foreach_mul_(fused_grads, fused_masks)
        fused_opt.step()
        with torch.no_grad():
            torch._foreach_mul_(fused_masked, fused_masks)

    ours = copies()
    our_opt = make_fastmask(ours, {p: m for p, (_, _, m) in zip(ours, problem) if m is not None})
    return {"eager_loop": eager_loop, "fused_foreach": fused_foreach, "fastmask": our_opt.step}


def run_case(bench, roofline, case, make_torch, make_fastmask, state_values_per_param):
    width = 4 if bench.smoke else 64
    problem = make_problem(width, bench.device)
    numel = sum(v.numel() for v, _, _ in problem)
    masked = sum(v.numel() for v, _, m in problem if m is not None)
    if not bench.smoke:
        assert len(problem) == 62 and numel == 11_173_962, (len(problem), numel)
    # Read param, grad, state; write param, state (float32); read one mask byte per masked value.
    traffic = 4 * numel * (3 + 2 * state_values_per_param) + masked
    times = {name: bench.time(fn) for name, fn in contenders(problem, make_torch, make_fastmask).items()}
    roofline_ms = traffic / roofline["hbm_bytes_per_s"] * 1e3
    bench.row(case, times, baseline="eager_loop",
              speedup_vs_fused_foreach=times["fused_foreach"] / times["fastmask"],
              roofline_ms=roofline_ms, fraction_of_hbm=roofline_ms / times["fastmask"], bytes_moved=traffic,
              num_tensors=len(problem), num_values=numel, sparsity=SPARSITY)


def bench_masked_sgd_step_resnet18(bench, roofline):
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    run_case(bench, roofline, "resnet18-cifar SGD momentum=0.9 wd=5e-4, 90% sparse",
             lambda params, **impl: torch.optim.SGD(params, **hyper, **impl),
             lambda params, masks: MaskedSGD(params, masks=masks, **hyper), state_values_per_param=1)


def bench_masked_adamw_step_resnet18(bench, roofline):
    hyper = dict(lr=1e-3, weight_decay=1e-2)
    run_case(bench, roofline, "resnet18-cifar AdamW wd=1e-2, 90% sparse",
             lambda params, **impl: torch.optim.AdamW(params, **hyper, **impl),
             lambda params, masks: MaskedAdamW(params, masks=masks, **hyper), state_values_per_param=2)
