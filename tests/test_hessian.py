"""Hutchinson Hessian diagonal, trace and top eigenvalue against exact Hessians (float64, CPU),
and the probe / accumulation kernels against their torch references."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import prune

from fastmask import hessian
from fastmask.hessian import hessian_diag, top_eigenvalue
from fastmask.ops import hutchinson as hutchinson_ops
from fastmask.ops.hutchinson import (accumulate_probes_reference, philox4x32, rademacher_probes,
                                     rademacher_probes_reference)

DT = torch.float64


# ----------------------------------------------------------------------------- models and exact Hessians


class MaskedLinearStub(nn.Linear):
    """A masked linear as fastmask.nn defines them: a boolean ``mask`` buffer, weight * mask."""

    def __init__(self, *args, density=0.6, generator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.rand(self.weight.shape, generator=generator) < density)

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MaskIgnoringLinear(MaskedLinearStub):
    """Carries a mask but computes with the dense weight: the Hessian is dense, so only probing
    restricted to the unpruned entries gives the restricted statistics."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def mlp(first=nn.Linear, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(first(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(DT)


def conv_net():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(12, 4)).to(DT)
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return model


def classification_batches(input_shape, sizes=(13, 7), classes=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *input_shape, generator=g, dtype=DT), torch.randint(0, classes, (size,), generator=g))
            for size in sizes]


def cross_entropy(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets)


def exact_hessian(model, loss_fn, batches):
    """The Hessian of the size-weighted mean loss over ``batches`` w.r.t. the flattened trainable
    parameters (named_parameters order), by torch.autograd.functional.hessian, in eval mode."""
    named = [(name, p.detach()) for name, p in model.named_parameters() if p.requires_grad]
    total = sum(x.shape[0] for x, _ in batches)

    def mean_loss(flat):
        params, offset = {}, 0
        for name, p in named:
            params[name] = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        return sum(loss_fn(functional_call(model, params, (x,)), y) * x.shape[0] for x, y in batches) / total

    was_training = model.training
    model.eval()
    try:
        return torch.autograd.functional.hessian(mean_loss, torch.cat([p.reshape(-1) for _, p in named]),
                                                 vectorize=True)
    finally:
        model.train(was_training)


def flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def probed_mask(model) -> torch.Tensor:
    """True at the entries hessian_diag probes (mask buffers, dense elsewhere), flat."""
    pieces = []
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        leaf = name.rpartition(".")[2]
        mask = getattr(owner, "mask", None) if leaf == "weight" else getattr(owner, leaf[:-5] + "_mask", None)
        pieces.append((mask != 0 if mask is not None else torch.ones_like(p, dtype=torch.bool)).reshape(-1))
    return torch.cat(pieces)


def check_against_exact(result, H, keep):
    """The estimate agrees with the exact Hessian H restricted to the probed entries ``keep``."""
    Hk = H[keep][:, keep]
    est, se = flat(result.diag), flat(result.stderr)
    assert (est[~keep] == 0).all() and (se[~keep] == 0).all()
    est, se = est[keep], se[keep]
    exact = Hk.diagonal()
    scale = exact.abs().max()
    within = (est - exact).abs() <= 3 * se + 1e-12 * scale
    assert within.double().mean() >= 0.95, f"only {within.double().mean():.3f} of entries within 3 stderr"
    # and the errors are the size the stderr says (a 5% bias already shows here)
    spread = se > 0
    rms = ((est - exact)[spread] / se[spread]).square().mean().sqrt().item()
    assert 0.75 < rms < 1.25, f"standardised errors have RMS {rms:.3f}"
    # Rademacher probes: Var(z_i (Hz)_i) = sum_{j != i} H_ij^2 exactly, so the stderr is checkable too
    var_exact = Hk.square().sum(1) - exact.square()
    var_est = se.square() * result.num_probes
    big = var_exact > 1e-3 * var_exact.max()
    ratio = var_est[big] / var_exact[big]
    assert big.sum() > 10 and ratio.min() > 0.75 and ratio.max() < 1.33, (ratio.min(), ratio.max())
    exact_trace = exact.sum().item()
    assert abs(result.trace - exact_trace) <= 3 * result.trace_stderr
    # Var(z^T H z) = 2 sum_{i != j} H_ij^2
    trace_se_exact = math.sqrt(2 * (Hk.square().sum() - exact.square().sum()).item() / result.num_probes)
    assert 0.9 < result.trace_stderr / trace_se_exact < 1.1
    assert result.num_entries == int(keep.sum())
    assert result.diag_mean == pytest.approx(est.mean().item(), rel=1e-9)
    assert result.diag_max == pytest.approx(est.max().item(), rel=1e-9)


def check_top_eigenvalue(model, loss_fn, batches, H, keep):
    eigenvalues = torch.linalg.eigvalsh(H[keep][:, keep])
    expected = eigenvalues[eigenvalues.abs().argmax()].item()
    value, vector = top_eigenvalue(model, loss_fn, batches, iters=2000, tol=1e-7, seed=4, return_vector=True)
    assert value == pytest.approx(expected, rel=0.01)
    v = flat(vector)
    assert v.norm().item() == pytest.approx(1.0) and (v[~keep] == 0).all()


# ----------------------------------------------------------------------------- estimates vs exact


NUM_PROBES = 2000


def test_quadratic_loss_with_known_hessian():
    """Least squares 0.5 * mean (w.x + b - y)^2: H = mean of [x, 1][x, 1]^T, exactly."""
    torch.manual_seed(5)
    model = nn.Linear(40, 1).to(DT)
    g = torch.Generator().manual_seed(6)
    scales = torch.linspace(0.3, 2.0, 40, dtype=DT)
    batches = [(torch.randn(n, 40, generator=g, dtype=DT) * scales, torch.randn(n, generator=g, dtype=DT))
                for n in (29, 50, 4)]

    def half_mse(outputs, targets):
        return 0.5 * (outputs.squeeze(1) - targets).square().mean()

    x1 = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1) for x, _ in batches])
    H = x1.T @ x1 / len(x1)
    keep = torch.ones(41, dtype=torch.bool)
    result = hessian_diag(model, half_mse, iter(batches), num_probes=NUM_PROBES, probe_batch=700, seed=11)
    check_against_exact(result, H, keep)
    assert set(result.layers) == {""} and result.layers[""].mass_fraction == pytest.approx(1.0)
    check_top_eigenvalue(model, half_mse, batches, H, keep)


def test_mlp_matches_exact_hessian():
    model = mlp()
    batches = classification_batches((6,))
    H = exact_hessian(model, cross_entropy, batches)
    result = hessian_diag(model, cross_entropy, batches, num_probes=NUM_PROBES, probe_batch=700, seed=12)
    assert result.diag["0.weight"].shape == (12, 6) and result.diag["2.bias"].dtype == DT
    check_against_exact(result, H, torch.ones(len(H), dtype=torch.bool))
    layers = result.layers
    assert set(layers) == {"0", "2"} and layers["2"].parameters == ("2.weight", "2.bias")
    assert layers["0"].mass_fraction + layers["2"].mass_fraction == pytest.approx(1.0)
    d0 = torch.cat([result.diag["0.weight"].reshape(-1), result.diag["0.bias"]])
    assert layers["0"].mean == pytest.approx(d0.mean().item()) and layers["0"].max == pytest.approx(d0.max().item())
    assert layers["0"].num_entries == 84
    check_top_eigenvalue(model, cross_entropy, batches, H, torch.ones(len(H), dtype=torch.bool))


def test_conv_net_with_batchnorm_in_eval_mode():
    model = conv_net().train()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    batches = classification_batches((2, 4, 4), sizes=(8, 4))
    H = exact_hessian(model, cross_entropy, batches)
    result = hessian_diag(model, cross_entropy, batches, num_probes=NUM_PROBES, probe_batch=700, seed=13)
    check_against_exact(result, H, torch.ones(len(H), dtype=torch.bool))
    assert model.training and bn.training
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    check_top_eigenvalue(model, cross_entropy, batches, H, torch.ones(len(H), dtype=torch.bool))
    assert model.training


@pytest.mark.parametrize("layer", [MaskedLinearStub, MaskIgnoringLinear])
def test_masked_entries_are_not_probed(layer):
    g = torch.Generator().manual_seed(7)
    model = mlp(lambda i, o: layer(i, o, generator=g))
    batches = classification_batches((6,))
    H = exact_hessian(model, cross_entropy, batches)
    keep = probed_mask(model)
    pruned = int((~keep).sum())
    assert pruned > 10
    if layer is MaskIgnoringLinear:  # the dense Hessian couples pruned entries: probing them would show
        assert H.diagonal()[~keep].abs().min() > 0
    result = hessian_diag(model, cross_entropy, batches, num_probes=NUM_PROBES, probe_batch=700, seed=14)
    check_against_exact(result, H, keep)
    assert result.layers["0"].num_entries == 84 - pruned
    check_top_eigenvalue(model, cross_entropy, batches, H, keep)


def test_torch_prune_reparametrisation_is_masked():
    model = mlp(seed=8)
    torch.manual_seed(9)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    batches = classification_batches((6,))
    H = exact_hessian(model, cross_entropy, batches)
    keep = probed_mask(model)
    assert int((~keep).sum()) == 24
    result = hessian_diag(model, cross_entropy, batches, num_probes=NUM_PROBES, probe_batch=700, seed=15)
    assert "2.weight_orig" in result.diag
    check_against_exact(result, H, keep)


# ----------------------------------------------------------------------------- determinism, dtypes, paths


def test_same_seed_same_result_and_batching_does_not_change_probes():
    model = conv_net()
    batches = classification_batches((2, 4, 4), sizes=(6, 3))
    first = hessian_diag(model, cross_entropy, batches, num_probes=20, probe_batch=7, seed=21)
    again = hessian_diag(model, cross_entropy, batches, num_probes=20, probe_batch=7, seed=21)
    assert torch.equal(flat(first.diag), flat(again.diag)) and first.trace == again.trace
    assert torch.equal(flat(first.stderr), flat(again.stderr))
    rebatched = hessian_diag(model, cross_entropy, batches, num_probes=20, probe_batch=20, seed=21)
    torch.testing.assert_close(flat(rebatched.diag), flat(first.diag), rtol=1e-10, atol=1e-12)
    assert rebatched.trace_stderr == pytest.approx(first.trace_stderr, rel=1e-9)
    other = hessian_diag(model, cross_entropy, batches, num_probes=20, probe_batch=7, seed=22)
    assert not torch.allclose(flat(other.diag), flat(first.diag))


def test_progress_bar_counts_the_probes(monkeypatch):
    bars = []

    class Recorded(hessian.tqdm):
        def close(self):
            if not self.disable:
                bars.append((self.desc, self.total, self.n))
            super().close()

    monkeypatch.setattr(hessian, "tqdm", Recorded)
    model = conv_net()
    batches = classification_batches((2, 4, 4), sizes=(6, 3))
    quiet = hessian_diag(model, cross_entropy, batches, num_probes=20, probe_batch=7, seed=21)
    shown = hessian_diag(model, cross_entropy, batches, num_probes=20, probe_batch=7, seed=21, progress=True,
                         description="hessian dense")
    assert torch.equal(flat(shown.diag), flat(quiet.diag))
    assert bars == [("hessian dense", 20, 20)]


def test_probe_batch_that_runs_out_of_memory_is_retried_smaller(monkeypatch):
    """On CUDA a measured probe batch that still runs out of memory is retried at half its size,
    with the same probes (simulated on the CPU: a batcher past its measurement, a memory limit)."""
    model = conv_net()
    batches = classification_batches((2, 4, 4), sizes=(6, 3))

    class MeasuredBatcher(hessian._ProbeBatcher):
        def __init__(self, probe_batch, num_probes, device, **sizes):
            super().__init__(None, num_probes, torch.device("cuda"), **sizes)
            self.measuring, self.peaks, self.size = False, [(1, 0), (2, 0)], 8  # as if 8 probes fit

    accumulate, sizes = hessian.accumulate_probes, []

    def limited_memory(z, hz, count, mean, m2):
        sizes.append(z.shape[0])
        if z.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return accumulate(z, hz, count, mean, m2)

    monkeypatch.setattr(hessian, "_ProbeBatcher", MeasuredBatcher)
    monkeypatch.setattr(hessian, "accumulate_probes", limited_memory)
    retried = hessian_diag(model, cross_entropy, batches, num_probes=11, seed=4)
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 1]
    monkeypatch.undo()
    expected = hessian_diag(model, cross_entropy, batches, num_probes=11, probe_batch=2, seed=4)
    torch.testing.assert_close(flat(retried.diag), flat(expected.diag), rtol=1e-10, atol=1e-12)
    assert retried.trace == pytest.approx(expected.trace, rel=1e-12)
    assert not hessian._ProbeBatcher(4, 11, torch.device("cuda")).shrink(4)  # a size the caller gave stays
    assert not MeasuredBatcher(None, 11, None).shrink(1)


def test_cuda_probe_batch_size_from_the_measured_peaks(monkeypatch):
    """CUDA's probe batches after the two measured ones: the second probe's cost against the free
    memory, at most ``CUDA_PROBE_BYTES``; with 2 probes in all both measured batches hold one (seen
    on an H200 with ``hessian.num_probes=2``: a division by zero), and the whole peak per probe counts."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**9, 2 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    batcher = hessian._ProbeBatcher(None, 2, torch.device("cuda"))
    assert [batcher.next_size(0), (batcher.peaks.append((1, 100)), batcher.next_size(1))[1]] == [1, 1]
    batcher.peaks.append((1, 125))
    assert batcher._fitting_size() == int(batcher.MEMORY_FRACTION * 10**9 // 125)
    batcher.peaks[:] = [(1, 100), (2, 150)]  # the usual case: the second probe's cost, 50
    assert batcher._fitting_size() == int((batcher.MEMORY_FRACTION * 10**9 - 50) // 50)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**12, 2 * 10**12))  # a large card
    assert batcher._fitting_size() == batcher.CUDA_PROBE_BYTES // 50  # the probes' bytes at most CUDA_PROBE_BYTES


def test_float32_model_agrees_with_float64():
    model64 = mlp(lambda i, o: MaskedLinearStub(i, o, generator=torch.Generator().manual_seed(3)))
    batches64 = classification_batches((6,))
    model32 = mlp(lambda i, o: MaskedLinearStub(i, o, generator=torch.Generator().manual_seed(3))).float()
    batches32 = [(x.float(), y) for x, y in batches64]
    r64 = hessian_diag(model64, cross_entropy, batches64, num_probes=32, seed=5)
    r32 = hessian_diag(model32, cross_entropy, batches32, num_probes=32, seed=5)
    assert r32.diag["0.weight"].dtype == torch.float32
    torch.testing.assert_close(flat(r32.diag).double(), flat(r64.diag), rtol=1e-4, atol=1e-5)
    assert r32.trace == pytest.approx(r64.trace, rel=1e-4)


class SquareWithoutVmap(torch.autograd.Function):
    """x^2 as an autograd.Function with neither a vmap rule nor a jvp: forward-mode under vmap fails."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 2 * x * grad_output


class Square(nn.Module):
    def __init__(self, custom: bool):
        super().__init__()
        self.custom = custom

    def forward(self, x):
        return SquareWithoutVmap.apply(x) if self.custom else x * x


def test_falls_back_to_reverse_over_reverse(monkeypatch):
    monkeypatch.setattr(hessian._MeanLossHessian, "VMAP_MODES", ("forward-over-reverse", "reverse-over-reverse"))
    batches = classification_batches((6,))
    plain = mlp()
    plain[1] = Square(custom=False)
    custom = mlp()
    custom[1] = Square(custom=True)
    expected = hessian_diag(plain, cross_entropy, batches, num_probes=8, seed=3)
    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        got = hessian_diag(custom, cross_entropy, batches, num_probes=8, seed=3)
    torch.testing.assert_close(flat(got.diag), flat(expected.diag), rtol=1e-10, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        got_top = top_eigenvalue(custom, cross_entropy, batches, iters=30, seed=1)
    assert got_top == pytest.approx(top_eigenvalue(plain, cross_entropy, batches, iters=30, seed=1), rel=1e-10)


@pytest.mark.parametrize("masked", [False, True])
def test_every_product_mode_gives_the_same_estimate(monkeypatch, masked):
    """Double backward per probe (the CPU's way) and both vmapped ways (CUDA's): one diagonal."""
    model = conv_net()
    if masked:
        prune.random_unstructured(model[0], "weight", amount=0.4)
        prune.random_unstructured(model[5], "weight", amount=0.3)
    batches = classification_batches((2, 4, 4), sizes=(6, 3))
    results = {}
    for mode in hessian._MeanLossHessian.VMAP_MODES:
        monkeypatch.setattr(hessian._MeanLossHessian, "VMAP_MODES", (mode,))
        results[mode] = hessian_diag(model, cross_entropy, batches, num_probes=10, probe_batch=4, seed=2)
    first = results.pop("double-backward")
    assert first.num_entries < sum(p.numel() for p in model.parameters()) or not masked
    for other in results.values():
        torch.testing.assert_close(flat(other.diag), flat(first.diag), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(flat(other.stderr), flat(first.stderr), rtol=1e-10, atol=1e-12)
        assert other.trace == pytest.approx(first.trace, rel=1e-12)


def test_cpu_takes_double_backward_for_all_but_small_models(monkeypatch):
    model = mlp()
    batches = classification_batches((6,))
    n = sum(p.numel() for p in model.parameters())
    assert hessian._MeanLossHessian(model, cross_entropy, batches).modes[0] == "forward-over-reverse"
    monkeypatch.setattr(hessian._MeanLossHessian, "CPU_DOUBLE_BACKWARD_ENTRIES", n)
    assert hessian._MeanLossHessian(model, cross_entropy, batches).modes[0] == "double-backward"


def test_triton_path_matches_torch_path(triton_backend, monkeypatch):
    """The whole estimator with the kernels (the interpreter on CPU) against the torch references."""
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinearStub(3, 4, generator=torch.Generator().manual_seed(1)), nn.Tanh(),
                          nn.Linear(4, 2))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g))]
    kernels = hessian_diag(model, cross_entropy, batches, num_probes=6, probe_batch=4, seed=9)
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    reference = hessian_diag(model, cross_entropy, batches, num_probes=6, probe_batch=4, seed=9)
    torch.testing.assert_close(flat(kernels.diag), flat(reference.diag), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(kernels.stderr), flat(reference.stderr), rtol=1e-4, atol=1e-6)
    assert kernels.trace == pytest.approx(reference.trace, rel=1e-5)


def test_summary_keys_and_saving():
    from safetensors.torch import load, save

    result = hessian_diag(mlp(), cross_entropy, classification_batches((6,)), num_probes=4)
    assert result.summary() == {"trace": result.trace, "trace_stderr": result.trace_stderr,
                                "diag_mean": result.diag_mean, "diag_max": result.diag_max, "num_probes": 4}
    loaded = load(save(result.diag))  # separate tensors: safetensors refuses shared storage
    assert all(torch.equal(loaded[name], d) for name, d in result.diag.items())


# ----------------------------------------------------------------------------- kernels vs references


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (key = (seed mod 2^32, seed div 2^32))."""
    cases = [((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, 0xFFFFFFFF_FFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0_A4093822,
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        assert tuple(int(word) for word in philox4x32(key, *counter)) == expected


@pytest.mark.parametrize("seed", [0, 12345, (1 << 40) + 7])
@pytest.mark.parametrize("masked", [False, True])
def test_rademacher_kernel_matches_reference(triton_backend, seed, masked):
    n = 1037  # odd, over one block of the kernel
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(seed % 97)) > 0.3) if masked else None
    got = rademacher_probes(seed, 5, 3, n, mask, torch.float32, "cpu")
    expected = rademacher_probes_reference(seed, 5, 3, n, mask, torch.float32, "cpu")
    assert torch.equal(got, expected)
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask
    assert (got[:, keep].abs() == 1).all() and (got[:, ~keep] == 0).all()
    assert abs(got[:, keep].mean().item()) < 0.1  # balanced signs
    # probe p depends on (seed, p) only: a different split gives the same rows
    assert torch.equal(rademacher_probes(seed, 6, 2, n, mask, torch.float32, "cpu"), got[1:])


def test_reference_probes_are_independent_of_chunking(monkeypatch):
    whole = rademacher_probes_reference(3, 0, 4, 1037, dtype=DT)
    monkeypatch.setattr(hutchinson_ops, "_REFERENCE_CHUNK", 4 * 2 * hutchinson_ops.ENTRIES_PER_DRAW)  # 2 draws a step
    assert torch.equal(rademacher_probes_reference(3, 0, 4, 1037, dtype=DT), whole)
    assert not torch.equal(whole[0], whole[1])


@pytest.mark.parametrize("entry", [0, 37, 127, 128, 200, 1036])
def test_probe_entries_are_the_bits_of_philox_draws(entry):
    """Entry e of probe p: bit e mod 32 of word (e div 32) mod 4 of the draw at counter e div 128."""
    seed, probe = 99, 3
    words = philox4x32(seed, entry // 128, 0, probe, 0)
    bit = (int(words[(entry // 32) % 4]) >> (entry % 32)) & 1
    assert rademacher_probes_reference(seed, probe, 1, 1037, dtype=DT)[0, entry].item() == 1 - 2 * bit


@pytest.mark.parametrize("count", [0, 7])
def test_welford_kernel_matches_float64(triton_backend, count):
    from fastmask.ops.hutchinson import accumulate_probes

    g = torch.Generator().manual_seed(count)
    n, probes = 1031, 5
    earlier = torch.randn(count, n, generator=g, dtype=DT) * 2 + 1  # the samples already merged
    z = torch.randn(probes, n, generator=g)
    hz = torch.randn(probes, n, generator=g) + 0.5
    mean = earlier.mean(0) if count else torch.zeros(n, dtype=DT)
    m2 = (earlier - mean).square().sum(0)
    x = z.double() * hz.double()
    everything = torch.cat([earlier, x])
    expected_mean = everything.mean(0)
    expected_m2 = (everything - expected_mean).square().sum(0)
    for run in (accumulate_probes, accumulate_probes_reference):
        got_mean, got_m2, sums = run(z, hz, count, mean.float(), m2.float())
        assert got_mean.dtype == torch.float32
        torch.testing.assert_close(got_mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_m2.double(), expected_m2, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sums.double(), x.sum(1), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_probes": 1}, ValueError, "num_probes"),
    ({"num_probes": 2.5}, TypeError, "num_probes"),
    ({"probe_batch": 0}, ValueError, "probe_batch"),
    ({"seed": -1}, ValueError, "seed"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        hessian_diag(mlp(), cross_entropy, classification_batches((6,)), **kwargs)


def test_bad_inputs():
    batches = classification_batches((6,))
    with pytest.raises(TypeError, match="model"):
        hessian_diag(lambda x: x, cross_entropy, batches)
    with pytest.raises(TypeError, match="loss_fn"):
        hessian_diag(mlp(), "cross_entropy", batches)
    with pytest.raises(ValueError, match="data"):
        hessian_diag(mlp(), cross_entropy, [])
    with pytest.raises(TypeError, match="data"):
        hessian_diag(mlp(), cross_entropy, [batches[0][0]])
    with pytest.raises(ValueError, match="loss_fn"):
        hessian_diag(mlp(), lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), batches)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        hessian_diag(frozen, cross_entropy, batches)
    broken = mlp()
    broken[0].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hessian_diag(broken, cross_entropy, batches)
    nan_data = [(torch.full_like(batches[0][0], float("nan")), batches[0][1])]
    with pytest.raises(ValueError, match="not finite"):
        hessian_diag(mlp(), cross_entropy, nan_data, num_probes=2)
    with pytest.raises(ValueError, match="iters"):
        top_eigenvalue(mlp(), cross_entropy, batches, iters=0)
    with pytest.raises(ValueError, match="tol"):
        top_eigenvalue(mlp(), cross_entropy, batches, tol=-1.0)


def test_hessian_stage_takes_exactly_the_configured_examples():
    """hessian.examples not a multiple of hessian.batch_size: the last batch is cut at that count."""
    from types import SimpleNamespace

    from fastmask.data import Dataset
    from fastmask.stages import hessian as hessian_stage

    train = Dataset(torch.randn(700, 1, 4, 4), torch.randint(0, 3, (700,)), 3, "noise", torch.zeros(1), torch.ones(1))
    ctx = SimpleNamespace(cfg=SimpleNamespace(hessian=SimpleNamespace(examples=300, batch_size=256)),
                          splits=SimpleNamespace(train=train))
    batches = hessian_stage.batches_of(ctx)
    assert [len(y) for _, y in batches] == [256, 44]
    assert torch.equal(torch.cat([x for x, _ in batches]), train.images[:300])
    ctx.cfg.hessian.examples = 5000  # more than the data: all of it
    assert sum(len(y) for _, y in hessian_stage.batches_of(ctx)) == 700
