"""The dense stage: the unpruned network trained on the real data (``train``: data parallel under
torchrun, resumable from ``checkpoints/dense_training.pt``); its initialisation and trained weights
are kept as ``checkpoints/init.safetensors`` and ``checkpoints/dense.safetensors``.

Result: ``{"test_accuracy", "test_loss", "steps", "seconds"}``. Later stages read the
initialisation with ``init_weights(ctx)``.
"""
from __future__ import annotations

import time

from torch import Tensor

from fastmask import distributed, io
from fastmask.checkpoint import CheckpointFile
from fastmask.stages.base import Context, ReportContext, Stage
from fastmask.train import fit

SAVE_EVERY = 200  # training steps between two saves of the training state


def init_weights(ctx: Context) -> dict[str, Tensor]:
    """The dense network's initialisation (the state every analysed network starts from)."""
    return io.load_tensors(ctx.path("checkpoints", "init.safetensors"), ctx.device)


def run(ctx: Context) -> dict:
    model = ctx.build_model()
    if distributed.is_main():
        io.save_tensors(ctx.path("checkpoints", "init.safetensors"), model.state_dict())
    start = time.perf_counter()
    result = fit(model, ctx.splits.train, ctx.cfg.train, seed=ctx.cfg.seed, eval_data=ctx.splits.test,
                 checkpoint=CheckpointFile(ctx.path("checkpoints", "dense_training.pt"), every=SAVE_EVERY),
                 progress=ctx.progress, description="dense")  # data parallel under torchrun
    if distributed.is_main():
        io.save_tensors(ctx.path("checkpoints", "dense.safetensors"), model.state_dict())
    return {"test_accuracy": result.metrics["test_accuracy"], "test_loss": result.metrics["test_loss"],
            "steps": result.steps, "seconds": time.perf_counter() - start}


def report(result: dict, ctx: ReportContext) -> list[str]:
    return [f"Test accuracy {100 * result['test_accuracy']:.2f}%.", ""]


def summary(result: dict) -> str:
    return f"test accuracy {100 * result['test_accuracy']:.1f}%"


STAGE = Stage("dense", "Dense network", run, report, summary=summary)
