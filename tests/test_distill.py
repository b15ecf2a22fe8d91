"""Dataset distillation: the DSA augmentation, the batched DM and gradient-matching losses against
one-network-one-class loops, the synthetic set file, and the claim on real data (digits)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmask import data, models
from fastmask.distill import (DMConfig, DSAConfig, DistributionMatching, GradientMatching, SyntheticSet, distill,
                              evaluate, evaluation_config, random_real)
from fastmask.distill import augment as aug
from fastmask.distill.base import RealSampler, redraw
from fastmask.distill.dsa import gradient_distance
from fastmask.stack import Stack
from fastmask.stages import ReportContext
from helpers import rel_error


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 busy cores, OpenMP threads waiting on each other make these small
    convolutions 10x slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


SMALL_NET = {"model": "convnet", "model_options": {"width": 8, "depth": 2}}


# ---------------------------------------------------------------------------------------------- augmentation


def test_flip_translate_cutout_color_match_per_image_formulas():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 3, 7, 9, dtype=torch.float64)  # [K=2, B=3, C, H, W], odd sizes
    flags = torch.tensor([[True, False, True], [False, True, True]])
    dy, dx = torch.randint(-3, 4, (2, 3)), torch.randint(-4, 5, (2, 3))
    top, left = torch.randint(-2, 7, (2, 3)), torch.randint(-2, 9, (2, 3))
    bright, sat, contrast = torch.rand(2, 3) - 0.5, torch.rand(2, 3) * 2, torch.rand(2, 3) + 0.5
    flipped = aug.flip(images, flags)
    shifted = aug.translate(images, dy, dx)
    cut = aug.cutout(images, top, left, 4, 5)
    coloured = aug.color(images, bright, sat, contrast)
    for k in range(2):
        for b in range(3):
            x = images[k, b]
            assert torch.equal(flipped[k, b], x.flip(-1) if flags[k, b] else x)
            expected = torch.zeros_like(x)
            for i in range(7):
                for j in range(9):
                    si, sj = i + int(dy[k, b]), j + int(dx[k, b])
                    if 0 <= si < 7 and 0 <= sj < 9:
                        expected[:, i, j] = x[:, si, sj]
            assert torch.equal(shifted[k, b], expected)
            expected = x.clone()
            t, l = int(top[k, b]), int(left[k, b])
            expected[:, max(t, 0):max(t + 4, 0), max(l, 0):max(l + 5, 0)] = 0
            assert torch.equal(cut[k, b], expected)
            y = x + bright[k, b]
            y = (y - y.mean(0)) * sat[k, b] + y.mean(0)
            y = (y - y.mean()) * contrast[k, b] + y.mean()
            assert rel_error(coloured[k, b], y) < 1e-12


def test_affine_transforms_on_grid_points():
    torch.manual_seed(1)
    images = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    quarter = torch.full((2,), math.pi / 2, dtype=torch.float64)
    # The sampling grid turned by +90 degrees lands on pixel centres: the image turns clockwise.
    assert rel_error(aug.rotate(images, quarter), torch.rot90(images, -1, dims=(-2, -1))) < 1e-12
    one = torch.ones(2, dtype=torch.float64)
    assert rel_error(aug.scale(images, one, one), images) < 1e-12
    zoomed = aug.scale(images, 2 * one, one)  # output column 4 + k samples input column 4 + 2k, zeros beyond
    expected = torch.zeros_like(images)
    for k in range(-2, 3):
        expected[..., 4 + k] = images[..., 4 + 2 * k]
    assert rel_error(zoomed, expected) < 1e-12


@pytest.mark.parametrize("group", aug.GROUPS)
def test_each_group_is_differentiable_and_siamese(group):
    dsa = aug.DSA(seed=3)
    transform = dsa.sample_group(group, (2, 3, 1), (6, 5))  # one draw per network and class
    real = torch.randn(2, 3, 4, 2, 6, 5, dtype=torch.float64)
    syn = torch.randn(2, 3, 2, 2, 6, 5, dtype=torch.float64)
    # siamese: the same draw for the real and the synthetic batch of a (network, class)
    together = transform(torch.cat([real, syn], 2))
    assert torch.equal(together, torch.cat([transform(real), transform(syn)], 2))
    small = torch.randn(2, 3, 1, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(transform, (small,))


def test_mode_s_draws_one_group_per_call_reproducibly():
    dsa_a, dsa_b = aug.DSA(seed=5), aug.DSA(seed=5)
    draws_a = [dsa_a.sample((4,), (8, 8)) for _ in range(80)]
    draws_b = [dsa_b.sample((4,), (8, 8)) for _ in range(80)]
    assert {t.group for t in draws_a} == set(aug.GROUPS)
    for a, b in zip(draws_a, draws_b):
        assert a.group == b.group and all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    only = aug.DSA("flip_rotate", seed=0)
    assert {only.sample((1,), (8, 8)).group for _ in range(20)} == {"flip", "rotate"}
    rotations = aug.DSA(seed=0).sample_group("rotate", (1000,), (8, 8)).params["angle"]
    assert rotations.abs().max() <= math.radians(15) and rotations.std() > math.radians(7)


def test_augmentation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown group"):
        aug.DSA("color_blur")
    with pytest.raises(ValueError, match="do not broadcast"):
        aug.DSA(seed=0).sample_group("flip", (2, 3, 1), (4, 4))(torch.randn(2, 4, 5, 1, 4, 4))
    with pytest.raises(ValueError, match="scale"):
        aug.DSARanges(scale=0.5)


# ---------------------------------------------------------------------------------------------- batching


def test_real_sampler_draws_distinct_members_of_each_class(digits):
    sampler = RealSampler(digits.train)
    index = sampler.sample(3, 20, torch.Generator().manual_seed(0))
    assert index.shape == (3, 10, 20)
    labels = digits.train.labels[index]
    assert torch.equal(labels, torch.arange(10)[None, :, None].expand(3, 10, 20))
    assert all(len(set(row.tolist())) == 20 for row in index.flatten(0, 1))
    with pytest.raises(ValueError, match="smallest class"):
        sampler.sample(1, 200, torch.Generator())


def test_redraw_matches_the_default_initialisation():
    build = lambda: models.create("convnet3", 10, (3, 8, 8), width=16)  # noqa: E731
    stack = Stack([build() for _ in range(3)])
    with torch.no_grad():
        for p in stack.parameters():
            p.fill_(5)
    redraw(stack, torch.Generator().manual_seed(0))
    fresh = build()
    for name, module in fresh.named_modules():
        stacked = stack.model.get_submodule(name) if name else None
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            bound = 1 / math.sqrt(module.weight[0].numel())  # torch's kaiming-uniform(a=sqrt(5)) bound
            for ours, torchs in ((stacked.weight, module.weight), (stacked.bias, module.bias)):
                assert ours.abs().max() <= bound and torchs.abs().max() <= bound, name
            for weight in (stacked.weight, module.weight):
                assert abs(weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.15, name
            assert not torch.equal(stacked.weight[0], stacked.weight[1]), name
        elif isinstance(module, torch.nn.GroupNorm):
            assert torch.equal(stacked.weight, torch.ones_like(stacked.weight))
            assert torch.equal(stacked.bias, torch.zeros_like(stacked.bias))
    again = Stack([build() for _ in range(3)])
    redraw(again, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(stack.parameters(), again.parameters()))


def per_class_loop_dm(distiller, real, syn):
    """DM's loss the reference way: one network, one class, one forward at a time."""
    total = 0
    for k, net in enumerate(distiller.networks.split()):
        for c in range(distiller.num_classes):
            total = total + (net.embed(real[k, c]).mean(0) - net.embed(syn[k, c]).mean(0)).pow(2).sum()
    return total / distiller.num_networks


def per_class_loop_gm(distiller, real, syn):
    """Gradient matching's loss the reference way: one network, one class, one backward at a time."""
    total = 0
    for k, net in enumerate(distiller.networks.split()):
        weights = [p for p in net.parameters() if p.dim() >= 2]
        for c in range(distiller.num_classes):
            real_loss = F.cross_entropy(net(real[k, c]), torch.full((real.shape[2],), c))
            syn_loss = F.cross_entropy(net(syn[k, c]), torch.full((syn.shape[2],), c))
            real_grads = torch.autograd.grad(real_loss, weights)
            syn_grads = torch.autograd.grad(syn_loss, weights, create_graph=True)
            total = total + sum(gradient_distance(r[None], s[None]) for r, s in zip(real_grads, syn_grads))
    return total / distiller.num_networks


@pytest.mark.parametrize("method", ["dm", "dsa"])
def test_batched_loss_equals_one_network_one_class_loop(digits, method):
    options = dict(num_networks=2, batch_real=6, iterations=1)
    if method == "dm":
        distiller = DistributionMatching(digits.train, 3, DMConfig(**options), **SMALL_NET, seed=1)
        loop = per_class_loop_dm
    else:
        distiller = GradientMatching(digits.train, 3, DSAConfig(**options, outer_loop=2, inner_loop=1), **SMALL_NET,
                                     seed=1)
        loop = per_class_loop_gm
    redraw(distiller.networks, distiller.generator)
    real, transform = distiller.real_batch(), distiller.siamese()
    batched = distiller.loss(real, transform)
    (batched_grad,) = torch.autograd.grad(batched, [distiller.images])
    reference = loop(distiller, transform(real), distiller.synthetic_batch(transform))
    (reference_grad,) = torch.autograd.grad(reference, [distiller.images])
    assert reference.item() > 0 and batched_grad.abs().max() > 0
    assert rel_error(batched, reference) < 1e-5
    assert rel_error(batched_grad, reference_grad) < 1e-4


def test_gradient_matching_inner_loop_trains_every_network(digits):
    distiller = GradientMatching(digits.train, 2, DSAConfig(num_networks=2, outer_loop=1, inner_loop=1, lr_net=0.05,
                                                            augment=None), **SMALL_NET)
    redraw(distiller.networks, distiller.generator)
    images, labels = distiller.images.detach().flatten(0, 1), torch.arange(10).repeat_interleave(2)

    def losses():
        with torch.no_grad():
            logits = distiller.networks(images, shared=True)
        return [F.cross_entropy(logits[k], labels).item() for k in range(2)]

    before = losses()
    distiller.train_networks(30)
    after = losses()
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)


# ---------------------------------------------------------------------------------------------- API and files


def test_distill_records_how_the_set_was_made(digits):
    untouched = distill("dsa", digits.train, 2, iterations=0, outer_loop=1, inner_loop=0, seed=4, progress=False,
                        **SMALL_NET)
    assert torch.equal(untouched.images, random_real(digits.train, 2, seed=4).images)
    assert untouched.method == "dsa" and untouched.hyperparameters["outer_loop"] == 1
    dc = distill("dc", digits.train, 1, iterations=1, progress=False, **SMALL_NET)
    assert dc.method == "dc" and dc.hyperparameters["augment"] is None and dc.hyperparameters["inner_loop"] == 1
    dm = distill("dm", digits.train, 2, iterations=2, init="noise", batch_real=8, progress=False, **SMALL_NET)
    assert dm.images.shape == (20, 1, 8, 8) and torch.equal(dm.labels, torch.arange(10).repeat_interleave(2))
    assert dm.hyperparameters["init"] == "noise" and dm.hyperparameters["iterations"] == 2 and dm.seconds > 0


def test_distill_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="method must be one of"):
        distill("kip", digits.train, 1)
    with pytest.raises(TypeError, match="unknown option"):
        distill("dm", digits.train, 1, outer_loop=3)
    with pytest.raises(TypeError, match="splits.train"):
        distill("dm", digits, 1)
    with pytest.raises(ValueError, match="images_per_class=500"):
        distill("dm", digits.train, 500)
    with pytest.raises(ValueError, match="init"):
        distill("dm", digits.train, 1, init="zeros")
    with pytest.raises(ValueError, match="set outer_loop and inner_loop"):
        distill("dsa", digits.train, 3)
    with pytest.raises(ValueError, match="without augmentation"):
        distill("dc", digits.train, 1, augment="flip")
    with pytest.raises(ValueError, match="lr"):
        distill("dm", digits.train, 1, lr=0.0)


def test_synthetic_set_file_round_trip_and_grid(tmp_path):
    splits = data.load("digits", zca=True)
    syn = distill("dm", splits.train, 2, iterations=1, batch_real=4, progress=False, **SMALL_NET)
    path = tmp_path / "set.safetensors"
    syn.save(path)
    back = SyntheticSet.load(path)
    for name in ("images", "labels", "mean", "std"):
        assert torch.equal(getattr(back, name), getattr(syn, name)), name
    assert torch.equal(back.zca.matrix, syn.zca.matrix) and back.zca.eps == syn.zca.eps
    assert (back.method, back.images_per_class, back.source, back.hyperparameters, back.seconds) == \
        (syn.method, syn.images_per_class, syn.source, syn.hyperparameters, syn.seconds)
    dataset = back.as_dataset()
    assert isinstance(dataset, data.Dataset) and dataset.zca is not None and len(dataset) == 20
    grid = tmp_path / "plots" / "grid.png"
    syn.save_grid(grid)
    import matplotlib.image

    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(grid).ndim == 3
    pixels = syn.pixels()
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert rel_error(splits.train.normalize(syn.as_dataset().denormalize(syn.images)), syn.images) < 1e-4
    from fastmask import io

    io.save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a synthetic set"):
        SyntheticSet.load(tmp_path / "other.safetensors")


def test_evaluate_rejects_a_test_set_of_another_space(digits):
    syn = random_real(digits.train, 1)
    whitened = data.load("digits", zca=True)
    with pytest.raises(ValueError, match="normalised differently"):
        evaluate(syn, "convnet3", whitened.test)
    with pytest.raises(ValueError, match="seeds"):
        evaluate(syn, "convnet3", digits.test, seeds=())


def test_evaluate_trains_seed_k_on_set_k_of_a_list(digits):
    """A list of sets, one per seed: each seed's network trains on its own set, as if evaluated alone."""
    cfg = evaluation_config(epochs=5, batch_size=10)
    sets = [random_real(digits.train, 1, seed=s) for s in (3, 4)]
    options = dict(model_options={"width": 8, "depth": 2}, cfg=cfg)
    paired = evaluate(sets, "convnet", digits.test, seeds=(0, 1), **options)
    alone = [evaluate(each, "convnet", digits.test, seeds=(seed,), **options)["mean"]
             for each, seed in zip(sets, (0, 1))]
    assert paired["accuracies"] == pytest.approx(alone, abs=1e-9)
    assert paired["mean"] == pytest.approx(np.mean(alone)) and paired["accuracies"][0] != paired["accuracies"][1]
    with pytest.raises(TypeError, match="one per seed"):
        evaluate(sets, "convnet", digits.test, seeds=(0, 1, 2))


# ---------------------------------------------------------------------------------------------- the stage


def _distill_stage(tmp_path, monkeypatch, spoil: str):
    """The distill stage on digits with tiny networks, the distilled set (``spoil="distilled"``) or
    the random-real baseline (``"random"``) replaced by blank images: a set that must lose."""
    from fastmask.config import load_config
    from fastmask.stages import Context
    from fastmask.stages import distill as stage

    cfg = load_config(overrides=["device=cpu", "model.width=8", "inner_train.steps=20", "inner_train.lr=0.1",
                                 "inner_train.batch_size=20", "distill.iterations=2", "distill.eval_seeds=2",
                                 "distill.images_per_class=2", "distill.lr=2.0"])

    def blank(syn):
        return dataclasses.replace(syn, images=torch.zeros_like(syn.images))

    if spoil == "distilled":
        real_distill = stage.distill.distill
        monkeypatch.setattr(stage.distill, "distill", lambda *args, **kwargs: blank(real_distill(*args, **kwargs)))
    else:
        real_sets = stage.random_sets
        monkeypatch.setattr(stage, "random_sets", lambda ctx: [blank(syn) for syn in real_sets(ctx)])
    ctx = Context(tmp_path, cfg, torch.device("cpu"), data.load("digits"), {"stages": {}}, progress=False)
    result = stage.run(ctx)
    report = "\n".join(stage.report(result, ReportContext(tmp_path, tmp_path / "plots", {})))
    return result, report


def test_distill_stage_warns_when_the_distilled_set_loses_to_random_real_images(tmp_path, monkeypatch, capsys):
    result, report = _distill_stage(tmp_path, monkeypatch, spoil="distilled")
    assert result["beats_random"] is False and result["margin"] < 0
    assert result["margin"] == pytest.approx(100 * (result["syn_test_accuracy"] - result["random_test_accuracy"]))
    message = "the distilled set does NOT beat random real images of the same size"
    warning = [line for line in capsys.readouterr().err.splitlines() if message in line]
    assert len(warning) == 1 and f"{100 * result['random_test_accuracy']:.1f}%" in warning[0]
    assert f"**Warning: {message}" in report and "| random real images" in report


def test_distill_stage_records_the_random_baseline_and_a_win(tmp_path, monkeypatch, capsys):
    result, report = _distill_stage(tmp_path, monkeypatch, spoil="random")
    assert result["beats_random"] is True and result["margin"] > 0
    assert len(result["random_test_accuracies"]) == 2
    assert all(0 <= a <= 1 for a in result["random_test_accuracies"] + [result["random_test_accuracy_std"]])
    assert result["random_test_accuracy"] == pytest.approx(np.mean(result["random_test_accuracies"]))
    assert "NOT beat" not in capsys.readouterr().err + report
    assert "beats random real images of the same size by" in report
    assert f"| distilled (dm) | {100 * result['syn_test_accuracy']:.1f}" in report
    assert f"| random real images (a draw per seed) | {100 * result['random_test_accuracy']:.1f}" in report
    assert SyntheticSet.load(tmp_path / "distilled.safetensors").hyperparameters["lr"] == 2.0  # distill.lr


def test_random_baseline_draws_a_set_per_eval_seed_and_none_for_method_random(tmp_path):
    from fastmask.config import load_config
    from fastmask.stages import Context
    from fastmask.stages import distill as stage

    cfg = load_config(overrides=["device=cpu", "distill.eval_seeds=3"])
    ctx = Context(tmp_path, cfg, torch.device("cpu"), data.load("digits"), {"stages": {}}, progress=False)
    sets = stage.random_sets(ctx)
    assert len(sets) == 3 and all(len(syn) == 100 for syn in sets)
    assert not torch.equal(sets[0].images, sets[1].images)
    assert torch.equal(sets[2].images, stage.random_sets(ctx)[2].images)  # seeded
    ctx.cfg = load_config(overrides=["device=cpu", "distill.method=random"])
    nulls = stage._against_random(ctx, {"mean": 0.5})
    assert nulls == dict.fromkeys(("random_test_accuracy", "random_test_accuracy_std", "random_test_accuracies",
                                   "beats_random", "margin"))


# ---------------------------------------------------------------------------------------------- the claim


# Digits are 8x8: ConvNet-2 (8 -> 4 -> 2) rather than ConvNet-3, whose third block normalises
# 2x2 maps and pools them to 1x1, which leaves DM's embedding almost no signal. Short runs with
# learning rates for 8x8 images (the papers' lr 0.1 for DSA moves 8x8 pixels too far).
CLAIM_NET = {"model": "convnet", "model_options": {"width": 32, "depth": 2}}
CLAIM_SETTINGS = {
    "dm": dict(iterations=300, batch_real=64, lr=1.0),
    "dsa": dict(iterations=10, batch_real=64, lr=0.03, outer_loop=10, inner_loop=5, lr_net=0.05),
}


def test_dm_and_dsa_sets_beat_random_real_images_on_digits(digits):
    """10 images per class; each set trains 3 fresh ConvNets (seeds 0, 1, 2) with the same
    evaluation (300 epochs, SGD lr 0.01 / 10 half-way); the mean accuracy of the DM set and of the
    DSA set each exceeds that of 10 random real images per class (the distillations' init)."""
    accuracy = {}
    for method in ("random", "dm", "dsa"):
        settings = CLAIM_SETTINGS.get(method, {})
        syn = distill(method, digits.train, 10, seed=0, progress=False, **settings,
                      **({} if method == "random" else CLAIM_NET))
        result = evaluate(syn, CLAIM_NET["model"], digits.test, seeds=(0, 1, 2),
                          model_options=CLAIM_NET["model_options"])
        accuracy[method] = result
        print(f"{method}: {100 * result['mean']:.1f} +- {100 * result['std']:.1f} "
              f"{np.round(100 * np.array(result['accuracies']), 1).tolist()} (distilled in {syn.seconds:.1f} s)")
    assert accuracy["dm"]["mean"] > accuracy["random"]["mean"], accuracy
    assert accuracy["dsa"]["mean"] > accuracy["random"]["mean"], accuracy
