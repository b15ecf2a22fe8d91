"""The eager reference pipeline (bench/reference/), the benchmarks' baseline: its pieces against
fastmask and against exact answers, and its results against fastmask's pipeline on digits.

Run from the repository root (``python -m pytest``), which puts ``bench`` on the import path.
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmask.models as fastmask_models
from fastmask import data, masks as fastmask_masks, pipeline, prune as fastmask_prune
from fastmask.train import TrainConfig

from bench.reference import __main__ as cli
from bench.reference import distill, hessian, landscape, lmc, models, prune
from bench.reference.data import CropFlip, eval_loader
from bench.reference.train import lr_factor, total_steps, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny models run several times faster on one intra-op thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.mark.parametrize("name, shape, options", [
    ("convnet3", (1, 8, 8), {"width": 16}),
    ("convnet3", (3, 16, 16), {"width": 8, "norm": "batch"}),
    ("resnet18", (3, 8, 8), {"width": 4}),
])
def test_models_have_fastmask_architecture_and_initialisation(name, shape, options):
    torch.manual_seed(3)
    ours = fastmask_models.create(name, 10, shape, **options)
    torch.manual_seed(3)
    reference = models.create(name, 10, shape, **options)
    theirs = {k: v for k, v in ours.state_dict().items() if not k.endswith(".mask")}
    mine = reference.state_dict()
    assert list(mine) == list(theirs)
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    x = torch.randn(5, *shape)
    torch.testing.assert_close(reference.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-6)
    assert [n for n, _ in models.prunable_modules(reference)] == [p.rpartition(".")[0] for p in ours.prunable]


def test_crop_flip_returns_a_window_of_the_zero_padded_image():
    image = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6) + 1
    padded = F.pad(image, (4, 4, 4, 4))
    windows = [padded[:, top:top + 5, left:left + 6] for top in range(9) for left in range(9)]
    candidates = windows + [w.flip(-1) for w in windows]
    torch.manual_seed(0)
    flipped = shifted = 0
    for _ in range(60):
        out = CropFlip(4, flip=True)(image)
        index = next(i for i, c in enumerate(candidates) if torch.equal(out, c))
        flipped += index >= len(windows)
        shifted += index % len(windows) != 4 * 9 + 4
    assert 10 < flipped < 50 and shifted > 40
    assert all(torch.equal(CropFlip(0, flip=False)(image), image) for _ in range(5))


@pytest.mark.parametrize("options", [dict(schedule="cosine"), dict(schedule="step", milestones=(0.3, 0.6), gamma=0.2),
                                     dict(schedule="constant", warmup_steps=7), dict(schedule="cosine", warmup_steps=5)])
def test_learning_rate_schedule_is_fastmasks(options):
    cfg = TrainConfig(lr=0.1, steps=40, **options)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, 40))
    for step in range(40):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * cfg.lr_factor(step, 40), rel=1e-12)
        optimizer.step()
        schedule.step()
    assert total_steps(TrainConfig(epochs=2.5, batch_size=64), 1437) == TrainConfig(
        epochs=2.5, batch_size=64).total_steps(1437)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_torch_prune_gives_fastmasks_masks_round_after_round(scope, channels_last):
    torch.manual_seed(1)
    ours = fastmask_models.create("convnet3", 10, (3, 8, 8), width=8)
    torch.manual_seed(1)
    reference = models.create("convnet3", 10, (3, 8, 8), width=8)
    if channels_last:  # as the reference loop trains on CUDA
        reference.to(memory_format=torch.channels_last)
    masks = None
    for r in range(1, 4):
        density = 0.8**r
        masks = fastmask_prune.magnitude_masks(ours, scope=scope, masks=masks, density=density)
        mine = prune.prune_to_density(reference, density, scope)
        assert set(mine) == set(masks)
        for name in masks:
            assert torch.equal(mine[name], masks[name]), (r, name)
        assert prune.density(mine) == fastmask_masks.density(masks)


def test_torch_prune_scores_the_current_weights_not_the_last_forwards():
    """After an optimizer step (no forward since), the next round ranks the updated weights: a pruned
    module's ``weight`` attribute still holds the last forward's."""
    torch.manual_seed(2)
    model = models.create("convnet3", 10, (3, 8, 8), width=8)
    prune.prune_to_density(model, 0.8, "global")
    modules = models.prunable_modules(model)
    with torch.no_grad():  # as an optimizer step would
        for _, m in modules:
            m.weight_orig.copy_(torch.randn_like(m.weight_orig))
    masks = prune.prune_to_density(model, 0.64, "global")
    current = {name: (m.weight_orig * m.weight_mask).detach().abs() for name, m in modules}
    flat = torch.cat([w.flatten() for w in current.values()])
    threshold = flat.topk(round(0.64 * flat.numel())).values.min()
    for name, weight in current.items():
        assert torch.equal(masks[f"{name}.weight"], weight >= threshold), name


def test_random_masks_keep_the_same_count_in_every_layer():
    model = models.create("convnet3", 10, (3, 8, 8), width=8)
    masks = prune.random_masks(model, 0.3, seed=0)
    for name, module in models.prunable_modules(model):
        assert int(masks[f"{name}.weight"].sum()) == round(0.3 * module.weight.numel())
        assert not hasattr(module, "weight_mask")  # the model itself is left unpruned
    assert not torch.equal(masks["head.weight"], prune.random_masks(model, 0.3, seed=1)["head.weight"])


def test_imp_with_a_per_round_inner_loop_and_without_retraining(digits):
    """A per-round schedule of inner loops without retraining: the masks of every round, test
    accuracies only where a real round trained the mask, the same densities as before."""
    torch.manual_seed(0)
    template = models.create("convnet3", 10, (1, 8, 8), width=8)
    split = {"train": (digits.train.images[:256], digits.train.labels[:256]),
             "test": (digits.test.images[:100], digits.test.labels[:100]),
             "distilled": (digits.train.images[:20], digits.train.labels[:20])}
    retrain_cfg = TrainConfig(steps=8, batch_size=32, lr=0.05, augment=False)
    inner_cfg = TrainConfig(steps=3, batch_size=10, lr=0.01, augment=False)
    options = dict(scope="global", inner_cfg=inner_cfg, retrain_cfg=retrain_cfg, seed=0, device=torch.device("cpu"))
    hybrid = prune.imp(template, split, 3, 0.2, 0, ["distilled", "real", "distilled"], retrain=False, **options)
    distilled = prune.imp(template, split, 1, 0.2, 0, "distilled", **options)  # retrained: every accuracy
    assert len(hybrid.masks) == 4 and [r["round"] for r in hybrid.rounds] == [0, 1, 2, 3]
    assert [r["inner"] for r in hybrid.rounds] == ["dense", "distilled", "real", "distilled"]
    accuracies = [r["test_accuracy"] for r in hybrid.rounds]
    assert accuracies[0] is None and accuracies[2] is None and accuracies[3] is None  # not trained on real data
    assert 0 <= accuracies[1] <= 1  # round 1's mask trained by the real round
    assert all(0 <= r["test_accuracy"] <= 1 for r in distilled.rounds)
    size = sum(m.numel() for m in hybrid.masks[0].values())
    assert [r["density"] for r in hybrid.rounds] == [round(0.8**r * size) / size for r in range(4)]
    assert [r["train_points_used"] for r in hybrid.rounds] == [0, 30, 30 + 8 * 32, 30 + 8 * 32 + 30]
    for name, mask in distilled.masks[1].items():  # round 0 trained on the distilled set in both
        assert torch.equal(hybrid.masks[1][name], mask), name
    with pytest.raises(ValueError, match="inner"):
        prune.imp(template, split, 3, 0.2, 0, ["distilled", "real"], **options)


def test_training_learns_and_keeps_pruned_weights_exactly_zero(digits):
    torch.manual_seed(0)
    model = models.create("convnet3", 10, (1, 8, 8), width=8, norm="batch")
    masks = prune.random_masks(model, 0.5, seed=0)
    prune.apply_masks(model, masks)
    cfg = TrainConfig(steps=60, batch_size=32, lr=0.1, weight_decay=5e-4, augment=False)
    outcome = train(model, digits.train.images, digits.train.labels, cfg, seed=0, device=torch.device("cpu"),
                    test=(digits.test.images, digits.test.labels))
    assert outcome.steps == 60 and outcome.examples_seen == 60 * 32
    assert sum(outcome.losses[-10:]) < 0.7 * sum(outcome.losses[:10])
    assert outcome.test_accuracy > 0.5
    for name, module in models.prunable_modules(model):
        pruned = ~masks[f"{name}.weight"]
        assert (module.weight_orig[pruned] == 0).all() and (module.weight_orig[~pruned] != 0).any()
    copied = prune.copy_model(model)  # a trained, pruned model can be copied (deepcopy alone refuses)
    assert torch.equal(copied.head.weight_orig, model.head.weight_orig)


def _twin_models(seed: int, norm: str, digits):
    """A fastmask model and a reference model with the same weights, masks and BatchNorm statistics."""
    torch.manual_seed(seed)
    ours = fastmask_models.create("convnet3", 10, (1, 8, 8), width=8, norm=norm)
    torch.manual_seed(seed)
    reference = models.create("convnet3", 10, (1, 8, 8), width=8, norm=norm)
    masks = prune.random_masks(reference, 0.5, seed=0)
    fastmask_masks.apply(ours, masks)
    prune.apply_masks(reference, masks)
    with torch.no_grad():  # running statistics away from their defaults, alike in both; confident logits
        ours.train()(digits.train.images[:300])
        reference.train()(digits.train.images[:300])
        ours.head.weight.mul_(30)
        reference.head.weight_orig.mul_(30)
    return ours.eval(), reference.eval()


@pytest.mark.parametrize("reset", [False, True])
def test_interpolation_one_alpha_at_a_time_matches_fastmask_lmc(digits, reset):
    from fastmask import lmc as fastmask_lmc

    (ours_a, ref_a), (ours_b, ref_b) = _twin_models(1, "batch", digits), _twin_models(2, "batch", digits)
    alphas = lmc.alpha_grid(5)
    expected = fastmask_lmc.interpolate(ours_a, ours_b, alphas, digits.test,
                                        bn_reset_data=digits.train if reset else None)
    reset_loader = eval_loader(digits.train.images, digits.train.labels, 1024) if reset else None
    losses, errors = lmc.curve(ref_a, ref_b, alphas, eval_loader(digits.test.images, digits.test.labels, 1024),
                               torch.device("cpu"), reset_loader=reset_loader)
    assert losses == pytest.approx(expected.loss, rel=1e-4)
    assert errors == pytest.approx(expected.error, abs=1.5 / len(digits.test))
    assert max(losses) - min(losses) > 0.1  # the two endpoints really differ
    assert lmc.barrier(alphas, losses) == pytest.approx(expected.barrier_loss, rel=1e-3, abs=1e-4)
    assert lmc.barrier([0.0, 0.5, 1.0], [0.1, 0.5, 0.2]) == pytest.approx(0.35)


def test_plane_one_point_at_a_time_matches_fastmask_landscape(digits):
    from fastmask import landscape as fastmask_landscape

    (o0, r0), (o1, r1), (o2, r2) = (_twin_models(seed, "instance", digits) for seed in (1, 2, 3))
    expected = fastmask_landscape.plane(o0, o1, o2, digits.test, grid=(3, 3))
    result = landscape.plane(r0, r1, r2, eval_loader(digits.test.images, digits.test.labels, 1024), 3,
                             torch.device("cpu"))
    assert result["x"] == pytest.approx(expected.x.tolist(), rel=1e-6)
    assert result["y"] == pytest.approx(expected.y.tolist(), rel=1e-6)
    assert result["points"]["w2"] == pytest.approx(list(expected.points["w2"]), rel=1e-6)
    torch.testing.assert_close(torch.tensor(result["loss"], dtype=torch.float64),
                               torch.from_numpy(expected.loss).double(), rtol=1e-4, atol=1e-5)


def test_batch_norm_reset_recomputes_the_statistics_of_the_data():
    net = nn.Sequential(nn.BatchNorm2d(3))
    x = torch.randn(40, 3, 4, 4) * 2 + 1
    lmc.reset_batch_norm(net, eval_loader(x, torch.zeros(40, dtype=torch.long), 40), torch.device("cpu"))
    torch.testing.assert_close(net[0].running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(net[0].running_var, x.transpose(0, 1).flatten(1).var(1))
    assert not net.training


def _exact_hessian_trace(model, inputs, targets):
    """Trace of the Hessian of the mean loss over the unpruned entries, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for _, p in model.named_parameters()])

    def loss(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = vector[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
        return F.cross_entropy(torch.func.functional_call(model, params, (inputs,)), targets)

    diagonal = torch.autograd.functional.hessian(loss, flat).diagonal()
    return diagonal.sum().item(), diagonal.abs().max().item()


def test_hutchinson_estimates_the_trace_of_the_mean_loss_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    nn.utils.prune.custom_from_mask(model[0], "weight", torch.rand(5, 4) > 0.5)
    inputs, targets = torch.randn(12, 4), torch.randint(0, 3, (12,))
    exact, largest = _exact_hessian_trace(model, inputs, targets)
    device = torch.device("cpu")
    one_batch = hessian.hutchinson(model, [(inputs, targets)], 600, seed=0, device=device)
    two_batches = hessian.hutchinson(model, [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])], 600, seed=0,
                                     device=device)
    assert one_batch["trace"] == pytest.approx(two_batches["trace"], rel=1e-4)  # the same probes, the same H
    assert abs(one_batch["trace"] - exact) < 4 * one_batch["trace_stderr"]
    assert one_batch["trace_stderr"] < 0.2 * abs(exact)
    unpruned = sum(p.numel() for p in model.parameters()) - int((model[0].weight_mask == 0).sum())
    assert one_batch["diag_mean"] * unpruned == pytest.approx(one_batch["trace"], rel=1e-4)
    assert 0 < one_batch["diag_max"] < 3 * largest and one_batch["num_probes"] == 600
    assert model[0].weight_orig.grad is None  # nothing left behind


def test_siamese_augmentation_transforms_both_batches_alike():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    changed = 0
    for _ in range(40):
        a, b = distill.siamese_augment([x, x.clone()], generator)
        assert a.shape == x.shape and torch.equal(a, b)
        changed += not torch.allclose(a, x)
    assert changed > 20
    syn = x.clone().requires_grad_()
    for _ in range(12):  # every group is differentiable with respect to the images
        (out,) = distill.siamese_augment([syn], generator)
        out.sum().backward()
    assert syn.grad is not None and torch.isfinite(syn.grad).all()


def test_distribution_matching_updates_the_real_initialisation(digits):
    images, labels = digits.train.images, digits.train.labels
    synthetic, synthetic_labels = distill.distribution_matching(
        images, labels, 10, 2, iterations=3, num_networks=2, batch_real=16, seed=0, device=torch.device("cpu"),
        build=lambda: models.create("convnet3", 10, (1, 8, 8), width=8))
    start = images[distill.random_real(labels, 10, 2, torch.Generator().manual_seed(0))]
    assert synthetic.shape == (20, 1, 8, 8) and torch.isfinite(synthetic).all()
    assert torch.equal(synthetic_labels, torch.arange(10).repeat_interleave(2))
    assert 0 < (synthetic - start).abs().max() < 10


def test_unknown_distillation_method_is_refused():
    from fastmask.config import load_config
    from bench.reference import run_reference

    with pytest.raises(ValueError, match="distill.method"):
        run_reference(load_config(overrides=["distill.method=dsa", "device=cpu"]))


@pytest.mark.parametrize("arm", ["subset", "easy"])
def test_study_arms_the_reference_does_not_write_are_refused_before_any_work(arm, monkeypatch):
    from fastmask.config import load_config
    from bench.reference import pipeline as reference_pipeline, run_reference

    def no_work(*args, **kwargs):
        raise AssertionError("the data was loaded: work started before the refusal")

    monkeypatch.setattr(reference_pipeline.fastmask_data, "load", no_work)
    cfg = load_config(overrides=[f"study.arms=[real,{arm}]", "imp.rewind_step=2", "device=cpu"])
    with pytest.raises(ValueError, match=rf"study.arms: \['{arm}'\].*not written in the eager reference"):
        run_reference(cfg)


def test_per_example_barriers_one_alpha_at_a_time_match_fastmasks(digits):
    from fastmask import study as fastmask_study
    from bench.reference import study

    (ours_a, ref_a), (ours_b, ref_b) = _twin_models(1, "instance", digits), _twin_models(2, "instance", digits)
    train = fastmask_study.first_examples(digits.train, 300)
    expected = fastmask_study.per_example_barriers(ours_a, ours_b, 5, train)
    barriers = study.per_example_barriers(ref_a, ref_b, lmc.alpha_grid(5),
                                          eval_loader(*study.first((digits.train.images, digits.train.labels), 300),
                                                      128), torch.device("cpu"))
    assert barriers.dtype == torch.float64 and barriers.shape == (300,)
    torch.testing.assert_close(barriers, expected, rtol=1e-4, atol=1e-4)
    assert barriers.max() > 0.1  # the segment really has barriers
    for threshold in (0.05, 10.0):  # the histogram ends at the largest barrier, then at the threshold
        mine, theirs = study.connectivity(barriers, threshold, 7), fastmask_study.connectivity(expected, threshold, 7)
        assert mine["fraction"] == theirs["fraction"] and mine["threshold"] == threshold
        assert mine["histogram"]["edges"] == pytest.approx(theirs["histogram"]["edges"], abs=1e-4)
        assert mine["histogram"]["counts"] == theirs["histogram"]["counts"]
        assert mine["mean_barrier"] == pytest.approx(theirs["mean_barrier"], rel=1e-4)


# The agreement check: a short digits configuration with BatchNorm (it trains to ~98% in three
# epochs, so seed noise is small), run by fastmask's pipeline and by the reference (through its CLI).
AGREEMENT_OVERRIDES = ["device=cpu", "model.norm=batch", "model.width=16", "train.epochs=3", "train.lr=0.1",
                       "imp.rounds=2", "distill.method=random", "distill.eval_seeds=1", "inner_train.steps=30",
                       "lmc.alphas=5", "landscape.enabled=false", "hessian.num_probes=2", "hessian.examples=128",
                       "study.arms=[real,random]", "study.seeds=1", "study.train_examples=256"]
# Seed noise: the two pipelines draw different data orders (fastmask's Loader against a DataLoader),
# so they agree as two seeds of one run do. On the 360 digits test images one seed's accuracy varies
# by about 1 point (measured: 97.2 / 97.8 / 98.9% dense over seeds 0-2; fastmask against the reference
# differed by at most 1.4 points on any dense or IMP accuracy of those seeds); 4 points (14 images)
# is about three standard deviations of a difference. Barriers (test error) were all below 0.017.
ACCURACY_TOLERANCE = 0.04
BARRIER_TOLERANCE = 0.03


def _key_paths(tree, prefix=""):
    if isinstance(tree, dict):
        return {p for k, v in tree.items() for p in {f"{prefix}{k}"} | _key_paths(v, f"{prefix}{k}.")}
    return set()


def test_reference_pipeline_agrees_with_fastmask_on_digits(tmp_path, capsys):
    folder = pipeline.run(out=tmp_path / "fastmask", overrides=AGREEMENT_OVERRIDES, quiet=True)
    ours = json.loads((folder / "results.json").read_text())
    assert cli.main(["--out", str(tmp_path / "reference"), "--quiet", *AGREEMENT_OVERRIDES]) == 0
    assert "results.json" in capsys.readouterr().out
    theirs = json.loads((tmp_path / "reference" / "results.json").read_text())

    # The same schema: every key fastmask writes (bookkeeping aside), at every level of the stages.
    assert _key_paths(theirs["stages"]) >= _key_paths(ours["stages"])
    assert set(theirs) >= set(ours) - {"completed"} and set(theirs["timings"]) == set(ours["timings"])
    assert theirs["config"] == ours["config"]

    s, r = ours["stages"], theirs["stages"]
    assert abs(s["dense"]["test_accuracy"] - r["dense"]["test_accuracy"]) <= ACCURACY_TOLERANCE
    assert s["dense"]["steps"] == r["dense"]["steps"]
    assert abs(s["distill"]["syn_test_accuracy"] - r["distill"]["syn_test_accuracy"]) <= ACCURACY_TOLERANCE
    for inner in ("real", "distilled", "random"):
        assert len(s["imp"][inner]) == len(r["imp"][inner]) == 3
        for a, b in zip(s["imp"][inner], r["imp"][inner]):
            assert a["density"] == b["density"] and a["train_points_used"] == b["train_points_used"]
            assert abs(a["test_accuracy"] - b["test_accuracy"]) <= ACCURACY_TOLERANCE, (inner, a, b)
    for network in ("dense", "real", "distilled"):
        a, b = s["lmc"][network], r["lmc"][network]
        assert a["alphas"] == b["alphas"] and a["density"] == b["density"]
        for key in ("barrier_error", "train_barrier_error"):
            assert abs(a[key] - b[key]) <= BARRIER_TOLERANCE, (network, key, a[key], b[key])
        assert abs(a["bn_reset"]["barrier_error"] - b["bn_reset"]["barrier_error"]) <= BARRIER_TOLERANCE
        for error in b["test_error"]:  # BatchNorm statistics interpolated: no collapse along the path
            assert error < 0.2
        assert math.isfinite(r["hessian"][network]["trace"]) and r["hessian"][network]["num_probes"] == 2
    _check_study(s["study"], r["study"])


def _check_study(ours, theirs):
    """The reference's study against fastmask's (its schema is checked with the whole results')."""
    assert set(theirs["arms"]) == set(ours["arms"]) == {"real", "random"} and theirs["seeds"] == ours["seeds"] == 1
    assert set(theirs["per_example_lmc"]) == set(ours["per_example_lmc"]) == {"dense", "real", "random"}
    for arm in ("real", "random"):
        assert len(theirs["arms"][arm]) == len(ours["arms"][arm]) == 3
        for a, b in zip(ours["arms"][arm], theirs["arms"][arm]):
            assert set(b) == set(a)  # the entries are in lists, which _key_paths does not enter
            assert (a["round"], a["density"], a["train_points_used"]) == (b["round"], b["density"],
                                                                          b["train_points_used"])
            assert abs(a["test_accuracy_mean"] - b["test_accuracy_mean"]) <= ACCURACY_TOLERANCE, (arm, a, b)
            for key in ("barrier_error_test_mean", "barrier_error_train_mean"):
                assert abs(a[key] - b[key]) <= BARRIER_TOLERANCE, (arm, key, a[key], b[key])
            assert len(b["hessian_traces"]) == 1 and math.isfinite(b["hessian_trace"])
            assert b["hessian_trace_std"] == 0.0 and b["hessian_trace_stderr"] > 0
        assert theirs["arms"][arm][0] == theirs["arms"]["real"][0]  # round 0: the dense network, measured once
        assert theirs["curves"][arm]["alphas"] == ours["curves"][arm]["alphas"]
    for network, connected in theirs["per_example_lmc"].items():
        assert connected["histogram"]["edges"][0] <= 0 and sum(connected["histogram"]["counts"]) == 256
        # seed noise, as for the accuracies: measured differences up to 0.055 (256 examples)
        assert abs(connected["fraction"] - ours["per_example_lmc"][network]["fraction"]) <= 0.15, network
    assert [c["claim"] for c in theirs["claims"]] == [c["claim"] for c in ours["claims"]]
    assert theirs["landscapes"] == ours["landscapes"] == {} and theirs["stacked"] is False


def _load_table_module():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_is_written_between_the_markers_from_the_newest_results(tmp_path):
    table = _load_table_module()
    results = tmp_path / "results"
    results.mkdir()
    row = {"bench": "bench_masked_conv2d[x]", "case": "conv 3->128 32x32 bf16",
           "median_ms": {"prune": 2.0, "fastmask": 0.5}, "baseline": "prune", "speedup_vs_baseline": {"fastmask": 4.0},
           "speedup_range": {"fastmask": [3.5, 4.5]}, "roofline_fraction": 0.25}
    old = {"date": "2026-01-01", "device": "Old GPU", "driver": "1", "torch": "2.0", "triton": "3.0", "rows": []}
    new = {"date": "2026-02-01", "device": "NVIDIA H100 80GB HBM3", "driver": "550.54", "torch": "2.11.0",
           "triton": "3.6.0", "python": "3.12", "rows": [{"bench": "roofline", "hbm_bytes_per_s": 3.0e12,
                                                          "matmul_flops": {"bfloat16": 7.0e14}}, row]}
    cpu_row = {"bench": "bench_lmc_interpolate[convnet3-digits]", "case": "convnet3 alphas=30 digits", "mode": "full",
               "median_ms": {"loop": 900.0, "fastmask": 450.0}, "baseline": "loop",
               "speedup_vs_baseline": {"fastmask": 2.0}, "speedup_range": {"fastmask": [1.8, 2.2]}, "threads": 2}
    cpu = {"date": "2026-02-02", "kind": "cpu", "device": "Some CPU", "torch": "2.13.0", "threads": 2,
           "rows": [cpu_row]}
    (results / "2026-01-01-old-gpu.json").write_text(json.dumps(old))
    (results / "2026-02-01-h100.json").write_text(json.dumps(new))
    (results / "2026-02-02-cpu-some-cpu.json").write_text(json.dumps(cpu))
    (results / "2026-02-03-smoke.json").write_text(json.dumps({"date": "2026-02-03", "rows": [cpu_row]}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table:start -->\nstale\n<!-- bench-table:end -->\nmiddle\n"
                      "<!-- bench-table-cpu:start -->\nstale cpu\n<!-- bench-table-cpu:end -->\noutro\n")
    assert table.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench-table:start -->\n")
    assert text.endswith("<!-- bench-table-cpu:end -->\noutro\n")
    assert "stale" not in text and "NVIDIA H100 80GB HBM3" in text and "2.11.0" in text and "Old GPU" not in text
    gpu_part, cpu_part = text.split("middle")
    line = next(line for line in gpu_part.splitlines() if "conv 3->128" in line)
    assert "0.500" in line and "2.000" in line and "4.00x (3.50-4.50)" in line and "0.25" in line
    assert "Some CPU" in cpu_part and "2 torch threads" in cpu_part and "Some CPU" not in gpu_part
    line = next(line for line in cpu_part.splitlines() if "alphas=30" in line)
    assert "2.00x (1.80-2.20) vs loop" in line and "900.0" in line


def test_table_leaves_the_readme_alone_without_results(tmp_path, capsys):
    table = _load_table_module()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-table:start -->\nnothing measured\n<!-- bench-table:end -->\n")
    assert table.main(["--results", str(tmp_path / "none"), "--readme", str(readme)]) == 0
    assert readme.read_text() == "<!-- bench-table:start -->\nnothing measured\n<!-- bench-table:end -->\n"
    assert "no results file" in capsys.readouterr().out
