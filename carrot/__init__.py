"""carrot: fine-grained image classification with exact training-data and region attribution.

The pipeline, by sub-package:

* ``carrot.features``    frozen timm backbone -> region tokens (backbones, offline weights, token cache, RegionSet)
* ``carrot.embed``       Gaussian space x feature graph -> heat diffusion exp(-tL) -> readout (:class:`Embedder`)
* ``carrot.ridge``       the closed-form heads (:class:`RidgeHead`, :class:`KernelRidgeHead`) and the one protocol of
                         their exact training systems (:class:`TrainingSystem`: LOO, removal, reweighting, the
                         certificate), with a primal and a dual back-end (:class:`PrimalSystem`, :class:`DualSystem`);
                         exact what-ifs of training-set edits (:class:`WhatIf`, :class:`Edits`)
* ``carrot.attribution`` exact splits of a logit over regions and pixels; FAISS retrieval
* ``carrot.audit``       evaluations, reweighting (RRO), dataset debugging, TracIn, t sweeps; the audit registry
* ``carrot.report``      the typed :class:`Explanation` and the words of each number; heatmaps, pages, the run index
* ``carrot.run``         :class:`Carrot` (the whole pipeline), the run directory (:class:`RunDir`), the commands
* ``carrot.studio``      ``carrot-run studio``: the local web app over a run
* ``carrot.cli``         ``carrot-run``

The names below are importable from ``carrot`` directly (loaded on first use).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from carrot.errors import CarrotError, NotFittedError, StaleCacheError  # noqa: E402

_PUBLIC = {
    "Carrot": "carrot.run.pipeline",
    "RunDir": "carrot.run.rundir",
    "RunConfig": "carrot.config",
    "load_config": "carrot.config",
    "Embedder": "carrot.embed.embedder",
    "RegionSet": "carrot.features.regions",
    "create_backbone": "carrot.features.backbone",
    "RidgeHead": "carrot.ridge.head",
    "KernelRidgeHead": "carrot.ridge.kernel",
    "HEADS": "carrot.ridge.heads",
    "TrainingSystem": "carrot.ridge.system",
    "PrimalSystem": "carrot.ridge.primal",
    "DualSystem": "carrot.ridge.dual",
    "Certificate": "carrot.ridge.system",
    "TrainingTerms": "carrot.ridge.system",
    "Edits": "carrot.ridge.edits",
    "WhatIf": "carrot.ridge.edits",
    "Explanation": "carrot.report.explanation",
    "CentredMoments": "carrot.ridge.core",
    "RidgeFactor": "carrot.ridge.core",
    "ridge_loo_path": "carrot.ridge.loo",
    "AUDITS": "carrot.audit.registry",
}

__all__ = ["__version__", "CarrotError", "NotFittedError", "StaleCacheError", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'carrot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
