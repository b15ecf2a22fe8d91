"""Linear mode connectivity and loss landscapes: the interpolated kernels (interpreter on CPU)
against float64, and the stacked evaluation against one eager evaluation per network."""
import copy
import json

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmask.models as models
from fastmask import combinations, data, evaluation, landscape, lmc, ops
from fastmask.nn import is_masked
from fastmask.train import TrainConfig, evaluate
from helpers import assert_close, rel_error

# ----------------------------------------------------------------------------- kernels

ALPHAS = [0.0, 0.37, 1.0]


def interpolated64(a, b, alphas):
    return [(1 - al) * a.double() + al * b.double() for al in torch.tensor(alphas, dtype=torch.float64)]


@pytest.fixture(params=["triton", "torch", "cudnn_in_op"])
def interpolation_backend(request, monkeypatch):
    """The kernels (the interpreter on CPU), the plain-torch reference, and the op's own torch
    candidate (what the per-shape dispatch may pick on CUDA)."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    elif request.param == "cudnn_in_op":
        request.getfixturevalue("cudnn_candidates")
    else:
        monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    return request.param


# (N, C, H, W, O, kernel, stride, padding): 1x1 and 3x3, stride 2, 'same', odd sizes.
CONV_CASES = [(2, 3, 7, 6, 5, 3, 1, 1), (1, 2, 5, 5, 3, 1, 2, 0), (2, 3, 6, 7, 4, 3, 1, "same")]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("shared_input, bias", [(True, True), (False, False)])
def test_interpolated_conv_matches_float64(interpolation_backend, case, shared_input, bias):
    N, C, H, W, O, R, stride, padding = case
    x = torch.randn(*(() if shared_input else (len(ALPHAS),)), N, C, H, W)
    wa, wb = torch.randn(O, C, R, R), torch.randn(O, C, R, R)
    m = torch.rand(O, C, R, R) > 0.4
    ba, bb = (torch.randn(O), torch.randn(O)) if bias else (None, None)
    y = ops.interpolated_masked_conv2d(x, wa, wb, m, torch.tensor(ALPHAS), ba, bb, stride=stride, padding=padding)
    weights = interpolated64(wa, wb, ALPHAS)
    biases = interpolated64(ba, bb, ALPHAS) if bias else [None] * len(ALPHAS)
    expected = torch.stack([F.conv2d((x if shared_input else x[k]).double(), weights[k] * m, biases[k], stride, padding)
                            for k in range(len(ALPHAS))])
    assert_close(y, expected)
    if interpolation_backend != "torch":  # the op's layout, whichever candidate ran (torch.compile relies on it)
        assert y.is_contiguous()


def test_interpolated_conv_channels_last_and_strided_second_weight(triton_backend):
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last)
    wa = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    wb = torch.randn(3, 3, 3, 4).permute(3, 0, 1, 2)  # another layout: copied to wa's inside the op
    m = torch.rand(4, 3, 3, 3) > 0.5
    y = ops.interpolated_masked_conv2d(x, wa, wb, m, [0.25, 0.9], padding=1)
    weights = interpolated64(wa, wb, [0.25, 0.9])
    assert_close(y, torch.stack([F.conv2d(x.double(), w * m, padding=1) for w in weights]))


@pytest.mark.parametrize("shared_input, bias", [(True, True), (False, False)])
@pytest.mark.parametrize("batch, in_features, out_features", [(3, 7, 5), (17, 33, 19)])
def test_interpolated_linear_matches_float64(interpolation_backend, shared_input, bias, batch, in_features,
                                             out_features):
    x = torch.randn(*(() if shared_input else (len(ALPHAS),)), batch, in_features)
    wa, wb = torch.randn(out_features, in_features), torch.randn(out_features, in_features)
    m = torch.rand(out_features, in_features) > 0.5
    ba, bb = (torch.randn(out_features), torch.randn(out_features)) if bias else (None, None)
    y = ops.interpolated_masked_linear(x, wa, wb, m, ALPHAS, ba, bb)
    weights = interpolated64(wa, wb, ALPHAS)
    biases = interpolated64(ba, bb, ALPHAS) if bias else [None] * len(ALPHAS)
    expected = torch.stack([F.linear((x if shared_input else x[k]).double(), weights[k] * m, biases[k])
                            for k in range(len(ALPHAS))])
    assert_close(y, expected)


def test_interpolated_linear_bfloat16_kernel(triton_backend):
    x = torch.randn(5, 9, dtype=torch.bfloat16)
    wa, wb = torch.randn(6, 9, dtype=torch.bfloat16), torch.randn(6, 9, dtype=torch.bfloat16)
    m = torch.rand(6, 9) > 0.5
    y = ops.interpolated_masked_linear(x, wa, wb, m, ALPHAS)
    assert y.dtype == torch.bfloat16
    expected = torch.stack([F.linear(x.double(), w * m) for w in interpolated64(wa, wb, ALPHAS)])
    assert_close(y, expected, torch.bfloat16)


def test_interpolated_ops_bad_input_names_the_argument():
    w, m = torch.randn(4, 3, 3, 3), torch.ones(4, 3, 3, 3, dtype=torch.bool)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="weight_b"):
        ops.interpolated_masked_conv2d(x, w, torch.randn(4, 3, 1, 1), m, [0.0, 1.0])
    with pytest.raises(ValueError, match="alphas"):
        ops.interpolated_masked_conv2d(x, w, w, m, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="bias_a and bias_b"):
        ops.interpolated_masked_conv2d(x, w, w, m, [0.0, 1.0], bias_a=torch.zeros(4))
    with pytest.raises(ValueError, match="alphas holds 2"):
        ops.interpolated_masked_conv2d(torch.randn(3, 2, 3, 5, 5), w, w, m, [0.0, 1.0])
    with pytest.raises(ValueError, match="mask has shape"):
        ops.interpolated_masked_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), m, [0.5])


# ----------------------------------------------------------------------------- eager references


def eager_network(model_a, model_b, alpha):
    """(1 - alpha) * a + alpha * b as an ordinary model: load_state_dict of the interpolated state,
    masked weights interpolated as w * mask under the union of the masks."""
    net = copy.deepcopy(model_a)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    state = {k: (1 - alpha) * sa[k] + alpha * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa}
    for name, module in net.named_modules():
        if is_masked(module):
            key = f"{name}.weight"
            state[key] = (1 - alpha) * sa[key] * sa[f"{name}.mask"] + alpha * sb[key] * sb[f"{name}.mask"]
            state[f"{name}.mask"] = sa[f"{name}.mask"] | sb[f"{name}.mask"]
    net.load_state_dict(state)
    return net


def eager_evaluate(net, dataset, reset=None, batch_size=1024):
    """Loss and error of one network, BatchNorm statistics recomputed from ``reset`` first if given."""
    if reset is not None:
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
                module.reset_running_stats()
        net.train()
        with torch.no_grad():
            for start in range(0, len(reset), batch_size):
                net(reset.images[start:start + batch_size])
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(dataset.images[s:s + batch_size]) for s in range(0, len(dataset), batch_size)])
    return F.cross_entropy(logits.double(), dataset.labels).item(), \
        1 - (logits.argmax(-1) == dataset.labels).double().mean().item()


def eager_curve(model_a, model_b, alphas, dataset, reset=None):
    pairs = [eager_evaluate(eager_network(model_a, model_b, a), dataset, reset) for a in alphas]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def reset_set(digits):
    """Training examples to recompute BatchNorm statistics from (one batch)."""
    return digits.train.subset(torch.arange(500))


def randomised(name, seed, shape=(1, 8, 8), density=0.7, mask_seed=None, **options):
    """A model with random weights, masks and BatchNorm statistics (so that interpolating them matters)."""
    torch.manual_seed(seed)
    model = models.create(name, 10, shape, **options)
    generator = torch.Generator().manual_seed(seed if mask_seed is None else mask_seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "set_mask"):
                module.set_mask(torch.rand(module.weight.shape, generator=generator) < density)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
    return model


@pytest.fixture(autouse=True)
def stacked_on_the_cpu(monkeypatch):
    """The stacked path (CUDA's) everywhere in this file unless a test says otherwise: the CPU's
    one network at a time is the eager loop the tests compare with."""
    monkeypatch.setattr(combinations, "ONE_AT_A_TIME_DEVICES", ())


MODELS = [("convnet", {"width": 8, "norm": "batch"}), ("convnet", {"width": 8, "norm": "instance"}),
          ("mlp", {"hidden": (32,)})]


# ----------------------------------------------------------------------------- interpolate


@pytest.mark.parametrize("name, options", MODELS, ids=["convnet-bn", "convnet-in", "mlp"])
@pytest.mark.parametrize("reset", [False, True], ids=["interpolated-stats", "bn-reset"])
@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["stacked", "one-at-a-time"])
def test_both_paths_equal_one_eager_evaluation_per_alpha(digits, reset_set, name, options, reset, one_at_a_time,
                                                         monkeypatch):
    """The stacked chunks (CUDA's way) and one network at a time (the CPU's), each forced here."""
    monkeypatch.setattr(combinations, "ONE_AT_A_TIME_DEVICES", ("cpu",) if one_at_a_time else ())
    a, b = randomised(name, 0, **options), randomised(name, 1, mask_seed=0, **options)
    alphas = [0.0, 0.2, 0.5, 0.9, 1.0]
    result = lmc.interpolate(a, b, alphas, digits.test, bn_reset_data=reset_set if reset else None)
    loss, error = eager_curve(a, b, alphas, digits.test, reset_set if reset else None)
    assert result.alphas == alphas and result.bn_reset == reset
    assert rel_error(torch.tensor(result.loss), torch.tensor(loss)) < 1e-5
    assert result.error == pytest.approx(error, abs=1e-12)
    assert result.barrier_loss == pytest.approx(max(loss) - (loss[0] + loss[-1]) / 2, rel=1e-4, abs=1e-5)
    assert result.barrier_error == pytest.approx(max(error) - (error[0] + error[-1]) / 2, abs=1e-12)


def test_endpoints_equal_the_models_own_evaluation(digits):
    a, b = randomised("convnet", 2, width=8, norm="batch"), randomised("convnet", 3, width=8, norm="batch")
    before = copy.deepcopy(a.state_dict())
    result = lmc.interpolate(a, b, 4, digits.test, bn_reset_data=None)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # the models are not modified
    assert result.alphas == pytest.approx([0, 1 / 3, 2 / 3, 1])
    for model, k in ((a, 0), (b, -1)):
        loss, accuracy = evaluate(model, digits.test, amp=False)
        assert result.loss[k] == pytest.approx(loss, rel=1e-5)
        assert result.error[k] == pytest.approx(1 - accuracy, abs=1e-12)


def test_masks_that_differ_interpolate_the_masked_weights(digits):
    a = randomised("convnet", 0, width=8, norm="batch", density=0.5)
    b = randomised("convnet", 1, width=8, norm="batch", density=0.5)  # other masks
    alphas = [0.0, 0.5, 1.0]
    result = lmc.interpolate(a, b, alphas, digits.test)
    loss, error = eager_curve(a, b, alphas, digits.test)
    assert rel_error(torch.tensor(result.loss), torch.tensor(loss)) < 1e-5
    assert result.error == pytest.approx(error, abs=1e-12)


class SharedTensors(nn.Module):
    """An MLP whose state holds memory twice: a tied weight (one Parameter under two names), or a
    buffer that is a view of another (a deep copy keeps it so)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        if tied:
            self.second.weight = self.first.weight
        self.register_buffer("input_scale", torch.rand(74) + 0.5)
        self.register_buffer("output_shift", self.input_scale[64:])

    def forward(self, x):
        hidden = torch.relu(self.second(torch.relu(self.first(x.flatten(1) * self.input_scale[:64]))))
        return self.head(hidden) + self.output_shift


@pytest.mark.parametrize("tied", [True, False], ids=["tied-weight", "view-buffer"])
def test_one_at_a_time_combines_tensors_held_twice_once(digits, monkeypatch, tied):
    monkeypatch.setattr(combinations, "ONE_AT_A_TIME_DEVICES", ("cpu",))
    torch.manual_seed(0)
    a, b = SharedTensors(tied), SharedTensors(tied)
    alphas = [0.0, 0.3, 1.0]
    result = lmc.interpolate(a, b, alphas, digits.test)
    for model, k in ((a, 0), (b, -1)):
        loss, _ = evaluate(model, digits.test, amp=False)
        assert result.loss[k] == pytest.approx(loss, rel=1e-5)
    middle = copy.deepcopy(a)
    with torch.no_grad():
        for p, q in zip(middle.parameters(), b.parameters()):  # parameters() lists a tied weight once
            p.lerp_(q, 0.3)
        middle.input_scale.lerp_(b.input_scale, 0.3)  # output_shift with it
    assert result.loss[1] == pytest.approx(evaluate(middle, digits.test, amp=False)[0], rel=1e-5)


@pytest.mark.parametrize("reset", [False, True])
def test_a_model_with_itself_is_flat_with_zero_barrier(digits, reset_set, reset):
    a = randomised("convnet", 4, width=8, norm="batch")
    result = lmc.interpolate(a, a, 7, digits.test, bn_reset_data=reset_set if reset else None)
    assert max(result.loss) - min(result.loss) < 1e-5 * result.loss[0]
    assert len(set(result.error)) == 1
    assert abs(result.barrier_loss) < 1e-5 * result.loss[0] and result.barrier_error == 0


def test_results_do_not_depend_on_the_chunk(digits, reset_set):
    a, b = randomised("convnet", 5, width=8, norm="batch"), randomised("convnet", 6, width=8, norm="batch")
    runs = [lmc.interpolate(a, b, 5, digits.test, bn_reset_data=reset_set, chunk=chunk) for chunk in (1, 2, None)]
    for run in runs[1:]:
        assert rel_error(torch.tensor(run.loss), torch.tensor(runs[0].loss)) < 1e-6
        assert run.error == runs[0].error


def test_evaluation_batches_are_smaller_on_the_cpu_with_the_same_results(digits):
    sizes = [len(targets) for _, targets in evaluation.Batches(digits.test, torch.device("cpu"))]
    assert sizes == [128, 128, 104] and evaluation.CPU_BATCH_SIZE == 128
    assert evaluation.default_batch_size(torch.device("cuda")) == evaluation.DEFAULT_BATCH_SIZE == 1024
    model = randomised("convnet3", 3)
    loss, accuracy = evaluate(model, digits.test)
    loss_1024, accuracy_1024 = evaluate(model, digits.test, batch_size=1024)
    assert accuracy == accuracy_1024 and abs(loss - loss_1024) <= 1e-6 * abs(loss_1024)


def test_batches_lists_generators_and_datasets_agree_and_loss_fn(digits):
    a, b = randomised("mlp", 7, hidden=(16,)), randomised("mlp", 8, hidden=(16,), mask_seed=7)
    cuts = [0, 100, 200, 360]  # uneven batches: the loss is a mean over examples, not over batches
    batches = [(digits.test.images[i:j], digits.test.labels[i:j]) for i, j in zip(cuts, cuts[1:])]
    from_dataset = lmc.interpolate(a, b, 3, digits.test)
    from_list = lmc.interpolate(a, b, 3, batches)
    from_generator = lmc.interpolate(a, b, 3, iter(batches), chunk=1)  # a one-shot iterator, several passes
    custom = lmc.interpolate(a, b, 3, batches, loss_fn=F.cross_entropy)
    for other in (from_list, from_generator, custom):
        assert rel_error(torch.tensor(other.loss), torch.tensor(from_dataset.loss)) < 1e-6
        assert other.error == pytest.approx(from_dataset.error, abs=1e-12)
    doubled = lmc.interpolate(a, b, 3, batches, loss_fn=lambda logits, y: 2 * F.cross_entropy(logits, y))
    assert doubled.loss == pytest.approx([2 * v for v in from_dataset.loss], rel=1e-6)


class FlattensBatchDimension(nn.Module):
    """Forward code that assumes [B, ...] inputs (torchvision style): it does not stack."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class PoolsOverFixedDimensions(nn.Module):
    """Forward code that runs on stacked tensors but averages the wrong dimensions there."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("network", [FlattensBatchDimension, PoolsOverFixedDimensions])
def test_models_that_do_not_stack_are_evaluated_one_alpha_at_a_time(digits, reset_set, network):
    torch.manual_seed(0)
    a, b = network(), network()
    alphas = [0.0, 0.5, 1.0]
    with pytest.warns(lmc.StackFallbackWarning, match="one network at a time"):
        result = lmc.interpolate(a, b, alphas, digits.test, bn_reset_data=reset_set)
    loss, error = eager_curve(a, b, alphas, digits.test, reset_set)
    assert rel_error(torch.tensor(result.loss), torch.tensor(loss)) < 1e-5
    assert result.error == pytest.approx(error, abs=1e-12)


def counted(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)
    return wrapper


def test_kernel_path_equals_eager_evaluation(digits, triton_backend, monkeypatch):
    """The conv/linear kernels form the interpolated weights (interpreter: a tiny network)."""
    calls = []
    for name in ("interpolated_masked_conv2d", "interpolated_masked_linear"):
        monkeypatch.setattr(ops, name, counted(getattr(ops, name), calls))
    a = randomised("convnet", 0, width=4, depth=1, norm="batch")
    b = randomised("convnet", 1, width=4, depth=1, norm="batch", mask_seed=0)
    small = digits.test.subset(torch.arange(4))
    reset = digits.train.subset(torch.arange(4))
    alphas = [0.0, 0.6, 1.0]
    for reset_data in (None, reset):
        result = lmc.interpolate(a, b, alphas, small, bn_reset_data=reset_data)
        loss, error = eager_curve(a, b, alphas, small, reset_data)
        assert rel_error(torch.tensor(result.loss), torch.tensor(loss)) < 1e-5
        assert result.error == pytest.approx(error, abs=1e-12)
    assert set(calls) == {"interpolated_masked_conv2d", "interpolated_masked_linear"}


def test_bad_input_names_the_argument(digits):
    a = randomised("convnet", 0, width=8, norm="batch")
    with pytest.raises(ValueError, match="architecture.*shape"):
        lmc.interpolate(a, randomised("convnet", 0, width=16, norm="batch"), 3, digits.test)
    with pytest.raises(ValueError, match="architecture"):
        lmc.interpolate(a, randomised("mlp", 0), 3, digits.test)
    with pytest.raises(ValueError, match="alphas must include 0 and 1"):
        lmc.interpolate(a, a, [0.0, 0.5], digits.test)
    with pytest.raises(ValueError, match=r"alphas must lie in \[0, 1\]"):
        lmc.interpolate(a, a, [0.0, 1.0, 1.5], digits.test)
    with pytest.raises(ValueError, match="alphas must be at least 2"):
        lmc.interpolate(a, a, 1, digits.test)
    with pytest.raises(TypeError, match="data is required"):
        lmc.interpolate(a, a, 3)
    with pytest.raises(TypeError, match="model_b must be a torch.nn.Module"):
        lmc.interpolate(a, "b", 3, digits.test)
    with pytest.raises(ValueError, match="chunk"):
        lmc.interpolate(a, a, 3, digits.test, chunk=0)
    with pytest.raises(TypeError, match="pair"):
        lmc.interpolate(a, a, 3, [digits.test.images])


# ----------------------------------------------------------------------------- instability


def test_instability_trains_two_copies_and_interpolates(digits):
    model = models.create("mlp", 10, (1, 8, 8), hidden=(16,))
    masks = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.6
             for name, p in model.named_parameters() if name.endswith("weight")}
    rewind = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(steps=15, batch_size=32, lr=0.05, augment=False)
    runs = lmc.instability(model, masks, rewind, digits, cfg, seeds=(0, 1), alphas=5, bn_reset=True)
    trained_a, trained_b = runs.models
    assert not torch.equal(trained_a.head.weight, trained_b.head.weight)  # different data orders
    for trained in runs.models:
        for name, mask in masks.items():
            assert (trained.get_parameter(name)[~mask] == 0).all(), name
    assert torch.equal(model.head.weight, rewind["head.weight"])  # the model given is untouched
    for result, dataset in ((runs.train, digits.train), (runs.test, digits.test)):
        assert len(result.loss) == 5
        for trained, k in ((trained_a, 0), (trained_b, -1)):
            loss, accuracy = evaluate(trained, dataset, amp=False)
            assert result.loss[k] == pytest.approx(loss, rel=1e-5)
            assert result.error[k] == pytest.approx(1 - accuracy, abs=1e-12)
    assert runs.test_reset.bn_reset and runs.test_reset.loss == pytest.approx(runs.test.loss, rel=1e-6)  # no BN

    same = lmc.instability(model, masks, rewind, digits, cfg, seeds=(3, 3), alphas=5)
    assert torch.equal(same.models[0].head.weight, same.models[1].head.weight)
    assert abs(same.test.barrier_loss) < 1e-5 and same.test.barrier_error == 0


# ----------------------------------------------------------------------------- landscape


def flat_parameters(model):
    return torch.cat([(m.weight * m.mask if is_masked(m) and p is m.weight else p).detach().flatten()
                      for m in model.modules() for p in m.parameters(recurse=False)]).double()


def test_plane_points_are_orthonormal_coordinates(digits):
    w0, w1, w2 = (randomised("mlp", seed, hidden=(16,), mask_seed=0) for seed in (0, 1, 2))
    result = landscape.plane(w0, w1, w2, digits.test, grid=(3, 4), margin=0.1, chunk=5)
    v0, v1, v2 = (flat_parameters(w) for w in (w0, w1, w2))
    e1 = (v1 - v0) / (v1 - v0).norm()
    e2 = (v2 - v0) - ((v2 - v0) @ e1) * e1
    e2 = e2 / e2.norm()
    assert result.points["w1"] == pytest.approx(((v1 - v0).norm().item(), 0.0))
    assert result.points["w2"] == pytest.approx((((v2 - v0) @ e1).item(), ((v2 - v0) @ e2).item()))
    assert result.loss.shape == result.error.shape == (4, 3)
    assert result.x.min() < 0 < result.x.max() and result.y.min() < 0
    for i, y in enumerate(result.y):
        for j, x in enumerate(result.x):
            net = copy.deepcopy(w0)
            for module in net.modules():
                if is_masked(module):
                    module.mask.fill_(True)
            torch.nn.utils.vector_to_parameters((v0 + x * e1 + y * e2).float(), net.parameters())
            loss, error = eager_evaluate(net, digits.test)
            assert result.loss[i, j] == pytest.approx(loss, rel=1e-5), (i, j)
            assert result.error[i, j] == pytest.approx(error, abs=1e-12), (i, j)


def test_plane_rejects_collinear_weights(digits):
    w0, w1 = randomised("mlp", 0, hidden=(8,)), randomised("mlp", 1, hidden=(8,), mask_seed=0)
    with pytest.raises(ValueError, match="one line"):
        landscape.plane(w0, w1, w1, digits.test, grid=3)
    with pytest.raises(ValueError, match="grid"):
        landscape.plane(w0, w1, w1, digits.test, grid=(1, 5))


def test_filter_normalised_directions(digits):
    model = randomised("convnet", 0, width=8, norm="batch")
    direction = landscape.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for name, module in model.named_modules():
        if is_masked(module):
            d, w = direction[f"{name}.weight"], module.weight * module.mask
            assert (d[~module.mask] == 0).all()
            assert torch.allclose(d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # biases and BatchNorm parameters
            assert (direction[name] == 0).all(), name


def test_random_directions_centre_is_the_model_and_plot(digits, tmp_path):
    model = randomised("convnet", 1, width=8, norm="batch")
    result = landscape.random_directions(model, digits.test, grid=(3, 3), seed=0)
    loss, accuracy = evaluate(model, digits.test, amp=False)
    assert result.x.tolist() == [-1, 0, 1] and result.y.tolist() == [-1, 0, 1]
    assert result.loss[1, 1] == pytest.approx(loss, rel=1e-5)
    assert result.error[1, 1] == pytest.approx(1 - accuracy, abs=1e-12)
    assert np.isfinite(result.loss).all() and (result.loss != result.loss[1, 1]).sum() == 8
    again = landscape.random_directions(model, digits.test, grid=(3, 3), seed=0, chunk=2)
    assert np.allclose(again.loss, result.loss, rtol=1e-6)
    path = result.save_plot(tmp_path / "plots" / "random.png", what="error")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="what"):
        result.save_plot(tmp_path / "x.png", what="accuracy")
    # as results.json stores it (JSON), and back: what the reports draw from
    stored = landscape.LandscapeResult.from_dict(json.loads(json.dumps(result.to_dict())))
    for name in ("x", "y", "loss", "error"):
        assert np.array_equal(getattr(stored, name), getattr(result, name)), name
    assert (stored.points, stored.xlabel, stored.ylabel) == (result.points, "direction 1", "direction 2")


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpolated_kernels_cuda(monkeypatch, matmul_tf32, dtype):
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    matmul_tf32(False)
    alphas = torch.linspace(0, 1, 7, device="cuda")
    x = torch.randn(16, 33, 19, 21, device="cuda", dtype=dtype)  # sizes that cross tile boundaries
    wa, wb = (torch.randn(65, 33, 3, 3, device="cuda", dtype=dtype) for _ in range(2))
    ba, bb = (torch.randn(65, device="cuda", dtype=dtype) for _ in range(2))
    m = torch.rand(65, 33, 3, 3, device="cuda") > 0.5
    y = ops.interpolated_masked_conv2d(x, wa, wb, m, alphas, ba, bb, padding=1)
    weights, biases = interpolated64(wa, wb, alphas.tolist()), interpolated64(ba, bb, alphas.tolist())
    assert_close(y, torch.stack([F.conv2d(x.double(), w * m, b, padding=1) for w, b in zip(weights, biases)]), dtype)
    xl = torch.randn(257, 300, device="cuda", dtype=dtype)
    la, lb = (torch.randn(129, 300, device="cuda", dtype=dtype) for _ in range(2))
    ml = torch.rand(129, 300, device="cuda") > 0.8
    yl = ops.interpolated_masked_linear(xl, la, lb, ml, alphas)
    assert_close(yl, torch.stack([F.linear(xl.double(), w * ml) for w in interpolated64(la, lb, alphas.tolist())]),
                 dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("reset", [False, True])
def test_cuda_interpolation_equals_eager_evaluation(monkeypatch, matmul_tf32, reset):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    matmul_tf32(False)
    splits = data.load("synthetic", device="cuda", shape=(3, 16, 16), train_size=600, test_size=500)
    a = randomised("resnet10", 0, shape=(3, 16, 16), width=8).cuda()
    b = randomised("resnet10", 1, shape=(3, 16, 16), width=8, mask_seed=0).cuda()
    alphas = lmc.alpha_grid(6)
    reset_data = splits.train if reset else None
    loss, error = eager_curve(a, b, alphas, splits.test, reset_data)
    for chunk in (None, 4):  # the automatic chunk from the free memory, and a forced one
        result = lmc.interpolate(a, b, alphas, splits.test, bn_reset_data=reset_data, chunk=chunk)
        assert rel_error(torch.tensor(result.loss), torch.tensor(loss)) < 1e-5
        assert result.error == pytest.approx(error, abs=1.01 / 500)  # an argmax tie may break the other way
