"""Hutchinson Hessian diagonal (64 probes, batch 256 of CIFAR-shaped data): fastmask against the
loop researchers write, one Rademacher vector and one double-backward Hessian-vector product at
a time with a host sync per probe, as PyHessian's ``trace`` does.

Contenders, each giving the diagonal and the per-probe traces:
- ``loop``: the baseline above (the graph of the gradient built once, 64 double backwards);
- ``fastmask``: ``hessian_diag`` as shipped (forward-over-reverse, ``probe_batch`` chosen to fit
  the free memory: its peak memory is that fill target, about 80% of what was free, by design);
- ``fastmask_probe_batch_8``: the same with 8 probes per batch, whose peak memory says what the
  batched products cost;
- ``fastmask_reverse``: the same with reverse-over-reverse products (``_MeanLossHessian.MODES``),
  to see which kind of product the default should be on this GPU.
torch.compile of the loop is not a contender: compiled graphs do not support double backward.

The models are fastmask.models' ConvNet-3 (instance norm, the distillation standard) and CIFAR
ResNet-18 (batch norm, in eval mode), with their all-ones masks: the loop runs them through the
masked ops as a user would, fastmask through torch.func (where the masked ops use plain torch).

Run: .venv/bin/python -m pytest bench/bench_hessian.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
import pytest
import torch
import torch.nn.functional as F

from fastmask import hessian, models
from fastmask.hessian import hessian_diag

NUM_PROBES = 64
BATCH = 256
CLASSES = 10


def one_probe_at_a_time(model, x, y, num_probes, seed=0):
    """The baseline: diag and per-probe traces from one double-backward product per probe."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    diag = [torch.zeros_like(p) for p in params]
    traces = []
    for _ in range(num_probes):
        v = [torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=p.dtype) * 2 - 1
             for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        products = [vi * hvi for vi, hvi in zip(v, hv)]
        for d, product in zip(diag, products):
            d.add_(product)
        traces.append(sum(product.sum() for product in products).item())
    return [d / num_probes for d in diag], traces


@pytest.mark.parametrize("arch", ["convnet3", "resnet18"])
def bench_hessian_diag(bench, monkeypatch, arch):
    # smoke (CPU): the same code on tiny sizes, once each
    size, batch, probes = (8, 2, 4) if bench.smoke else (32, BATCH, NUM_PROBES)
    torch.manual_seed(0)
    options = {"width": 8} if bench.smoke else {}
    model = models.create(arch, CLASSES, (3, size, size), **options).to(bench.device)
    x = torch.randn(batch, 3, size, size, device=bench.device)
    y = torch.randint(0, CLASSES, (batch,), device=bench.device)
    data = [(x, y)]

    def loop():
        return one_probe_at_a_time(model, x, y, probes)

    def fastmask():
        return hessian_diag(model, F.cross_entropy, data, num_probes=probes, seed=0)

    def fastmask_probe_batch_8():
        return hessian_diag(model, F.cross_entropy, data, num_probes=probes, probe_batch=8, seed=0)

    times, peaks = {}, {}
    for name, fn in [("loop", loop), ("fastmask", fastmask), ("fastmask_probe_batch_8", fastmask_probe_batch_8)]:
        times[name] = bench.time(fn)
        peaks[name] = bench.peak_memory(fn)
    with monkeypatch.context() as patch:
        patch.setattr(hessian._MeanLossHessian, "MODES", ("reverse-over-reverse",))
        times["fastmask_reverse"] = bench.time(fastmask)
        peaks["fastmask_reverse"] = bench.peak_memory(fastmask)
    bench.row(f"{arch} batch={batch} probes={probes} {size}x{size}", times, baseline="loop",
              peak_memory_bytes=peaks, parameters=sum(p.numel() for p in model.parameters()))
    if not bench.smoke:
        print("peak memory (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in peaks.items()))
