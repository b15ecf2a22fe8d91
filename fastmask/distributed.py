"""Several processes (GPUs, nodes) on one pipeline, launched with ``torchrun``: the process
group, rank-0 writing, and units of work spread over the ranks.

Two kinds of parallelism, and nothing else (no scheduler of our own):

- **Data parallel**: every process takes its slice of each global batch and the gradients are
  averaged (``DistributedDataParallel``): ``fastmask.train.fit`` does it by itself whenever a
  process group of more than one process is active.
- **Unit parallel**: independent units of work (the retraining of each IMP round's mask, the LMC
  pair of each network, seeds) are dealt out with ``shard`` or ``map_units``; each rank computes
  its share alone (inside ``independent()``), writes each unit's result atomically as it finishes,
  and everyone gets all results afterwards. A rerun computes only the units without a file, so the
  units of a lost rank are redone on resume.

Without torchrun's environment (or with one process) every helper is the single-process no-op:
``rank() == 0``, ``world_size() == 1``, collectives return their input, ``shard`` returns every unit.

Files: only rank 0 writes the files of shared work (``is_main()``); inside ``independent()`` a
rank writes the files of its own units (``is_writer()`` says which applies now). Every process
must see the same run folder: on several nodes it has to live on a shared filesystem.

Example (``torchrun --standalone --nproc_per_node=4 my_sweep.py``)::

    from fastmask import distributed
    distributed.init()                                    # nccl for CUDA tensors, gloo for the rest
    device = distributed.local_device("cuda")             # cuda:LOCAL_RANK

    def train_seed(seed):                                 # runs on one rank, no communication
        model = build().to(device)
        return fit(model, splits.train, cfg, seed=seed, eval_data=splits.test).metrics["test_accuracy"]

    accuracy = distributed.map_units(range(8), train_seed, "runs/seeds")   # {seed: accuracy}, on every rank
    fit(model, splits.train, cfg)                         # outside map_units: data parallel over the 4
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
import torch.distributed as dist

from fastmask import io

__all__ = ["init", "shutdown", "active", "rank", "world_size", "local_rank", "is_main", "is_writer", "local_device",
           "independent", "barrier", "broadcast_object", "broadcast_tensors", "all_gather_object", "average_tensors",
           "require_shared", "main_only", "shard", "map_units", "map_unit_groups", "unit_file", "save_unit"]

# A rank that finishes its units waits in the next collective for the slowest rank's units (one
# retraining or LMC pair may take hours on a large model): the collectives must wait that long.
# A process that crashes is noticed by torchrun, which stops the others of its node; ranks on
# other nodes may wait in a collective until this timeout.
DEFAULT_TIMEOUT = datetime.timedelta(hours=24)

_independent_depth = 0  # > 0 inside ``independent()``


def _torchrun_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | torch.device | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); returns True when this call created it.

    Args:
        device: where training runs. CUDA (the default when available): this process takes GPU
            ``LOCAL_RANK`` and the group runs NCCL for CUDA tensors and gloo for everything else
            (objects, barriers); CPU: gloo alone.
        timeout: how long a collective may wait for the slowest rank.

    Nothing happens without torchrun, with one process, or when a group already exists. The
    group is left at exit (``shutdown``).
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if _torchrun_world() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing} are not: launch with torchrun (see the README)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank()} but this node has {torch.cuda.device_count()} CUDA devices: "
                             "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"device must be a CUDA or CPU device, got {device}")
    dist.init_process_group(backend, timeout=timeout)
    atexit.register(shutdown)
    return True


SHUTDOWN_WAIT = datetime.timedelta(seconds=60)


def shutdown() -> None:
    """Leave the process group, if there is one (``init`` arranges it at exit).

    The ranks meet first: a rank that tears its connections down while a peer still uses them can
    abort the peer's process (seen with gloo: "terminate called without an active exception").
    They wait for each other ``SHUTDOWN_WAIT`` at most, so a rank leaving on an error, whose peers
    will never come, exits rather than hanging for the collectives' timeout.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            try:
                dist.barrier(async_op=True).wait(timeout=SHUTDOWN_WAIT)
            except RuntimeError:  # a peer is gone or late: leave anyway
                pass
        dist.destroy_process_group()


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def active() -> bool:
    """True when collectives span several processes now: a group of more than one process,
    outside ``independent()``. ``fit`` trains data parallel exactly when this is true."""
    return _independent_depth == 0 and _grouped()


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if _grouped() else 0


def world_size() -> int:
    """The number of processes in the group (1 without one)."""
    return dist.get_world_size() if _grouped() else 1


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the process that writes the files of shared work (and the only one that prints)."""
    return rank() == 0


def is_writer() -> bool:
    """Whether this process writes the files of the work it is doing now: rank 0 for shared work,
    every rank for its own units inside ``independent()``, the only process without a group."""
    return not active() or is_main()


def local_device(device: str | torch.device) -> torch.device:
    """The device this process uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    device = torch.device(device)
    if device.type != "cuda" or not _grouped():
        return device
    if device.index is not None and device.index != local_rank():
        raise ValueError(f"device {device} names one GPU, but torchrun starts one process per GPU: "
                         "use device=cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank())


@contextlib.contextmanager
def independent():
    """A block where this rank works on its own units: ``active()`` is False inside, so ``fit``
    trains locally, collectives are no-ops and ``is_writer()`` is True. Nothing inside may wait
    for the other ranks."""
    global _independent_depth
    _independent_depth += 1
    try:
        yield
    finally:
        _independent_depth -= 1


# ----------------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled: plain Python values, not CUDA tensors)."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_tensors(tensors: dict[str, torch.Tensor] | Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's ``tensors`` (on this rank's device) with rank ``src``'s, in place."""
    if not active():
        return
    for tensor in tensors.values() if isinstance(tensors, dict) else tensors:
        dense = tensor.contiguous()  # e.g. channels_last weights: the collectives want contiguous memory
        dist.broadcast(dense, src=src)
        if dense is not tensor:
            tensor.copy_(dense)


def average_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each floating tensor by its mean over the ranks, in place (other dtypes are left alone)."""
    if not active():
        return
    world = world_size()
    for tensor in tensors:
        if tensor.is_floating_point():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(world)


def require_shared(path: str | os.PathLike) -> None:
    """Raise on every rank unless every rank sees ``path`` (a file rank 0 has written): the run
    folder must be on a filesystem all nodes share."""
    seen = all_gather_object(Path(path).exists())
    if not all(seen):
        blind = [r for r, ok in enumerate(seen) if not ok]
        raise ValueError(f"rank(s) {blind} do not see {path}, which rank 0 wrote: on several nodes the run folder "
                         "(--out) must be on a filesystem every node shares")


def main_only(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` on rank 0 alone; every rank returns its result, or raises its exception (so a
    bad input seen by rank 0 stops every rank with the same error instead of leaving them waiting)."""
    if not active():
        return fn()
    outcome = failure = None
    if is_main():
        try:
            outcome = ("value", fn())
        except Exception as error:  # handed to every rank and raised there too
            outcome = failure = ("error", error)
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise failure[1] if failure else value
    return value


# ----------------------------------------------------------------------------- units of work


def shard(units: Sequence) -> list:
    """This rank's share of ``units``: every ``world_size()``-th one from ``rank()`` (round robin,
    so equal-cost units balance whatever their order). All of them without a group."""
    units = list(units)
    if not active():
        return units
    return units[rank()::world_size()]


def unit_file(folder: str | os.PathLike, unit: Hashable) -> Path:
    """Where ``map_units`` keeps the result of ``unit``: ``folder/<unit>.json``."""
    name = str(unit)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"unit {unit!r} cannot name a file: use plain names or numbers")
    return Path(folder) / f"{name}.json"


def save_unit(folder: str | os.PathLike, unit: Hashable, result: Any) -> Path:
    """Write ``result`` (JSON-serialisable) as the finished ``unit`` in ``folder``, atomically,
    with the rank that computed it."""
    return io.write_json(unit_file(folder, unit), {"unit": unit, "rank": rank(), "result": result})


def _finished(folder: Path, units: Sequence) -> dict:
    found = {}
    for unit in units:
        file = unit_file(folder, unit)
        if file.exists():
            found[unit] = json.loads(file.read_text())["result"]
    return found


def map_unit_groups(units: Iterable[Hashable], compute: Callable[[list], Sequence],
                    folder: str | os.PathLike | None = None, *, group: int = 1, known: dict | None = None) -> dict:
    """Results of independent ``units``, computed ``group`` at a time and spread over the ranks.

    ``compute(list of up to group units)`` returns their results in order (JSON-serialisable
    values); it runs inside ``independent()`` on the rank that owns those units (``shard``), so it
    trains and writes alone. With ``folder`` each result is written atomically to
    ``unit_file(folder, unit)`` as soon as its group finishes, and units already there (as rank 0
    sees the folder) are not recomputed. ``known`` holds results already in hand. Every rank
    returns ``{unit: result}`` for all units, in the order of ``units``.
    """
    units = list(units)
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if len(set(units)) != len(units):
        raise ValueError("units must be distinct")
    results = dict(known or {})
    if folder is not None:
        folder = Path(folder)
        for unit in units:
            unit_file(folder, unit)  # a bad name fails before any work
        # Rank 0's view decides what is left, so that every rank deals the same list.
        results = {**broadcast_object(_finished(folder, units) if is_writer() else None), **results}
    mine = shard([unit for unit in units if unit not in results])
    computed = {}
    with independent():
        for start in range(0, len(mine), group):
            chunk = mine[start:start + group]
            values = list(compute(chunk))
            if len(values) != len(chunk):
                raise ValueError(f"compute returned {len(values)} results for the {len(chunk)} units {chunk}")
            for unit, value in zip(chunk, values):
                computed[unit] = value
                if folder is not None:
                    save_unit(folder, unit, value)
    for part in all_gather_object(computed):
        results.update(part)
    return {unit: results[unit] for unit in units}


def map_units(units: Iterable[Hashable], compute: Callable[[Any], Any], folder: str | os.PathLike | None = None,
              *, known: dict | None = None) -> dict:
    """``map_unit_groups`` one unit at a time: ``compute(unit)`` returns the unit's result."""
    return map_unit_groups(units, lambda chunk: [compute(unit) for unit in chunk], folder, group=1, known=known)
