"""The reference training loop in a process of its own, that never imports fastmask.

Importing fastmask changes how glibc's malloc keeps the CPU memory torch frees
(``fastmask.backend.keep_freed_cpu_memory``), process-wide: a reference loop timed beside fastmask
in one process runs with that setting too. The loop a researcher writes runs in a process without
it; ``OwnProcessTraining`` is that loop, run on demand in a child process that imports only torch
and ``bench.reference``, so a benchmark can time it (a call returns when the child's run is done)
interleaved with fastmask's.

Example::

    loop = OwnProcessTraining("convnet3", {}, masks, reference.state_dict(), images, labels, cfg)
    loop()          # one whole training run in the child, as ``train(...)`` runs it in this process
    loop.close()
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import Tensor

REPOSITORY = Path(__file__).resolve().parents[2]


class OwnProcessTraining:
    """``bench.reference.train.train`` of one pruned model on the CPU, in a child process.

    The child builds ``models.create(arch, 10, images' shape, **options)``, applies ``masks`` with
    ``prune.apply_masks``, loads ``state`` (a reference model's state_dict) and sets the parent's
    torch thread count; each call then runs one training of ``cfg`` (any dataclass or namespace
    with ``TrainConfig``'s fields) with seed 0, continuing from the weights the last call left, as
    repeated calls of ``train`` on one model do.
    """

    def __init__(self, arch: str, options: dict, masks: dict[str, Tensor], state: dict[str, Tensor],
                 images: Tensor, labels: Tensor, cfg):
        fields = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
        self.folder = tempfile.TemporaryDirectory()
        setup = Path(self.folder.name) / "setup.pt"
        torch.save({"arch": arch, "options": options, "masks": masks, "state": state, "images": images,
                    "labels": labels, "cfg": fields, "threads": torch.get_num_threads()}, setup)
        self.child = subprocess.Popen([sys.executable, "-m", "bench.reference.own_process", str(setup)],
                                      cwd=REPOSITORY, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self.child.stdout.readline().strip()
        if line != word:
            self.close()
            raise RuntimeError(f"the reference training's child process answered {line!r}, not {word!r}")

    def __call__(self) -> None:
        self.child.stdin.write("run\n")
        self.child.stdin.flush()
        self._expect("done")

    def close(self) -> None:
        try:
            if self.child.poll() is None:
                self.child.stdin.close()  # the child's loop ends at the end of its input
                try:
                    self.child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.child.kill()
                    self.child.wait()
        finally:
            self.child.stdout.close()
            self.folder.cleanup()


def _serve(setup_path: str) -> None:
    from bench.reference import models, prune
    from bench.reference.train import train

    setup = torch.load(setup_path, weights_only=True)
    torch.set_num_threads(setup["threads"])
    images, labels = setup["images"], setup["labels"]
    model = models.create(setup["arch"], 10, tuple(images.shape[1:]), **setup["options"])
    prune.apply_masks(model, setup["masks"])
    model.load_state_dict(setup["state"])
    cfg = types.SimpleNamespace(**setup["cfg"])
    assert not any(name.startswith("fastmask") for name in sys.modules), "the child imported fastmask"
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        train(model, images, labels, cfg, 0, torch.device("cpu"))
        print("done", flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1])
