"""Models, stacks of K models, and the training engine."""
import copy
import dataclasses
import warnings

import pytest
import torch

import fastmask.models as models
from fastmask import data, io
from fastmask.checkpoint import CheckpointFile
from fastmask.stack import Stack
from fastmask.train import TrainConfig, evaluate, fit
import fastmask.train as train_module
from helpers import rel_error


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def masked_copies(name, shape, count, sparsity=0.3, **options):
    built = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = models.create(name, 10, shape, **options)
        for module in model.modules():
            if hasattr(module, "set_mask"):
                module.set_mask(torch.rand_like(module.weight) >= sparsity)
        built.append(model)
    return built


@pytest.mark.parametrize("name, options", [("convnet3", {"width": 8}), ("convnet", {"width": 8, "norm": "batch"}),
                                           ("resnet10", {"width": 4}), ("vgg11", {}), ("lenet300_100", {})])
def test_create_builds_masked_models(name, options):
    model = models.create(name, 10, (3, 8, 8), **options)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    prunable = models.prunable_parameters(model)
    assert prunable and all(n.endswith("weight") and p.dim() >= 2 for n, p in prunable.items())
    if name == "vgg11":
        assert "head.weight" not in prunable  # open_lth leaves VGG's output layer dense


def test_convnet3_has_the_published_parameter_count():
    assert sum(p.numel() for p in models.create("convnet3", 10, (3, 32, 32)).parameters()) == 320_010


def test_create_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        models.create("resnet99", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="in_shape"):
        models.create("convnet3", 10, (32, 32))
    with pytest.raises(ValueError, match="norm"):
        models.create("convnet3", 10, (3, 32, 32), norm="weird")


@pytest.mark.parametrize("name, options", [("convnet", {"width": 8, "norm": "batch"}), ("resnet10", {"width": 4}),
                                           ("convnet3", {"width": 8}), ("mlp", {"hidden": (16,)})])
@pytest.mark.parametrize("training", [True, False])
def test_stack_forward_equals_each_model(name, options, training):
    copies = masked_copies(name, (3, 8, 8), 3, **options)
    stack = Stack(copies).train(training)
    x = torch.randn(3, 4, 3, 8, 8)
    expected = torch.stack([m.train(training)(x[k]) for k, m in enumerate(copies)])
    assert rel_error(stack(x), expected) < 1e-5
    shared = torch.randn(4, 3, 8, 8)
    expected = torch.stack([m(shared) for m in copies])
    assert rel_error(stack(shared, shared=True), expected) < 1e-5
    for part, original in zip(stack.split(), copies):
        for (key, a), b in zip(part.state_dict().items(), original.state_dict().values()):
            assert rel_error(a, b) < 1e-5 if a.is_floating_point() else torch.equal(a, b), key


@pytest.mark.parametrize("name, options, kernels", [("convnet", {"width": 8, "norm": "batch"}, True),
                                                    ("resnet10", {"width": 4}, False), ("convnet3", {"width": 8}, False)])
def test_channels_last_models_and_stacks_compute_the_same(request, name, options, kernels):
    """fit's channels_last conversion (CUDA): a stack's 5-d weights keep their layout, single models'
    4-d weights and every batch change layout, and nothing else changes."""
    if kernels:
        request.getfixturevalue("triton_backend")
    copies = masked_copies(name, (3, 8, 8), 2, **options)
    x = torch.randn(2, 4, 3, 8, 8)
    stack = Stack(copies)
    converted = train_module.to_channels_last(copy.deepcopy(stack))
    y, expected = converted(train_module.images_channels_last(x)), stack(x)
    assert rel_error(y, expected) < 1e-5
    y.square().sum().backward()
    expected.square().sum().backward()
    for (key, a), b in zip(converted.named_parameters(), stack.parameters()):
        assert rel_error(a.grad, b.grad) < 1e-5, key
    single = train_module.to_channels_last(copy.deepcopy(copies[0]))
    weights = [p for p in single.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert any(not p.is_contiguous() for p in weights)  # 1x1 kernels are both
    image_batch = train_module.images_channels_last(x[0])
    assert image_batch.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(single(image_batch), copies[0](x[0])) < 1e-5


def test_stack_rejects_mixed_architectures_and_wrong_batches():
    with pytest.raises(ValueError, match="one architecture"):
        Stack([models.create("convnet3", 10, (3, 8, 8), width=8), models.create("mlp", 10, (3, 8, 8))])
    stack = Stack(masked_copies("mlp", (1, 8, 8), 2, hidden=(4,)))
    with pytest.raises(ValueError, match="K=2"):
        stack(torch.randn(3, 5, 1, 8, 8))


SMALL = TrainConfig(steps=12, batch_size=32, lr=0.05, warmup_steps=2)


def _state_vector(model) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in model.state_dict().values() if v.is_floating_point()])


def _stack_and_one_by_one(train, dtype):
    """The largest normwise difference, over 3 models (each model's state as one vector), between a
    stack of 3 trained together and the 3 models trained one after another with the same seeds."""
    copies = [m.to(dtype) for m in masked_copies("convnet3", train.image_shape, 3, width=8)]
    train = dataclasses.replace(train, images=train.images.to(dtype), validate=False)
    stack = Stack(copies)
    fit(stack, train, SMALL, seed=[10, 11, 12], progress=False, one_at_a_time=False)
    for k, model in enumerate(copies):
        fit(model, train, SMALL, seed=10 + k, progress=False)
    for trained in stack.split():
        for module in trained.modules():
            if hasattr(module, "mask"):
                assert (module.weight[~module.mask] == 0).all()
    return max(rel_error(_state_vector(trained), _state_vector(alone)) for trained, alone in zip(stack.split(), copies))


def _one_ulp_apart(train, dtype):
    """The normwise difference after the same training of one model and its copy whose starting
    weights differ by one machine epsilon (relative): how much this training amplifies rounding."""
    model, copy = [m.to(dtype) for m in masked_copies("convnet3", train.image_shape, 2, width=8)]
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in copy.parameters():
            p.mul_(1 + torch.finfo(dtype).eps * torch.randn(p.shape, generator=generator, dtype=dtype))
    train = dataclasses.replace(train, images=train.images.to(dtype), validate=False)
    for m in (model, copy):
        fit(m, train, SMALL, seed=10, progress=False)
    return rel_error(_state_vector(copy), _state_vector(model))


def test_stack_trains_like_models_one_by_one(digits):
    """A stack of 3 reaches the weights of 3 models trained one after another with the same seeds.

    The two compute the same function in another order (a stack's convolution is one conv over K
    models, its GroupNorm applies the affine in a separate addcmul), so each step rounds
    differently, and training amplifies those differences. In float64 the difference is pure
    rounding (about 1e-14): any error of logic (a seed, a mask, a model's data) would show as O(1).
    In float32 the amplification is far larger than float64's (digits' pixels are small integers:
    max-pool ties and ReLU signs that one rounding flips reroute gradients), so the bound is
    measured, not assumed: the same training started one epsilon apart (3.4e-4 measured, against
    2 eps in float64). A fixed 1e-5 bound failed on some machines; a bound from float64's
    amplification failed once augmentation went off for 8x8 images.
    """
    assert _stack_and_one_by_one(digits.train, torch.float64) < 1e-10
    error32 = _stack_and_one_by_one(digits.train, torch.float32)
    apart32 = max(_one_ulp_apart(digits.train, torch.float32), torch.finfo(torch.float32).eps)
    assert error32 < 10 * apart32, (error32, apart32)


def test_stack_one_at_a_time_is_each_model_fit_alone(digits):
    """Trained one model at a time, a stack holds bit for bit the weights of K plain fits; its
    losses are their mean per step, its checkpoints their stack; and the stacked pass agrees to
    float rounding (float64, as in the test above)."""
    copies = [m.double() for m in masked_copies("convnet3", digits.train.image_shape, 3, width=8)]
    train, test = (dataclasses.replace(split, images=split.images.double(), validate=False)
                   for split in (digits.train, digits.test))
    stacked, one_at_a_time = Stack(copies), Stack(copies)
    together = fit(stacked, train, SMALL, seed=[10, 11, 12], checkpoint_steps=[0, 5], progress=False,
                   one_at_a_time=False)
    result = fit(one_at_a_time, train, SMALL, seed=[10, 11, 12], checkpoint_steps=[0, 5], eval_data=test,
                 progress=False, one_at_a_time=True)
    alone = [fit(model, train, SMALL, seed=10 + k, checkpoint_steps=[5], progress=False)
             for k, model in enumerate(copies)]
    for trained, model in zip(one_at_a_time.split(), copies):
        for key, value in model.state_dict().items():
            assert torch.equal(trained.state_dict()[key], value), key
    assert result.losses == pytest.approx([sum(step) / 3 for step in zip(*(r.losses for r in alone))], rel=1e-12)
    assert len(result.losses) == result.steps == SMALL.steps
    assert rel_error(_state_vector(stacked), _state_vector(one_at_a_time)) < 1e-10
    assert rel_error(torch.tensor(together.losses), torch.tensor(result.losses)) < 1e-6  # float32 cross-entropy
    assert sorted(result.checkpoints) == [0, 5]
    for key, value in together.checkpoints[5].items():
        assert rel_error(result.checkpoints[5][key], value) < 1e-10 if value.is_floating_point() \
            else torch.equal(result.checkpoints[5][key], value), key
    assert len(result.metrics["test_accuracy"]) == 3


def test_resume_from_checkpoint_is_exact(digits, tmp_path, monkeypatch):
    """Killed right after saving its state at step 6, the rerun ends with the uninterrupted weights."""
    cfg = TrainConfig(steps=10, batch_size=32, lr=0.05)
    torch.manual_seed(0)
    uninterrupted = models.create("convnet3", 10, digits.train.image_shape, width=8)
    initial = {k: v.clone() for k, v in uninterrupted.state_dict().items()}
    full = fit(uninterrupted, digits.train, cfg, seed=3, checkpoint_steps=[0, 4], progress=False)

    class Killed(Exception):
        pass

    save_state = io.save_state

    def save_then_die(path, state):
        save_state(path, state)
        if state["step"] == 6:
            raise Killed

    resume = tmp_path / "train.pt"
    killed = models.create("convnet3", 10, digits.train.image_shape, width=8)
    killed.load_state_dict(initial)
    monkeypatch.setattr(io, "save_state", save_then_die)
    with pytest.raises(Killed):
        fit(killed, digits.train, cfg, seed=3, checkpoint_steps=[0, 4], checkpoint=CheckpointFile(resume, every=3),
            progress=False)
    monkeypatch.undo()
    resumed = models.create("convnet3", 10, digits.train.image_shape, width=8)  # weights come from the file
    result = fit(resumed, digits.train, cfg, seed=3, checkpoint_steps=[0, 4], checkpoint=CheckpointFile(resume, every=3),
                 progress=False)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert result.losses == full.losses
    assert torch.equal(result.checkpoints[4]["features.0.weight"], full.checkpoints[4]["features.0.weight"])


def test_stack_one_at_a_time_resumes_inside_the_model_it_stopped_in(digits, tmp_path, monkeypatch):
    """Killed at step 6 of the second of three models, the rerun keeps the first, resumes the
    second from its step 6 and ends with the uninterrupted stack's weights, losses and checkpoints."""
    cfg = TrainConfig(steps=10, batch_size=32, lr=0.05)
    copies = masked_copies("convnet3", digits.train.image_shape, 3, width=8)
    uninterrupted = Stack(copies)
    full = fit(uninterrupted, digits.train, cfg, seed=[1, 2, 3], checkpoint_steps=[4], progress=False,
               one_at_a_time=True)

    class Killed(Exception):
        pass

    save_state = io.save_state
    saved = []

    def save_then_die(path, state):
        save_state(path, state)
        saved.append((len(state["finished"]), state.get("current", {}).get("step")))
        if saved[-1] == (1, 6):
            raise Killed

    resume = tmp_path / "stack.pt"
    monkeypatch.setattr(io, "save_state", save_then_die)
    with pytest.raises(Killed):
        fit(Stack(copies), digits.train, cfg, seed=[1, 2, 3], checkpoint_steps=[4],
            checkpoint=CheckpointFile(resume, every=3), progress=False, one_at_a_time=True)
    monkeypatch.undo()
    resumed = Stack(masked_copies("convnet3", digits.train.image_shape, 3, width=8))  # weights come from the file
    result = fit(resumed, digits.train, cfg, seed=[1, 2, 3], checkpoint_steps=[4],
                 checkpoint=CheckpointFile(resume, every=3), progress=False, one_at_a_time=True)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert result.losses == full.losses
    assert torch.equal(result.checkpoints[4]["model.features.0.weight"], full.checkpoints[4]["model.features.0.weight"])
    assert saved[:4] == [(0, 3), (0, 6), (0, 9), (0, 10)]  # the first model's saves, then the second's


def test_convnet3_reaches_95_percent_on_digits(digits):
    torch.manual_seed(0)
    model = models.create("convnet3", 10, digits.train.image_shape)
    result = fit(model, digits.train, TrainConfig(epochs=15, batch_size=64, lr=0.01, augment=False), seed=0,
                 eval_data=digits.test, progress=False)
    assert result.metrics["test_accuracy"] >= 0.95
    loss, accuracy = evaluate(model, digits.test)
    assert accuracy == result.metrics["test_accuracy"]


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)


def _graph_twins(digits, cuda_graph_cfg, build, monkeypatch):
    """The same model trained on CUDA with and without the captured step; both results and models.
    cuDNN is held to deterministic algorithms, so that the two runs can agree to the last bit. A
    stack trains as one stacked pass (the captured stacked step; one at a time is plain ``fit``)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    trained = []
    for cuda_graph in (False, True):
        model = build().cuda()
        cfg = TrainConfig(**{**cuda_graph_cfg, "cuda_graph": cuda_graph})
        seed = [5, 6] if isinstance(model, Stack) else 5
        one_at_a_time = False if isinstance(model, Stack) else None
        trained.append((fit(model, digits.train.to("cuda"), cfg, seed=seed, progress=False, one_at_a_time=one_at_a_time),
                        model))
    return trained


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["convnet3", "batchnorm", "stack"])
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_step_trains_like_eager_steps(digits, kind, amp, monkeypatch):
    """Replayed from a CUDA graph, the steps give the eager steps' weights, statistics and losses."""
    def build():
        if kind == "stack":
            return Stack(masked_copies("convnet3", digits.train.image_shape, 2, width=8))
        options = {"width": 8, "norm": "batch"} if kind == "batchnorm" else {"width": 8}
        return masked_copies("convnet", digits.train.image_shape, 1, **options)[0]

    settings = dict(steps=9, batch_size=32, lr=0.05, warmup_steps=2, amp=amp)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="capturing the training step")  # a failed capture warns
        (eager, eager_model), (graphed, graphed_model) = _graph_twins(digits, settings, build, monkeypatch)
    for (key, a), b in zip(graphed_model.state_dict().items(), eager_model.state_dict().values()):
        if a.is_floating_point():
            assert rel_error(a, b) < 1e-5, key
        else:
            assert torch.equal(a, b), key
    assert max(abs(x - y) for x, y in zip(graphed.losses, eager.losses)) < 1e-5


@pytest.mark.gpu
def test_cuda_graph_capture_failure_falls_back_to_eager_steps(digits, monkeypatch):
    """A step that cannot be captured (a host sync in the loss) warns once and trains eagerly, exactly."""
    loss = train_module._loss

    def loss_with_host_sync(logits, targets, label_smoothing):
        value = loss(logits, targets, label_smoothing)
        value.item()  # not allowed while a CUDA graph is being captured
        return value

    monkeypatch.setattr(train_module, "_loss", loss_with_host_sync)
    build = lambda: masked_copies("convnet", digits.train.image_shape, 1, width=8)[0]  # noqa: E731
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        (eager, eager_model), (graphed, graphed_model) = _graph_twins(
            digits, dict(steps=6, batch_size=32, lr=0.05, amp=False), build, monkeypatch)
    for key, value in eager_model.state_dict().items():
        assert torch.equal(graphed_model.state_dict()[key], value), key
    assert graphed.losses == eager.losses


def test_plain_models_pruned_in_the_stack_stay_pruned_on_both_paths(digits):
    """A stack of plain (unmasked) models whose masks are set on the stack: split() hands out masked
    models, so training one model at a time keeps the pruned weights at zero, as the stacked pass does."""
    torch.manual_seed(0)
    plain = [torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 64, 10)).double() for _ in range(2)]
    train = dataclasses.replace(digits.train, images=digits.train.images.double(), validate=False)
    keep = {"0.mask": torch.rand(2, 4, 1, 3, 3) < 0.5, "3.mask": torch.rand(2, 10, 4 * 64) < 0.3}
    runs = {}
    for one_at_a_time in (True, False):
        stack = Stack(plain)
        stack.load_stacked(keep)
        fit(stack, train, SMALL, seed=[3, 4], progress=False, one_at_a_time=one_at_a_time)
        runs[one_at_a_time] = stack
        for k, model in enumerate(stack.split()):
            for layer, mask in (("0", keep["0.mask"][k]), ("3", keep["3.mask"][k])):
                assert torch.equal(model.get_submodule(layer).mask, mask)
                assert not model.get_submodule(layer).weight[~mask].any(), (one_at_a_time, k, layer)
    assert rel_error(_state_vector(runs[True]), _state_vector(runs[False])) < 1e-10


def test_a_stack_of_plain_models_pruned_in_one_model_splits_into_one_architecture():
    """One model pruned, the other dense: both split models get the masked layer (so they stack
    again and load each other's states); a mask shared by all models ``[1, ...]`` splits to each."""
    plain = [torch.nn.Sequential(torch.nn.Linear(4, 3)) for _ in range(2)]
    stack = Stack(plain)
    keep = torch.ones(2, 3, 4, dtype=torch.bool)
    keep[1, 0, 0] = False
    stack.load_stacked({"0.mask": keep})
    first, second = stack.split()
    assert first.state_dict().keys() == second.state_dict().keys()
    assert torch.equal(first[0].mask, keep[0]) and torch.equal(second[0].mask, keep[1])
    Stack([first, second])  # one architecture again
    stack.load_stacked({"0.mask": keep[1:]})  # shared
    assert all(torch.equal(model[0].mask, keep[1]) for model in stack.split())
    assert all(type(model[0]) is torch.nn.Linear for model in Stack(plain).split())  # nothing pruned: plain
