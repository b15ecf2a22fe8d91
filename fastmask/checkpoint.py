"""A training state kept in a run folder: the ``Checkpoint`` that ``fastmask.train.fit`` resumes from.

``fit`` knows nothing of files or ranks: it hands its state (weights, optimizer, step, losses,
rewind checkpoints) to a ``Checkpoint`` every ``every`` steps and at the end, and asks it for the
state to resume from. ``CheckpointFile`` keeps it in one file, written atomically (``fastmask.io``)
by the process that writes (``fastmask.distributed.is_writer``); whether there is a state to
resume from is decided by what rank 0 sees, so that no rank starts over while the others resume.

Example::

    from fastmask.checkpoint import CheckpointFile
    fit(model, splits.train, cfg, checkpoint=CheckpointFile("runs/demo/checkpoints/dense_training.pt", every=200))
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastmask import distributed, io

__all__ = ["CheckpointFile"]


class CheckpointFile:
    """A training state in the file ``path`` (``torch.save``, loaded with ``weights_only=True``),
    saved every ``every`` steps of training (0: only at the end)."""

    def __init__(self, path: str | os.PathLike, every: int = 0):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be a non-negative int, got {every!r}")
        self.path, self.every = Path(path), every

    def load(self, device: torch.device) -> dict | None:
        if not distributed.broadcast_object(self.path.exists()):
            return None
        return io.load_state(self.path, device)

    def save(self, state: dict) -> None:
        if distributed.is_writer():
            io.save_state(self.path, state)
