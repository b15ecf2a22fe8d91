"""The study stage: a tiny study end to end through the pipeline, its results.json keys and claims,
resume after a kill, stacks against stacks of one, and bad configurations."""
import json
import statistics
import types

import pytest
import torch

from fastmask import models, pipeline, study
from fastmask import train as train_module
from fastmask.config import load_config
from fastmask.data import from_tensors
from fastmask.train import TrainConfig

# Every stage as short as it goes on a 400-example digits subset; the study: 3 arms, 2 densities, 2 seeds.
TINY = ["device=cpu", "data.train_size=400", "model.width=8", "train.steps=8", "train.batch_size=64",
        "inner_train.steps=5", "distill.iterations=2", "distill.batch_real=8", "distill.eval_seeds=2",
        "imp.rounds=1", "lmc.alphas=3", "landscape.grid=3", "hessian.num_probes=2", "hessian.examples=32",
        "study.arms=[real,distilled,random]", "study.seeds=2", "study.train_examples=64"]
ENTRY_KEYS = {"density", "test_accuracy_mean", "test_accuracy_std", "barrier_error_test_mean",
              "barrier_error_test_std", "barrier_error_train_mean", "barrier_loss_test_mean", "hessian_trace",
              "hessian_trace_std", "hessian_traces", "hessian_trace_stderr", "train_points_used"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    pipeline.run(out=folder, overrides=TINY, quiet=True)
    return folder


def _study(folder):
    return json.loads((folder / "results.json").read_text())["stages"]["study"]


def test_results_have_the_issue_keys_and_valid_claims(finished):
    result = _study(finished)
    assert result["seeds"] == 2
    assert set(result["arms"]) == {"real", "distilled", "random"}
    for arm, entries in result["arms"].items():
        assert len(entries) == 2, arm  # density 1 and 0.8
        assert entries[1]["density"] == pytest.approx(0.8, abs=2e-3)
        for entry in entries:
            assert ENTRY_KEYS <= set(entry), arm
            assert len(entry["test_accuracies"]) == 2
            assert entry["test_accuracy_std"] >= 0 and entry["hessian_trace_stderr"] > 0
            traces = entry["hessian_traces"]  # one per seed, from different networks
            assert len(traces) == 2 and traces[0] != traces[1]
            assert entry["hessian_trace"] == pytest.approx(statistics.fmean(traces), rel=1e-12)
            assert entry["hessian_trace_std"] == pytest.approx(statistics.stdev(traces), rel=1e-12)
    # the landscape stage draws dense / real / distilled; the study the other arms' last subnetworks
    assert set(result["landscapes"]) == {"random"}
    plane = result["landscapes"]["random"]
    assert len(plane["loss"]) == 3 and all(len(row) == 3 for row in plane["loss"])  # landscape.grid=3
    assert (finished / "plots" / "study_landscape_random.png").stat().st_size > 0
    assert "study_landscape_random.png" in (finished / "report.md").read_text()
    # the dense network is measured once and shared by every arm rewound to the same point
    first = [{k: v for k, v in entries[0].items() if k != "train_points_used"} for entries in result["arms"].values()]
    assert first[0] == first[1] == first[2]
    assert result["arms"]["random"][1]["train_points_used"] == 0
    assert result["arms"]["distilled"][1]["train_points_used"] < result["arms"]["real"][1]["train_points_used"]
    assert set(result["per_example_lmc"]) == {"dense", "real", "distilled", "random"}
    for network, lmc_result in result["per_example_lmc"].items():
        assert {"fraction", "threshold", "histogram"} <= set(lmc_result)
        assert 0 <= lmc_result["fraction"] <= 1
        assert sum(lmc_result["histogram"]["counts"]) == 64, network
    claims = result["claims"]
    assert len(claims) >= 4
    for claim in claims:
        assert set(claim) == {"claim", "evidence", "verdict"} and claim["verdict"] in study.VERDICTS
    report = (finished / "report.md").read_text()
    assert "Every arm over seeds" in report and "### Claims" in report
    assert set(result["curves"]) == set(result["per_example_lmc"])
    assert len(result["curves"]["real"]["test_error"]) == 3
    for name in ("study_accuracy", "study_barriers", "study_hessian", "study_curves", "study_per_example_lmc"):
        png = finished / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_rerun_after_a_kill_inside_the_study_gives_the_same_results(finished):
    """A kill after some units of work: the stage is not finished and a unit file is missing."""
    expected = _study(finished)
    results_file = finished / "results.json"
    results = json.loads(results_file.read_text())
    results["completed"].remove("study")
    del results["stages"]["study"]
    results_file.write_text(json.dumps(results))
    (finished / "units" / "study" / "distilled_1.json").unlink()
    pipeline.run(out=finished, overrides=TINY, quiet=True)
    assert _study(finished) == expected


def _tiny_problem():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(96, 1, 8, 8, generator=generator)
    # learnable labels: the signs of two quadrants' means
    labels = 2 * (images[:, 0, :4, :4].mean((1, 2)) > 0).long() + (images[:, 0, 4:, 4:].mean((1, 2)) > 0).long()
    splits = from_tensors(images[:64], labels[:64], images[64:], labels[64:])
    torch.manual_seed(0)
    model = models.create("convnet3", 4, (1, 8, 8), width=4)
    return model, splits


def test_stacks_and_stacks_of_one_give_the_same_results():
    model, splits = _tiny_problem()
    cfg = TrainConfig(steps=4, batch_size=16, augment=False, lr=0.05)
    rewind = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.7
             for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1}
    options = dict(alphas=3, hessian_batches=[(splits.train.images[:32], splits.train.labels[:32])],
                   hessian_probes=2)
    stacked, pair = study.measure(model, masks, rewind, splits, cfg, 2, **options)
    alone, pair_alone = study.measure(model, masks, rewind, splits, cfg, 2, stack_size=1, **options)
    assert stacked.keys() == alone.keys()
    curves, curves_alone = stacked.pop("curve_seed0"), alone.pop("curve_seed0")
    for key, value in [*stacked.items(), *curves.items()]:
        assert value == pytest.approx({**alone, **curves_alone}[key], rel=1e-4, abs=1e-5), key
    for a, b in zip(pair, pair_alone):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_copies_per_stack_from_the_free_memory_with_a_faked_cuda(monkeypatch):
    """On CUDA the copies that fit in 0.6 of the free memory plus what the caching allocator holds
    unused, from one copy's footprint: 0.6 * (50,000 + 20,000 - 5,000) / 4,000 gives 9; all of
    them on the CPU; at least one."""
    class OnCuda(torch.nn.Module):
        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("cuda"))

    model, splits = _tiny_problem()
    cfg = TrainConfig(steps=4, batch_size=16)
    free, reserved = [50_000], [20_000]
    measured = []
    monkeypatch.setattr(study, "training_footprint", lambda *args: measured.append(args) or 4000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[0], 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved[0])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5000)
    assert study.copies_per_stack(model, splits.train, cfg, 20) == 20 and not measured  # the CPU: all
    assert study.copies_per_stack(OnCuda(), splits.train, cfg, 20) == 9
    assert study.copies_per_stack(OnCuda(), splits.train, cfg, 6) == 6
    free[0], reserved[0] = 0, 5000
    assert study.copies_per_stack(OnCuda(), splits.train, cfg, 6) == 1
    assert len(measured) == 3 and measured[0][1:] == (splits.train, cfg)


@pytest.mark.gpu
def test_training_footprint_and_copies_per_stack_on_cuda():
    """One copy's measured step takes more than its weights, gradients and momentum; a tiny model's
    copies all fit, and train as one stack (each from the rewind weights, each its own data order)."""
    model, splits = _tiny_problem()
    model, splits = model.cuda(), splits.to("cuda")
    cfg = TrainConfig(steps=4, batch_size=16, augment=False, lr=0.05)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert train_module.training_footprint(model, splits.train, cfg) > 3 * parameter_bytes
    assert study.copies_per_stack(model, splits.train, cfg, 4) == 4
    rewind = {k: v.clone() for k, v in model.state_dict().items()}
    copies = study.train_copies(model, None, rewind, splits.train, cfg, [1, 2, 3, 4])
    weights = [copy.state_dict()["features.0.weight"] for copy in copies]
    assert len(copies) == 4 and not torch.equal(weights[0], rewind["features.0.weight"])
    assert not torch.equal(weights[0], weights[1])


def test_per_example_barriers_match_a_loop_over_alphas():
    model, splits = _tiny_problem()
    other = models.create("convnet3", 4, (1, 8, 8), width=4)
    barriers = study.per_example_barriers(model, other, 5, splits.test)
    losses = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        mixed = models.create("convnet3", 4, (1, 8, 8), width=4)
        mixed.load_state_dict({k: (1 - alpha) * v + alpha * other.state_dict()[k]
                               for k, v in model.state_dict().items()})
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(mixed.eval()(splits.test.images).double(),
                                                             splits.test.labels, reduction="none"))
    losses = torch.stack(losses)
    torch.testing.assert_close(barriers, losses.max(0).values - (losses[0] + losses[-1]) / 2, rtol=1e-5, atol=1e-6)
    summary = study.connectivity(barriers, 0.05, bins=4)
    assert summary["fraction"] == pytest.approx(float((barriers < 0.05).double().mean()))
    assert sum(summary["histogram"]["counts"]) == len(barriers) and len(summary["histogram"]["edges"]) == 5


@pytest.mark.parametrize("override, key", [
    ("study.arms=[real,bogus]", "arms"),
    ("study.seeds=0", "seeds"),
    ("study.subset_fraction=0", "subset_fraction"),
    ("study.easy_fraction=1.5", "easy_fraction"),
])
def test_bad_study_config_is_a_value_error_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_config(overrides=[override])


def test_arms_needing_a_distilled_set_refused_when_distillation_is_off():
    with pytest.raises(ValueError, match="study.arms.*distill"):
        load_config(overrides=["study.arms=[real,hybrid]", "distill.method=random"])
    with pytest.raises(ValueError, match="rewind_step"):
        load_config(overrides=["study.arms=[subset]"])
    with pytest.raises(ValueError, match="hybrid_rounds"):
        load_config(overrides=["study.arms=[hybrid]", "imp.rounds=2", "study.hybrid_rounds=2"])


def test_claims_follow_the_numbers():
    def entry(density, accuracy, std, barrier, points, trace=1.0):
        return {"density": density, "test_accuracy_mean": accuracy, "test_accuracy_std": std,
                "barrier_error_test_mean": barrier, "barrier_error_test_std": 0.01, "hessian_trace": trace,
                "hessian_trace_stderr": 0.1, "train_points_used": points}

    dense = entry(1.0, 0.9, 0.01, 0.2, 0)
    arms = {"real": [dense, entry(0.5, 0.88, 0.01, 0.1, 10000, trace=5.0)],
            "distilled": [dense, entry(0.5, 0.89, 0.01, 0.0, 100, trace=1.0)]}
    verdicts = {c["claim"][:40]: c["verdict"] for c in study.claims(arms, {}, seeds=3)}
    assert list(verdicts.values()) == ["supported"] * 4
    arms["distilled"][1] = entry(0.5, 0.70, 0.01, 0.3, 100, trace=9.0)
    assert [c["verdict"] for c in study.claims(arms, {}, seeds=3)] == ["not supported"] * 4


def test_imp_pretrain_picks_the_rewind_points_data():
    """The subset and easy arms: the rewind point pre-trained on the subset, the rounds on real data."""
    from fastmask import prune

    model, splits = _tiny_problem()
    subset = prune.IMP(model, splits, 2, rewind_step=3, inner="real", pretrain="subset", subset_fraction=0.25,
                       retrain_cfg=TrainConfig(batch_size=8), progress=False)
    assert subset.schedule == ["real", "real"] and len(subset.pretrain_data) == 16
    assert subset.pretrain_points == 3 * 8
    real = prune.IMP(model, splits, 2, rewind_step=3, inner="real", progress=False)
    assert len(real.pretrain_data) == len(splits.train)
    with pytest.raises(ValueError, match="pretrain"):
        prune.IMP(model, splits, 2, inner="real", pretrain="distilled")


@pytest.mark.parametrize("preset", ["cifar10-convnet3", "cifar10-resnet18"])
def test_the_papers_presets_run_every_arm_on_cifar_files(tmp_path, preset):
    """The GPU presets (every arm, ZCA for ConvNet-3, ResNet-18) at tiny sizes on fake CIFAR-10 files:
    their settings reach every stage and every arm (the real presets need a GPU and the CIFAR files)."""
    from test_data import write_fake_cifar

    folder, _, _ = write_fake_cifar(tmp_path, per_batch=20)
    tiny = ["device=cpu", f"data.root={folder}", "model.width=4", "train.steps=3", "train.batch_size=16",
            "inner_train.steps=2", "inner_train.batch_size=10", "distill.iterations=1", "distill.num_networks=1",
            "distill.images_per_class=1", "distill.eval_seeds=1", "imp.rounds=2", "imp.rewind_step=1",
            "lmc.alphas=3", "landscape.grid=2", "hessian.num_probes=2", "hessian.examples=16",
            "study.seeds=1", "study.hybrid_rounds=1", "study.train_examples=16", "study.subset_fraction=0.5",
            "study.easy_fraction=0.5"]
    pipeline.run(out=tmp_path / "run", preset=preset, overrides=tiny, quiet=True)
    result = _study(tmp_path / "run")
    assert sorted(result["arms"]) == sorted(study.ARMS)
    for arm, entries in result["arms"].items():
        assert [round(e["density"], 2) for e in entries] == [1.0, 0.8, 0.64], arm
    assert {c["verdict"] for c in result["claims"]} <= set(study.VERDICTS)
