"""The head registry: the single source of head names, their classes, their file formats and which exact
properties each keeps. A head registers itself where it is defined (:func:`register_head`, timm style; the package
``carrot.ridge`` imports every head module); commands ask :func:`require` before using a property, so a head without
it is refused by name, and never ask which head they hold."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    "support_profiles": "support-profile term (RRO's attribution consistency, differentiable in the weights)",
}


@dataclass(frozen=True)
class HeadKind:
    """One registered head: its class, the ``format`` its files carry, and what it keeps."""

    name: str
    cls: type
    keeps: frozenset[str]
    summary: str

    @property
    def file_format(self) -> str:
        return f"carrot.{self.cls.__name__}"


HEADS: dict[str, HeadKind] = {}


def register_head(name: str, keeps: frozenset[str] | set[str], summary: str) -> Callable[[type], type]:
    """Class decorator: register a head under ``name`` where it is defined (``keeps``: the :data:`PROPERTIES` it keeps).
    The package ``carrot.ridge`` imports every head module, so the registry is complete once it is imported."""
    def add(cls: type) -> type:
        unknown = set(keeps) - set(PROPERTIES)
        if unknown:
            raise ValueError(f"head {name!r}: unknown properties {sorted(unknown)}")
        HEADS[name] = HeadKind(name, cls, frozenset(keeps), summary)
        return cls

    return add


def kind_of(head: Any) -> HeadKind:
    for kind in HEADS.values():
        if type(head) is kind.cls:
            return kind
    raise CarrotError(f"head: expected one of the registered heads ({', '.join(HEADS)}), got {type(head).__name__}")


def keeps(head: Any, prop: str) -> bool:
    """Whether ``head`` keeps ``prop`` (one of :data:`PROPERTIES`)."""
    if prop not in PROPERTIES:
        raise ValueError(f"unknown property {prop!r}; expected one of {', '.join(PROPERTIES)}")
    return prop in kind_of(head).keeps


def require(head: Any, prop: str, what: str) -> None:
    """Refuse ``what`` by name when ``head`` does not keep ``prop`` (one of :data:`PROPERTIES`)."""
    kind = kind_of(head)
    if prop not in kind.keeps:
        fits = [k.name for k in HEADS.values() if prop in k.keeps]
        raise CarrotError(f"{what}: the {kind.name} head has no {PROPERTIES[prop]}; fit the run with "
                          f"head.kind: {' or '.join(fits)} for it")


def _decided_on_a_subsample(config: "RunConfig", candidates: dict[str, Any], skipped: dict[str, str | None], G: Any,
                            y: Any, sample_weight: Any) -> tuple[dict[str, str], dict[str, str]]:
    """The heads too costly to search in full: those that lose on a class-stratified subsample, with the reason; and
    the one that wins there, its search narrowed in ``candidates`` to the subsample's choice (``narrow_search``),
    with a line saying how."""
    import numpy as np

    from carrot.devices import resolve_device
    from carrot.progress import note

    y = np.asarray(y)
    n, C = len(y), len(np.unique(y))
    budget = SEARCH_FLOPS["cpu" if resolve_device(config.device).type == "cpu" else "other"]
    costly = {kind: h.search_flops(n, C) for kind, h in candidates.items() if not skipped[kind]}
    costly = {kind: f for kind, f in costly.items() if f > budget}
    if not costly or n <= SUBSAMPLE:
        return {}, {}
    rows = class_stratified_subsample(y, SUBSAMPLE, config.seed)
    note(f"head auto: a full search of the {' and '.join(costly)} head would cost about "
         f"{max(costly.values()):.1e} flops; comparing the heads first on {len(rows)} of the {n} images")
    w = None if sample_weight is None else np.asarray(sample_weight)[rows]
    fitted, scores, best = _fit_by_exact_loo({kind: head_from_config(config, kind) for kind in candidates
                                              if not skipped[kind]}, G[rows], y[rows], w)
    said = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    lost = {kind: (f"decided on a class-stratified subsample of {len(rows)} images (exact LOO accuracy there: {said}); "
                   f"its full search would cost about {f:.1e} flops") for kind, f in costly.items() if kind != best}
    narrowed = {}
    if best in costly:
        candidates[best], how = candidates[best].narrow_search(fitted[best], n / len(rows))
        narrowed[best] = f"{how}, chosen on a class-stratified subsample of {len(rows)} images (exact LOO accuracy there: {said})"
    return lost, narrowed


def class_stratified_subsample(y: Any, size: int, seed: int) -> Any:
    """About ``size`` training rows (sorted, seeded): every class with its share of the images (at least two, so
    leave-one-out keeps a neighbour of its class), or, when there are too many classes for two images each, a random
    subset of the classes with all their images (each class as dense as in the whole): exact LOO there asks the
    whole's question of fewer images."""
    import numpy as np

    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    two = np.minimum(counts, 2)
    keep = np.maximum(two, np.round(counts * size / len(y)).astype(int))
    order = rng.permutation(len(classes))
    if two.sum() > size:  # too many classes for two images each: a random subset of them, whole
        keep = counts
        order = order[: max(2, int(np.searchsorted(np.cumsum(keep[order]), size, side="right")))]
    rows = [rng.choice(np.flatnonzero(y == classes[c]), keep[c], replace=False) for c in order]
    return np.sort(np.concatenate(rows))


def head_from_config(config: "RunConfig", kind: str | None = None) -> Any:
    """The unfitted head a run configuration describes (``head.*`` keys and the run's device); ``kind``
    overrides ``head.kind`` (one of the candidates of 'auto')."""
    return HEADS[kind or config.head.kind].cls.from_config(config)


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
    made one (the chosen setting's), else from its training system's exact LOO logits."""
    import numpy as np

    if getattr(head, "lam_path_", None):
        return float(max(head.lam_path_["loo_accuracy"]))
    if getattr(head, "loo_path_", None):
        return float(max(max(p["loo_accuracy"]) for p in head.loo_path_))
    loo = head.system(G, y).loo_logits()
    return float((np.asarray(head.classes_)[loo.argmax(1).numpy()] == np.asarray(y)).mean())


def _fit_by_exact_loo(heads: dict[str, Any], G: Any, y: Any, sample_weight: Any,
                      announce: bool = False) -> tuple[dict[str, Any], dict[str, float], str]:
    """Fit each of ``heads`` on (G, y) and score it by exact LOO accuracy: (the fitted heads, their scores, the kind of
    the best; ties: the first registered, the ridge head, which keeps every identity)."""
    from carrot.progress import note

    fitted, scores = {}, {}
    for kind, h in heads.items():
        if announce:
            note(f"head auto: fitting the {kind} head on {len(G)} images")
        fitted[kind] = h.fit(G, y, sample_weight)
        scores[kind] = loo_accuracy(fitted[kind], G, y)
    return fitted, scores, max(scores, key=lambda kind: (scores[kind], -list(HEADS).index(kind)))


SEARCH_FLOPS = {"cpu": 2e12, "other": 2e14}  # 'auto' searches a head in full up to this (about a minute on a 2-core CPU)
SUBSAMPLE = 1000  # above the budget, the heads are compared first on a class-stratified subsample of this many images


def fit_head(config: "RunConfig", G: Any, y: Any, sample_weight: Any = None) -> Any:
    """Fit the head ``head.kind`` names. 'auto' fits every registered head that can take the data (each says why not:
    ``unfit_reason``) and keeps the one with the highest exact LOO accuracy on the training set (ties: the first
    registered, the ridge head, which keeps every identity). The candidates' LOO accuracies are kept as
    ``head_choice_`` (a head not fitted: None, and its ``<kind>_skipped`` reason).

    A head whose full search would cost more than :data:`SEARCH_FLOPS` (its ``search_flops``: the kernel head's
    grows as n^3 + n^2 C per gamma and lambda) is first compared with the others on a class-stratified subsample of
    :data:`SUBSAMPLE` images by the same exact LOO accuracy; it is fitted on the whole only when it wins there, and
    otherwise skipped with the subsample's numbers as the reason."""
    if config.head.kind != "auto":
        return head_from_config(config).fit(G, y, sample_weight)
    from carrot.progress import note

    candidates = {kind: head_from_config(config, kind) for kind in HEADS}
    skipped = {kind: h.unfit_reason(len(G), config) for kind, h in candidates.items()}
    lost, narrowed = _decided_on_a_subsample(config, candidates, skipped, G, y, sample_weight)
    not_fitted = {kind: why for kind, why in {**skipped, **lost}.items() if why}
    for kind, why in not_fitted.items():
        note(f"head auto: the {kind} head is not fitted: {why}")
    heads, scores, kept = _fit_by_exact_loo({k: h for k, h in candidates.items() if k not in not_fitted}, G, y,
                                            sample_weight, announce=True)
    best = heads[kept]
    note(f"head auto: kept the {kind_of(best).name} head (exact LOO accuracy: "
         + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + ")")
    for kind, why in not_fitted.items():
        scores.update({kind: None, f"{kind}_skipped": why})
    scores.update({f"{kind}_search": how for kind, how in narrowed.items()})
    best.head_choice_ = scores
    return best
