"""fastmask.distributed and torchrun: data-parallel ``fit``, units of work spread over ranks, rank-0
writing, and a pipeline under ``torchrun --nproc_per_node=2`` (gloo on the CPU) against one process.

The torchrun checks launch ``python -m torch.distributed.run --standalone`` (loopback rendezvous);
the helpers they exercise inside the processes run in ``_worker`` at the bottom of this file.
"""
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmask import distributed, pipeline
from fastmask.stages import STAGES
from helpers import without_times

# Every stage on digits with LeNet-300-100 (a model that trains to ~95% in 100 steps, so the
# results are not at chance): about 15 s in one process on this project's 2-core machines.
RUN = ["device=cpu", "model.name=lenet300_100", "distill.width=8", "train.steps=100", "train.lr=0.05",
       "train.batch_size=64", "inner_train.steps=30", "distill.iterations=3", "distill.batch_real=8",
       "distill.eval_seeds=2", "imp.rounds=2", "lmc.alphas=3", "landscape.grid=3", "hessian.num_probes=4",
       "hessian.examples=64"]
TEST_EXAMPLES = 360  # digits' test split: accuracies and errors are multiples of 1/360

# torchrun gives each process one OpenMP thread; the single process gets the same, so both do the
# same arithmetic per process and differ only where data parallelism changes the order of sums.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args, processes=2):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def differences(expected, actual, path=""):
    """Paths where two results.json trees differ beyond float rounding.

    Non-float values (keys, rounds, train points, probe counts, strings) must be equal.
    Floats: 1e-4 relative (observed here: the 2-process file is bit-identical to the 1-process
    one, and data-parallel losses differ by ~1e-7 in test_helpers_and_data_parallel_fit_under_torchrun);
    accuracies and errors may also differ by one test example, since a rounding-level change can
    flip a prediction that sits on a tie.
    """
    if isinstance(expected, dict):
        if set(expected) != set(actual):
            return [f"{path}: keys {sorted(set(expected) ^ set(actual))}"]
        return [d for key in expected for d in differences(expected[key], actual[key], f"{path}/{key}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(expected) != len(actual):
            return [f"{path}: {expected!r} != {actual!r}"]
        return [d for a, b in zip(expected, actual) for d in differences(a, b, path)]
    if isinstance(expected, float) and isinstance(actual, float):
        allowed = 1e-4 * max(1.0, abs(expected))
        if "accuracy" in path or "error" in path:
            allowed = max(allowed, 1.01 / TEST_EXAMPLES)
        return [] if abs(expected - actual) <= allowed else [f"{path}: {expected!r} != {actual!r}"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same pipeline in one process and under torchrun with two, side by side."""
    root = tmp_path_factory.mktemp("distributed")
    one, two = root / "one", root / "two"
    single = subprocess.Popen([sys.executable, "-m", "fastmask", "run", "--quiet", "--out", str(one), *RUN], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parallel = torchrun("-m", "fastmask", "run", "--quiet", "--out", str(two), *RUN)
    finish(single)
    output = finish(parallel)
    return one, two, output


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_torchrun_pipeline_gives_the_results_of_one_process(runs):
    one, two, _ = runs
    expected, actual = without_times(results(one)), without_times(results(two))
    assert set(actual["stages"]) == {stage.name for stage in STAGES}
    assert differences(expected, actual) == []
    assert expected["stages"]["dense"]["test_accuracy"] > 0.8  # a trained network, not chance


def test_torchrun_spreads_units_over_ranks_and_writes_one_folder(runs):
    one, two, output = runs
    files = lambda folder: sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())  # noqa: E731
    assert files(two) == files(one)  # the same run folder, no per-rank leftovers or temporary files
    assert not [f for f in files(two) if f.endswith(".tmp")]
    ranks = lambda folder: {f.stem: json.loads(f.read_text())["rank"] for f in folder.glob("*.json")}  # noqa: E731
    # Round robin over the units still to do: rank 0 takes the 1st and 3rd, rank 1 the 2nd.
    for stage in ("lmc", "landscape", "hessian"):
        assert ranks(two / "units" / stage) == {"dense": 0, "real": 1, "distilled": 0}
    for inner in ("distilled", "random"):
        assert ranks(two / f"imp_{inner}" / "retrain") == {"0": 0, "1": 1, "2": 0}
    # Real-data IMP trains rounds 0 and 1 data parallel (rank 0 records them); mask 2 is the only unit.
    assert ranks(two / "imp_real" / "retrain") == {"0": 0, "1": 0, "2": 0}
    assert len(re.findall(r"\[stage \d+/\d+\] \w+ done in", output)) == len(STAGES)  # only rank 0 speaks


def test_units_of_a_lost_rank_are_rerun_on_resume(runs, tmp_path):
    """A run that died inside LMC after rank 0 finished its units but before rank 1 did: the rerun
    computes rank 1's unit and keeps rank 0's (marked here so that recomputation would show)."""
    _, two, _ = runs
    folder = tmp_path / "resumed"
    shutil.copytree(two, folder)
    expected = without_times(results(two))
    (folder / "units" / "lmc" / "real.json").unlink()
    for stage in ("landscape", "hessian"):
        shutil.rmtree(folder / "units" / stage)
    state = results(folder)
    state["completed"] = ["distill", "dense", "imp"]
    for stage in ("lmc", "landscape", "hessian"):
        del state["stages"][stage], state["timings"][stage]
    (folder / "results.json").write_text(json.dumps(state))
    dense_unit = folder / "units" / "lmc" / "dense.json"
    marked = json.loads(dense_unit.read_text())
    marked["result"]["barrier_loss"] = 123.0
    dense_unit.write_text(json.dumps(marked))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the torchrun processes (and quicker on 2 shared cores)
    try:
        pipeline.run(out=folder, overrides=RUN, quiet=True)
    finally:
        torch.set_num_threads(threads)
    resumed = without_times(results(folder))
    assert resumed["stages"]["lmc"]["dense"]["barrier_loss"] == 123.0  # not recomputed
    resumed["stages"]["lmc"]["dense"]["barrier_loss"] = expected["stages"]["lmc"]["dense"]["barrier_loss"]
    assert differences(expected, resumed) == []
    assert json.loads((folder / "units" / "lmc" / "real.json").read_text())["rank"] == 0


def test_helpers_are_single_process_no_ops_without_torchrun(tmp_path):
    assert not distributed.active() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.is_main() and distributed.is_writer()
    assert distributed.init("cpu") is False  # no torchrun environment: nothing to join
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(5) == [5]
    with distributed.independent():
        assert not distributed.active() and distributed.is_writer()

    def refuse():
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        distributed.main_only(refuse)

    calls = []

    def square_all(units):
        calls.append(list(units))
        return [u * u for u in units]

    assert distributed.map_unit_groups(range(5), square_all, tmp_path, group=2) == {0: 0, 1: 1, 2: 4, 3: 9, 4: 16}
    assert calls == [[0, 1], [2, 3], [4]]
    assert json.loads((tmp_path / "3.json").read_text()) == {"unit": 3, "rank": 0, "result": 9}
    (tmp_path / "3.json").unlink()
    calls.clear()
    assert distributed.map_units(range(5), lambda u: -1, tmp_path, known={4: 99}) == {0: 0, 1: 1, 2: 4, 3: -1, 4: 99}
    with pytest.raises(ValueError, match="cannot name a file"):
        distributed.map_units(["../escape"], lambda u: 0, tmp_path)
    with pytest.raises(ValueError, match="results for the"):
        distributed.map_unit_groups(["a", "b"], lambda units: [0], tmp_path / "short", group=2)
    with pytest.raises(ValueError, match="distinct"):
        distributed.map_units([1, 1], lambda u: u)
    assert distributed.local_device("cuda:1") == torch.device("cuda:1")  # no group: left as it is


def test_helpers_and_data_parallel_fit_under_torchrun(tmp_path):
    finish(torchrun(__file__, str(tmp_path)))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert report["world"] == 2 and report["active"]
        assert report["shard"] == list(range(7))[rank::2]
        assert report["squares"] == {str(u): u * u for u in range(7)}
        assert report["main_only_error"] == "rank 0 says no"
        assert report["require_shared_error"].startswith("rank(s) [1] do not see")
        assert report["batch_error"].startswith("batch_size 1 is smaller than the 2")
        # Data parallel over an uneven split (30 + 31 rows) against the same fit in one process.
        for case in ("model", "stack"):
            assert report[case]["loss_difference"] < 1e-5, case
            assert report[case]["weight_difference"] < 1e-5, case
            together, alone = (report[case][key] for key in ("metrics", "metrics_alone"))
            for key in ("test_loss", "test_accuracy"):
                assert together[key] == pytest.approx(alone[key], abs=1e-5), (case, key)
        assert report["resumed_equals_uninterrupted"]
    assert sorted(reports[0]["computed"] + reports[1]["computed"]) == list(range(7))  # each unit once
    assert reports[0]["batch_norm_state"] == reports[1]["batch_norm_state"]  # weights and statistics agree


# ----------------------------------------------------------------------------- inside torchrun


def _worker(out: Path):
    import fastmask.train as train_module
    from fastmask import data, models
    from fastmask.checkpoint import CheckpointFile
    from fastmask.stack import Stack
    from fastmask.train import TrainConfig, fit

    distributed.init("cpu")
    rank = distributed.rank()
    report = {"world": distributed.world_size(), "active": distributed.active(), "shard": distributed.shard(range(7))}
    computed = []

    def square(unit):
        computed.append(unit)
        return unit * unit

    report["squares"] = {str(k): v for k, v in distributed.map_units(range(7), square, out / "units").items()}
    report["computed"] = computed

    def refuse():
        raise ValueError("rank 0 says no")

    if rank == 0:
        (out / "seen0").touch()  # rank 1 looks for seen1: as if it could not see rank 0's folder
    for key, call in (("main_only_error", lambda: distributed.main_only(refuse)),
                      ("require_shared_error", lambda: distributed.require_shared(out / f"seen{rank}"))):
        try:
            call()
        except ValueError as error:
            report[key] = str(error)

    splits = data.load("digits")
    cfg = TrainConfig(steps=12, batch_size=61, lr=0.05, augment=True)
    try:
        fit(models.create("mlp", 10, (1, 8, 8), hidden=(8,)), splits.train, TrainConfig(steps=1, batch_size=1))
    except ValueError as error:
        report["batch_error"] = str(error)

    def build(**options):
        torch.manual_seed(0)
        return models.create("convnet", 10, (1, 8, 8), width=8, **options)

    def compare(make, seed):
        together, alone = make(), make()
        result = fit(together, splits.train, cfg, seed=seed, eval_data=splits.test, progress=False)
        with distributed.independent():
            reference = fit(alone, splits.train, cfg, seed=seed, eval_data=splits.test, progress=False)
        weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
        return {"loss_difference": max(abs(a - b) for a, b in zip(result.losses, reference.losses)),
                "weight_difference": float((weights(together) - weights(alone)).norm() / weights(alone).norm()),
                "metrics": result.metrics, "metrics_alone": reference.metrics}

    report["model"] = compare(build, 1)
    report["stack"] = compare(lambda: Stack([build(), build()]), [1, 2])

    model = build(norm="batch")
    fit(model, splits.train, cfg, seed=1, progress=False)
    report["batch_norm_state"] = {k: float(v.double().sum()) for k, v in model.state_dict().items()}

    class Killed(Exception):
        pass

    uninterrupted, interrupted = build(norm="batch"), build(norm="batch")
    first = fit(uninterrupted, splits.train, cfg, seed=1, checkpoint=CheckpointFile(out / "a.pt", every=4), progress=False)
    original = train_module.Loader.batch

    def dies_at_step_9(self, step):
        if step == 9:
            raise Killed
        return original(self, step)

    train_module.Loader.batch = dies_at_step_9
    try:
        fit(interrupted, splits.train, cfg, seed=1, checkpoint=CheckpointFile(out / "b.pt", every=4), progress=False)
    except Killed:
        pass
    train_module.Loader.batch = original
    resumed = build(norm="batch")
    second = fit(resumed, splits.train, cfg, seed=1, checkpoint=CheckpointFile(out / "b.pt", every=4), progress=False)
    report["resumed_equals_uninterrupted"] = first.losses == second.losses and all(
        torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()))

    (out / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
