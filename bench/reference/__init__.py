"""The eager reference pipeline: fastmask's pipeline written the way the papers' code and popular
repositories write it, in plain PyTorch. It is the baseline of every benchmark and a second
opinion on fastmask's metrics.

- ``models``: ConvNet-3 and CIFAR ResNet-10/18 as plain modules (fastmask's architectures and init);
- ``data``: a DataLoader over CPU tensors with a per-sample random crop / flip;
- ``train``: torch.optim with per-tensor re-masking, a Python step loop;
- ``prune``: IMP with ``torch.nn.utils.prune`` (global L1, ``custom_from_mask``);
- ``distill``: DM one network and one class at a time, with a siamese DSA;
- ``lmc``, ``landscape``: one alpha / one grid point at a time with ``load_state_dict``;
- ``hessian``: Hutchinson one Rademacher probe at a time (PyHessian);
- ``study``: the study's arms over seeds, every copy trained one after another;
- ``pipeline.run_reference(cfg, out_dir)``: all stages, results in fastmask's ``results.json`` schema.

- ``own_process``: the training loop in a child process that never imports fastmask.

Run it: ``python -m bench.reference --preset synthetic-convnet3 --out runs/reference imp.rounds=3``.

``pipeline``, ``study`` and ``__main__`` use fastmask (its configs, data loading and the study's
claims); ``models``, ``data``, ``train`` and ``prune`` do not. ``run_reference`` and ``STAGES`` are
imported when first used, so the training loop alone runs in a process without fastmask
(``own_process``).
"""
import importlib

__all__ = ["run_reference", "STAGES"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("bench.reference.pipeline"), name)
    raise AttributeError(f"module 'bench.reference' has no attribute {name!r}")
