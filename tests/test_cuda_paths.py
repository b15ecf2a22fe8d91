"""The code that only a GPU reaches, run on the CPU: the kernels' split-K and autotuning in the
interpreter, and, with ``torch.cuda`` faked, the per-shape Triton-vs-cuDNN choice, the CUDA-graph
training step, the fused optimizer's address tables, and LMC's chunk from the free memory."""
import contextlib
import time

import pytest
import torch
import torch.nn.functional as F

from fastmask import combinations, lmc, models, ops
from fastmask.ops import _common as ops_common
from fastmask import train as train_module
from fastmask.kernels import _config, masked_conv, masked_optim
from fastmask.optim import MaskedSGD
from fastmask.stack import Stack
from helpers import assert_close


def _conv_problem(K, N, shared=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1 if shared else K, N, 3, 7, 6, generator=generator)
    w = torch.randn(K, 4, 3, 3, 3, generator=generator)
    m = torch.rand(w.shape, generator=generator) < 0.6
    return x, w, m


def _conv64(x, w, m, k):
    return F.conv2d(x[0 if x.shape[0] == 1 else k].double(), (w[k] * m[k]).double(), padding=1)


# ----------------------------------------------------------------------------- split-K grad-weight


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model-input", "shared-input"])
def test_split_k_grad_weight_in_the_interpreter(triton_backend, monkeypatch, splits, shared):
    """Grad-weight with its pixel reduction split as on a GPU: 3 x 7 x 6 = 126 pixels, which no split
    divides evenly and whose slices end inside a BLOCK_K tile; the mask applied in each slice."""
    monkeypatch.setattr(masked_conv, "grad_weight_splits", lambda *args: splits)
    x, w, m = _conv_problem(K=2, N=3, shared=shared)
    grad_y = torch.randn(2, 3, 4, 7, 6)
    gw = masked_conv.conv_grad_weight(grad_y, x, w, m, (1, 1), [1, 1, 1, 1], (1, 1), False)
    for k in range(2):
        w64 = w[k].double().requires_grad_()
        y = F.conv2d(x[0 if shared else k].double(), w64 * m[k], padding=1)
        (expected,) = torch.autograd.grad(y, w64, grad_y[k].double())
        assert_close(gw[k], expected, what=f"grad weight of model {k}")
        assert (gw[k][~m[k]] == 0).all()


def test_grad_weight_splits_fill_the_gpu():
    cuda = torch.device("cuda")  # only its type is read
    assert masked_conv.grad_weight_splits(2, 64, 64 * 9, 128 * 32 * 32, cuda) == 14  # 18 tiles of 64 x 64
    assert masked_conv.grad_weight_splits(1, 16, 16 * 9, 256 * 32 * 32, cuda) == 64  # one tile: at most 64 slices
    assert masked_conv.grad_weight_splits(1, 16, 16 * 9, 1000, cuda) == 1  # under 1024 pixels a slice
    assert masked_conv.grad_weight_splits(1, 512, 512 * 9, 256 * 16, cuda) == 1  # 576 tiles fill it already
    assert masked_conv.grad_weight_splits(1, 16, 144, 2**20, torch.device("cpu")) == 1


# ----------------------------------------------------------------------------- the real autotuner


def test_autotuner_times_what_its_prune_hook_keeps_once_per_key(triton_backend, monkeypatch):
    """triton's Autotuner around the conv forward with three candidates, timed by a fake timer (each
    candidate still runs, in the interpreter): the prune hook keeps the FMA tiles of a float32
    'ieee' launch and the tensor-core tile of a TF32 one; a key is timed once, and it holds the
    batch's power-of-two bucket and the number of models."""
    tuner = masked_conv.conv_forward_kernel
    tensor_core, fma_small, fma_large = (_config._config(shape) for shape in
                                         ((32, 32, 32, 2, 4), (32, 32, 16, 3, 2), (32, 64, 16, 3, 4)))
    monkeypatch.setattr(tuner, "configs", [tensor_core, fma_small, fma_large])
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(_config, "interpreter_on", lambda: False)  # the GPU's prune hook and precision
    timed = []

    def fake_timer(kernel_call, quantiles):
        kernel_call()
        timed.append(tuner.cache.copy())
        return [2.0 if len(timed) % 2 else 1.0] * 3  # the second candidate of each key is faster

    monkeypatch.setitem(tuner.__dict__, "do_bench", fake_timer)

    def forward(K, N, allow_tf32=False, seed=0):
        x, w, m = _conv_problem(K, N, seed=seed)
        y = masked_conv.conv_forward(x, w, m, None, (1, 1), [1, 1, 1, 1], (1, 1), allow_tf32)
        for k in range(K):
            assert_close(y[k], _conv64(x, w, m, k))
        return tuner.best_config

    assert forward(K=1, N=3) is fma_large and len(timed) == 2  # the tensor-core tile pruned
    assert forward(K=1, N=4, seed=1) is fma_large and len(timed) == 2  # 3 and 4 images: one bucket
    assert forward(K=2, N=3) is fma_large and len(timed) == 4  # more models: tuned again
    assert forward(K=1, N=5) is fma_large and len(timed) == 6  # the next bucket: tuned again
    assert forward(K=1, N=3, allow_tf32=True) is tensor_core  # TF32 keeps the tensor-core tile only
    assert len(tuner.cache) == 4


def test_one_config_per_kind_launches_without_the_autotuner(triton_backend, monkeypatch):
    tuner = masked_conv.conv_forward_kernel
    monkeypatch.setattr(tuner, "configs", [_config._config(shape) for shape in _config.FMA_SHAPES[:2]])
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setitem(tuner.__dict__, "do_bench", lambda *args, **kwargs: pytest.fail("nothing is timed"))
    monkeypatch.setenv("FASTMASK_AUTOTUNE", "one")
    x, w, m = _conv_problem(K=2, N=3)
    y = masked_conv.conv_forward(x, w, m, None, (1, 1), [1, 1, 1, 1], (1, 1), False)
    for k in range(2):
        assert_close(y[k], _conv64(x, w, m, k))
    assert tuner.cache == {}
    monkeypatch.setattr(_config, "interpreter_on", lambda: False)
    assert _config._shape(_config.one_config(torch.float32, "ieee")) == _config.ONE_FMA_SHAPE
    assert _config._shape(_config.one_config(torch.float32, "tf32")) == _config.ONE_TENSOR_CORE_SHAPE
    assert _config._shape(_config.one_config(torch.bfloat16, "ieee")) == _config.ONE_TENSOR_CORE_SHAPE
    monkeypatch.setenv("FASTMASK_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="FASTMASK_AUTOTUNE"):
        _config.autotune_mode()


# ----------------------------------------------------------------------------- the per-shape choice


class FakeEvent:
    """A CUDA event on a clock the test moves (``clock``) or on the host's (``clock = None``)."""

    clock: list | None = None

    def __init__(self, enable_timing=False):
        self.time = None

    def record(self):
        self.time = FakeEvent.clock[0] if FakeEvent.clock is not None else time.perf_counter() * 1e3

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.time - self.time


@pytest.fixture
def fake_cuda_timing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(ops_common, "_fastest", {})
    monkeypatch.setattr(FakeEvent, "clock", None)
    monkeypatch.setenv("FASTMASK_BACKEND", "auto")


def test_pick_times_each_candidate_once_per_key(fake_cuda_timing, monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(FakeEvent, "clock", clock)

    def candidate(name, cost):
        def run():
            calls.append(name)
            clock[0] += cost
            return name
        return run

    fast_triton = {"triton": candidate("triton", 1.0), "torch": candidate("torch", 3.0)}
    assert ops_common._pick(("a",), fast_triton)() == "triton"
    assert calls.count("triton") == 3 + 10 + 1 and calls.count("torch") == 3 + 10  # warm-up, timed, the call
    calls.clear()
    assert ops_common._pick(("a",), fast_triton)() == "triton" and calls == ["triton"]  # cached: nothing timed
    slow_triton = {"triton": candidate("triton", 5.0), "torch": candidate("torch", 3.0)}
    assert ops_common._pick(("b",), slow_triton)() == "torch"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls.clear()
    assert ops_common._pick(("c",), fast_triton)() == "torch" and calls == ["torch"]  # no timing inside a capture
    assert ("c",) not in ops_common._fastest and ops_common._fastest == {("a",): "triton", ("b",): "torch"}
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    assert ops_common._pick(("b",), slow_triton)() == "triton"  # forced: never timed


def test_pick_between_the_real_conv_candidates(triton_backend, fake_cuda_timing):
    """Through the conv op and its backward: each shape's Triton kernel (interpreted, slow) and the
    torch candidate are timed once, the faster is kept, and either gives the reference's values."""
    x, w, m = _conv_problem(K=1, N=2)
    x.requires_grad_()
    w.requires_grad_()
    y = ops.conv._conv_op(x, w, m, None, [1, 1], [1, 1, 1, 1], [1, 1])
    gx, gw = torch.autograd.grad(y, [x, w], torch.ones_like(y))
    assert sorted(kind for key in ops_common._fastest for kind in ("conv_fwd", "conv_bwd") if kind in key) == \
        ["conv_bwd", "conv_fwd"]
    assert set(ops_common._fastest.values()) == {"torch"}  # the interpreter loses
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = _conv64(x64, w64, m, 0)
    assert_close(y[0], y64)
    rx, rw = torch.autograd.grad(y64, [x64, w64], torch.ones_like(y64))
    assert_close(gx, rx, what="grad input")
    assert_close(gw, rw, what="grad weight")


# ----------------------------------------------------------------------------- cuDNN results not copied


def test_a_single_models_cudnn_result_is_a_view_in_the_kernels_layout():
    x = torch.randn(1, 2, 3, 7, 7).contiguous(memory_format=torch.contiguous_format)
    w, m = torch.randn(1, 5, 3, 3, 3), torch.rand(1, 5, 3, 3, 3) < 0.5
    y = ops.conv2d_reference(x, w, m, None, (1, 1), [1, 1, 1, 1], (1, 1))
    laid_out = ops.conv._in_kernel_layout(y, x)
    assert laid_out.data_ptr() == y.data_ptr() and torch.equal(laid_out, y)  # no copy
    assert laid_out.stride() == masked_conv.stacked_strides(y.shape, x)
    stacked = ops.conv2d_reference(x.expand(3, -1, -1, -1, -1), w.expand(3, -1, -1, -1, -1).contiguous(),
                                   m.expand(3, -1, -1, -1, -1), None, (1, 1), [1, 1, 1, 1], (1, 1))
    copied = ops.conv._in_kernel_layout(stacked, x)  # three models interleaved per image: copied into the layout
    assert copied.data_ptr() != stacked.data_ptr() and torch.equal(copied, stacked)
    assert copied.stride() == masked_conv.stacked_strides(stacked.shape, x)


def test_masked_conv2d_backward_gets_the_gradient_in_the_outputs_layout(cudnn_candidates, monkeypatch):
    """masked_conv2d squeezes the op's model dimension away: its backward then receives the
    incoming gradient as a view (channels_last stays channels_last), not select's zero-filled copy."""
    seen = []
    backward = ops.conv._conv_backward_op

    def spy(grad, *args):
        seen.append(grad[0].is_contiguous(memory_format=torch.channels_last))
        return backward(grad, *args)

    monkeypatch.setattr(ops.conv, "_conv_backward_op", spy)
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    y = ops.masked_conv2d(x, w, torch.rand(5, 3, 3, 3) < 0.5, padding=1)
    y.backward(torch.randn(2, 5, 7, 7).to(memory_format=torch.channels_last))
    assert seen == [True]
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- the CUDA-graph step


class FakeGraph:
    """A CUDA graph on the CPU. Its capture runs the step once, as a real capture would record it;
    a replay runs it again on the captured inputs and writes the loss and the gradients into the
    tensors the capture produced, as a real replay does."""

    replays = 0

    def __init__(self):
        self.grads = None

    def replay(self):
        FakeGraph.replays += 1
        step, params = FakeGraph.step, FakeGraph.params
        for p in params:
            p.grad = None
        loss = step.forward_backward(step.inputs, step.targets)
        for p, grad in zip(params, self.grads):
            grad.copy_(p.grad)
            p.grad = grad
        step.loss.copy_(loss)


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's streams and graphs faked; ``restored_streams`` lists what set_stream was given."""
    class Stream:
        def wait_stream(self, other):
            pass

    stream = Stream()
    restored = []

    @contextlib.contextmanager
    def graph_capture(graph, *args, **kwargs):
        yield
        if FakeGraph.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph.grads = [p.grad for p in FakeGraph.params]

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", restored.append)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph_capture)
    monkeypatch.setattr(FakeGraph, "replays", 0)
    monkeypatch.setattr(FakeGraph, "fail_capture", False, raising=False)
    return restored


def _training(digits, graphed: bool, steps=8):
    """``steps`` SGD steps of a masked MLP on digits batches: through _CapturedStep, or eagerly."""
    torch.manual_seed(0)
    model = models.create("mlp", 10, digits.train.image_shape, hidden=(16,))
    for module in model.modules():
        if hasattr(module, "set_mask"):
            module.set_mask(torch.rand(module.weight.shape) < 0.5)
    optimizer = MaskedSGD.from_model(model, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def forward_backward(inputs, targets):
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss.detach()

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    step = train_module._CapturedStep(forward_backward, zero_grad) if graphed else None
    FakeGraph.step, FakeGraph.params = step, list(model.parameters())
    losses = []
    for i in range(steps):
        inputs, targets = digits.train.images[16 * i:16 * (i + 1)], digits.train.labels[16 * i:16 * (i + 1)]
        if graphed:
            loss = step(inputs, targets)
        else:
            zero_grad()
            loss = forward_backward(inputs, targets)
        optimizer.step()
        losses.append(loss.item())
    return model, optimizer, step, losses


@pytest.fixture(scope="module")
def digits():
    from fastmask import data

    return data.load("digits")


def test_cuda_graph_step_trains_as_eager_steps(digits, fake_cuda_graphs, triton_backend, monkeypatch):
    """Three warm-up steps, a capture, then replays: the eager steps' losses and weights exactly; the
    optimizer's address table is never rebuilt once the graph holds the gradients."""
    refreshed = []
    refresh = masked_optim.TensorTable.refresh
    monkeypatch.setattr(masked_optim.TensorTable, "refresh", lambda self, grads=None: refreshed.append(
        FakeGraph.replays) or refresh(self, grads))
    eager_model, _, _, eager_losses = _training(digits, graphed=False)
    model, optimizer, step, losses = _training(digits, graphed=True)
    assert step.eager_calls == step.WARMUP == 3 and step.graph is not None and FakeGraph.replays == 5
    assert losses == eager_losses
    for (name, a), b in zip(model.state_dict().items(), eager_model.state_dict().values()):
        assert torch.equal(a, b), name
    # Tables are refreshed in the eager steps and once for the gradients the capture allocated
    # (after the first replay), never after.
    assert sorted(set(refreshed)) == [0, 1] and refreshed.count(1) == 1


def test_a_failed_capture_warns_and_trains_eagerly(digits, fake_cuda_graphs, monkeypatch):
    monkeypatch.setattr(FakeGraph, "fail_capture", True)
    eager_model, _, _, eager_losses = _training(digits, graphed=False)
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        model, _, step, losses = _training(digits, graphed=True)
    assert step.failed and step.graph is None and FakeGraph.replays == 0
    assert len(fake_cuda_graphs) == 1  # the stream torch.cuda.graph left current is put back
    assert losses == eager_losses
    for a, b in zip(model.state_dict().values(), eager_model.state_dict().values()):
        assert torch.equal(a, b)


def test_masked_optimizer_step_refuses_a_capture(monkeypatch):
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    optimizer = MaskedSGD([p], lr=0.1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        masked_optim._refuse_capture(torch.device("cuda"))
    masked_optim._refuse_capture(torch.device("cpu"))  # the CPU's tables are host memory


def test_address_tables_are_cached_by_address(triton_backend):
    """Gradients set to None and reallocated come back at a few addresses: each set's table is
    built once and found again (least recently used dropped beyond CACHED_TABLES)."""
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(20, 7))]
    optimizer = MaskedSGD(params, lr=0.1, masks={params[0]: torch.rand(300) < 0.5})
    grad_sets = [[torch.randn(p.shape) for p in params] for _ in range(6)]

    def step(i):
        for p, g in zip(params, grad_sets[i]):
            p.grad = g
        optimizer.step()
        table = optimizer._plans[0].units[0][0]
        return table, table.table

    table, first = step(0)
    _, second = step(1)
    assert second is not first and step(0)[1] is first and len(table.tables) == 2
    for i in range(2, 6):
        step(i)
    assert len(table.tables) == masked_optim.TensorTable.CACHED_TABLES
    assert step(0)[1] is not first  # dropped as the least recently used, built anew


# ----------------------------------------------------------------------------- LMC on a GPU


def test_chunk_from_the_free_memory_with_a_faked_cuda(digits, monkeypatch):
    """One network's footprint, measured through forward hooks, against the free memory plus what the
    caching allocator holds unused: 0.6 * (50,000 + 20,000 - 5,000) / 4,000 bytes gives 9 networks."""
    torch.manual_seed(0)
    pair = [models.create("mlp", 10, (1, 8, 8), hidden=(8,)) for _ in range(2)]
    engine = combinations.Combinations(Stack(pair), in_kernel=False)
    coefficients = torch.tensor([[1 - a, a] for a in lmc.alpha_grid(30)], dtype=torch.float64)
    readings, synchronized = iter([1000]), []
    free, reserved = [50_000], [20_000]
    monkeypatch.setattr(torch.cuda, "synchronize", synchronized.append)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: next(readings, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved[0])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[0], 10**9))
    cuda = torch.device("cuda")
    inputs = digits.test.images[:16]
    assert combinations._fitting_chunk(engine, coefficients, inputs, cuda) == 9
    assert synchronized == [cuda]
    assert all(not module._forward_hooks for module in engine.stack.modules())
    readings, free[0] = iter([1000]), 10**9
    assert combinations._fitting_chunk(engine, coefficients, inputs, cuda) == 30  # all alphas fit
    readings, free[0], reserved[0] = iter([1000]), 0, 5000
    assert combinations._fitting_chunk(engine, coefficients, inputs, cuda) == 1  # at least one


def test_stack_check_runs_in_float64_on_the_reference_path(digits, triton_backend, monkeypatch):
    """The check compares float64 copies whatever the backend: no kernel runs, and a stack whose
    float32 outputs differ from the models' by rounding still passes."""
    monkeypatch.setattr(ops.conv, "_conv_op", lambda *args: pytest.fail("no kernel in the stack check"))
    monkeypatch.setattr(ops.linear, "_linear_op", lambda *args: pytest.fail("no kernel in the stack check"))
    pair = [models.create("convnet3", 10, (1, 8, 8), width=8) for _ in range(2)]
    assert combinations._stack_mismatch(pair, digits.test.images[:4]) is None
    assert all(p.dtype == torch.float32 for model in pair for p in model.parameters())  # the models untouched
