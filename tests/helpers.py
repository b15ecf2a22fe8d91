"""Shared test helpers: float64 references with dtype-dependent error bounds."""
import torch

# Normwise relative error bounds by the dtype the kernel computed in (docs/design.md, "Measuring").
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 3e-3,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |actual - expected| / max |expected| (or / max |scale|), in float64; NaN anywhere counts
    as infinite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = (expected if scale is None else scale.detach().double().cpu()).abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def assert_close(actual, expected, dtype=torch.float32, what="output", scale=None):
    """Assert ``actual`` matches the float64 ``expected`` within the bound for ``dtype``, relative to
    max |expected|, or to max |scale| where ``expected`` may be a cancellation: a weight gradient's
    few kept entries at high sparsity can each sum to almost nothing, where float32's rounding of
    the sum is then large against them (scale: the unmasked gradient)."""
    err = rel_error(actual, expected, scale)
    bound = REL_TOL[dtype]
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:g} ({dtype})"


def to64(*tensors):
    return [None if t is None else t.detach().double() for t in tensors]


def without_times(results: dict) -> dict:
    """A results.json without its wall-clock fields (they differ between runs)."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("seconds", "timings", "completed")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(results)
