"""The head registry: the single source of head names, their classes, their file formats and which exact
properties each keeps. A new head is one :func:`register` call; commands ask :func:`require` before using a
property, so a head without it is refused by name."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carrot.errors import CarrotError
from carrot.io import read_json

if TYPE_CHECKING:
    from carrot.config import RunConfig

PROPERTIES = {  # what a head may keep exact, in the words a refusal uses
    "training_terms": "exact training-image terms (representer, equivalent kernel, removal)",
    "loo": "exact leave-one-out",
    "woodbury": "exact removal of a set of training images",
    "region_split": "additive split of the logit over the tokens (the token map, segments, region deletion)",
    "region_pairs": "(test region, training region) pairs",
    "certificate": "counterfactual certificate",
    "reweight": "RRO reweighting (exact gradient of a validation loss in the training weights)",
    "linear_coef": "linear coefficients on the embedding (TracIn, the distributed fit, moments)",
    "weight_update": "exact refit under changed training weights (Woodbury; debug's down-weighting)",
    "attribution_audits": "attribution evaluations against exact removal (faithfulness, lds, agreement)",
}


@dataclass(frozen=True)
class HeadKind:
    """One registered head: its class (imported on first use), the ``format`` its files carry, and what it keeps."""

    name: str
    target: str  # "module:Class"
    file_format: str
    keeps: frozenset[str]
    summary: str

    @property
    def cls(self) -> type:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


HEADS: dict[str, HeadKind] = {}


def register(kind: HeadKind) -> HeadKind:
    unknown = set(kind.keeps) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"head {kind.name!r}: unknown properties {sorted(unknown)}")
    HEADS[kind.name] = kind
    return kind


register(HeadKind("ridge", "carrot.ridge.head:RidgeHead", "carrot.RidgeHead", frozenset(PROPERTIES),
                  "linear ridge on the embedding: every exact identity, the region split included"))
register(HeadKind("kernel", "carrot.ridge.kernel:KernelRidgeHead", "carrot.KernelRidgeHead",
                  frozenset({"training_terms", "loo", "woodbury", "certificate", "reweight", "weight_update",
                             "attribution_audits"}),
                  "kernel ridge (dual): exact training-image terms, LOO and removal; no additive region split"))


def kind_of(head: Any) -> HeadKind:
    for kind in HEADS.values():
        if type(head).__name__ == kind.target.split(":")[1]:
            return kind
    raise CarrotError(f"head: expected one of the registered heads ({', '.join(HEADS)}), got {type(head).__name__}")


def require(head: Any, prop: str, what: str) -> None:
    """Refuse ``what`` by name when ``head`` does not keep ``prop`` (one of :data:`PROPERTIES`)."""
    kind = kind_of(head)
    if prop not in kind.keeps:
        fits = [k.name for k in HEADS.values() if prop in k.keeps]
        raise CarrotError(f"{what}: the {kind.name} head has no {PROPERTIES[prop]}; fit the run with "
                          f"head.kind: {' or '.join(fits)} for it")


def head_from_config(config: "RunConfig", kind: str | None = None) -> Any:
    """The unfitted head a run configuration describes (``head.*`` keys and the run's device); ``kind``
    overrides ``head.kind`` (one of the candidates of 'auto')."""
    h = config.head
    if (kind or h.kind) == "kernel":
        return HEADS["kernel"].cls(kernel=h.kernel, gamma=h.gamma, lam=h.lam, approx=h.approx, n_landmarks=h.landmarks,
                                   random_state=config.seed, device=config.device)
    return HEADS["ridge"].cls(lam=h.lam, fit_intercept=h.fit_intercept, solver=h.solver, device=config.device)


def load_head(path: str | Path) -> Any:
    """Read a head file of any registered kind (dispatched on the ``format`` of its metadata)."""
    meta = read_json(str(path) + ".json", "head metadata")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    for kind in HEADS.values():
        if kind.file_format == fmt:
            return kind.cls.load(path)
    raise CarrotError(f"'{path}.json': expected a head file of format "
                      f"{', '.join(k.file_format for k in HEADS.values())}, got {fmt!r}")


def loo_accuracy(head: Any, G: Any, y: Any) -> float:
    """Exact leave-one-out accuracy of a fitted head on its training rows (G, y): from its own LOO search when it
    made one (the chosen setting's), else from its exact LOO logits."""
    import numpy as np

    if getattr(head, "lam_path_", None):
        return float(max(head.lam_path_["loo_accuracy"]))
    if getattr(head, "loo_path_", None):
        return float(max(max(p["loo_accuracy"]) for p in head.loo_path_))
    if kind_of(head).name == "kernel":
        loo = head.loo_decision()
    else:
        from carrot.ridge.removal import RidgeSystem

        loo = RidgeSystem.from_head(head, G, y).loo_logits()
    return float((np.asarray(head.classes_)[loo.argmax(1).numpy()] == np.asarray(y)).mean())


def fit_head(config: "RunConfig", G: Any, y: Any, sample_weight: Any = None) -> Any:
    """Fit the head ``head.kind`` names. 'auto' fits the ridge and the kernel head and keeps the one with the higher
    exact LOO accuracy on the training set (ties: ridge, which keeps every identity); both keep the exact
    training-image terms. The candidates' LOO accuracies are kept as ``head_choice_``."""
    if config.head.kind != "auto":
        return head_from_config(config).fit(G, y, sample_weight)
    from carrot.ridge.kernel import choose_approx, dual_memory_error

    candidates = {kind: head_from_config(config, kind) for kind in ("ridge", "kernel")}
    if not config.head.fit_intercept:
        skip = "head.fit_intercept is false, and the kernel head always fits an unpenalised intercept"
    else:
        kernel = candidates["kernel"]
        skip = dual_memory_error(kernel, len(G), choose_approx(kernel, len(G)))
    heads = {kind: h.fit(G, y, sample_weight) for kind, h in candidates.items() if not (skip and kind == "kernel")}
    scores: dict[str, Any] = {kind: loo_accuracy(h, G, y) for kind, h in heads.items()}
    if skip:  # no intercept asked for, or not even the Nystroem factor fits in memory: the ridge head, and why
        heads["ridge"].head_choice_ = {**scores, "kernel": None, "kernel_skipped": skip}
        return heads["ridge"]
    best = heads["kernel" if scores["kernel"] > scores["ridge"] else "ridge"]
    best.head_choice_ = scores
    return best
