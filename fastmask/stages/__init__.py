"""The pipeline's stages, in the order they run: the registry from which ``fastmask.pipeline``
runs them, ``fastmask.config`` builds its sections and ``fastmask.report`` writes its sections.

To add a stage: write ``fastmask/stages/<name>.py`` (its ``Config``, ``run(ctx) -> dict``,
``report(result, ctx) -> list[str]`` and ``STAGE``; see ``fastmask.stages.base``) and list its
``STAGE`` below, after the stages whose results or files it reads.
"""
from fastmask.stages import dense, distill, hessian, imp, landscape, lmc, study
from fastmask.stages.base import Context, ReportContext, Stage

STAGES: tuple[Stage, ...] = (
    distill.STAGE,
    dense.STAGE,
    imp.STAGE,
    lmc.STAGE,
    landscape.STAGE,
    hessian.STAGE,
    study.STAGE,
)

__all__ = ["STAGES", "Stage", "Context", "ReportContext"]
