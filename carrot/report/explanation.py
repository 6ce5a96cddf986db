"""The explanation of one image, typed, and the words that say what each of its numbers is exact for.

:class:`Explanation` is what ``Carrot.explain`` returns and what the page and the JSON are both rendered from
(:func:`carrot.report.pages.write_explanation`); :meth:`Explanation.to_json` is the ``explanation.json`` schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VIEW_MEANING = {
    "removal": "exact change of this logit if the image were removed from training (refit-exact, no sum identity)",
    "equivalent_kernel": "s_i(x) (y_ic - ybar_c): the weight the fit gives this image's label in this prediction beyond "
                         "the prior (the hat-matrix row of x without the intercept's equal share a_i / S); the terms "
                         "sum to logit - prior",
    "representer": "beta * kernel similarity (representer form); the terms sum to logit - prior, large ones cancel",
}

REMOVAL_MEANING = {  # how a pixel map takes a cell out (names: carrot.attribution.pixels.REMOVALS): (how, the far end)
    "blur": ("its pixels blurred (Gaussian, sigma one cell's side)", "f(blurred x)"),
    "mean": ("its pixels filled with the image's mean colour", "f(x filled with its mean colour)"),
    "inpaint": ("its pixels filled in from the kept pixels around it (normalised Gaussian convolution)",
                "f(x filled with its mean colour)"),
    "drop": ("its tokens dropped, so the model never sees them (ViTs)", "the prior (every token dropped: no evidence)"),
}


def pixel_map_meaning(method: str, removal: str = "blur") -> str:
    """What a pixel map explain can draw (``method``: carrot.attribution.pixels.PIXEL_MAPS, or "occlusion") is exact
    for, its cells removed by ``removal``: one sentence naming the removal and what the values sum to."""
    how, end = REMOVAL_MEANING[removal]
    if method == "shapley":
        return (f"this cell's Shapley value in the game 'remove a set of cells' (a cell removed: {how}), sampled over "
                "random orders in antithetic pairs (pixel_map_permutations; pixel_map_sem is each cell's standard "
                "error): the cell's average logit drop when removed after a random set of the others. Exact for this "
                f"removal: the values sum to f(x) - {end} to floating point (pixel_map_completeness_error), for any "
                "number of orders")
    if method == "split":
        return (f"this cell's share of f(x) - {end}: the whole model's gradient integrated along the path from that "
                "image to the image, times the pixel change, summed over the cell (path-integrated gradients; the "
                "shares sum to the difference up to the quadrature error pixel_map_completeness_error)")
    if method == "occlusion":
        return (f"f(x) - f(x without this cell), the cell removed alone ({how}), the whole model re-run (an exact "
                "counterfactual per cell; the drops do not add up)")
    raise ValueError(f"method: expected shapley, split or occlusion, got {method!r}")


REGION_MEANING = {
    "region_contributions": "w_j W_c (h_j - mu/N): the exact split of the logit over the backbone's tokens (they sum "
                            "to logit - prior); a ViT token sees the whole image, so it says which tokens matter, "
                            "not which pixels",
    "prior": "the logit without evidence (the head's intercept part): logit = prior + the training images' terms = "
             "prior + the token map's sum",
    "identity_error": "|prior + sum of the terms - logit| for each additive view: the floating-point error of exact identities",
    "pairs": "(test token, training token) pairs of a training image: with pair_intercept they split its removal effect "
             "exactly (the head refit, in tokens)",
    "certificate": "the fewest training images found whose removal changes this prediction (exact Woodbury downdates, "
                   "the set checked by one refit)",
    "node_removal": "the logit drop when a token's node is removed from the graph (graph side: the other tokens stay as "
                    "computed from the full image, so it is exact for the graph, not for the pixels)",
    "segments": "the token map summed over each segment of the mask (exact for the tokens)",
    "region_removal": "f(x) - f(x with this token's node removed from the graph): the kernel head's token map, an exact "
                      "counterfactual per token (graph side: the other tokens stay as computed from the full image; the "
                      "drops do not add up, as the kernel head is not linear in the tokens)",
}
GLOBAL_MEANING = ("W_c^glob . (c - mu^glob): the exact term of the backbone's global tokens (class, registers), which "
                  "are not regions; prior + region_sum + global_term = the logit")
LINEAR_ONLY = ("region_contributions", "pairs", "segments")  # meanings of what only a head with a region split has


def meanings(refit_note: str, additive: bool, pixel_map: str | None, global_term: bool, removal: str = "blur",
             occlusion: str | None = None) -> dict[str, str]:
    """What each number of an explanation is exact for: ``refit_note`` says what the head's refits hold
    (``head.refit_note``), ``additive`` whether the token map is the exact additive split (else each token's exact
    removal), ``pixel_map`` the page's pixel map (or None) and ``removal`` how it removes a cell, ``global_term``
    whether the global tokens have a term, and ``occlusion`` the occlusion map's removal (None: no occlusion map)."""
    score = ("f(x) - f_-i(x): how much this logit drops if the image is removed from training (exact, equal to a refit"
             + refit_note + "); the images are ranked by it")
    regions = {k: v for k, v in REGION_MEANING.items() if (k != "region_removal" if additive else k not in LINEAR_ONLY)}
    pixels = {**({"pixel_map": pixel_map_meaning(pixel_map, removal)} if pixel_map else {}),
              **({"pixel_occlusion": pixel_map_meaning("occlusion", occlusion)} if occlusion else {})}
    return {"score": score, **VIEW_MEANING, **regions, **pixels, **({"global_term": GLOBAL_MEANING} if global_term else {})}


@dataclass
class PairSplit:
    """A training image's support split over (test token, training token) pairs (the linear head): ``pairs`` sums
    with ``intercept`` (and ``global_part``, the pairs with either image's global tokens) to the support."""

    intercept: float
    global_part: float | None
    sum_error: float  # |pairs + intercept + global part - support|
    test_regions: list  # (gh, gw) the pairs summed per test token
    train_regions: list  # (gh', gw') summed per training token
    strongest: list[dict[str, Any]]  # the largest |pair| terms: test_region, train_region, value

    def to_json(self) -> dict[str, Any]:
        return {"pair_intercept": self.intercept, **({"pair_global": self.global_part} if self.global_part is not None else {}),
                "pair_sum_error": self.sum_error, "test_regions": self.test_regions, "train_regions": self.train_regions,
                "pairs": self.strongest}


@dataclass
class TrainingImage:
    """One training image listed for or against a prediction, with its three exact numbers."""

    index: int
    path: str
    label: str
    score: float  # f(x) - f_-i(x): its support, the ranking
    removal_effect: float  # f_-i(x) - f(x)
    equivalent_kernel: float
    representer: float
    weight: float | None = None  # its training weight, in a weighted run
    pairs: PairSplit | None = None
    picture: Any = None  # PIL image in the model's display geometry (drawn, not serialised)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "label": self.label, "score": self.score,
                "removal_effect": self.removal_effect, "equivalent_kernel": self.equivalent_kernel,
                "representer": self.representer, **({"weight": self.weight} if self.weight is not None else {}),
                **(self.pairs.to_json() if self.pairs is not None else {"pairs": []})}


@dataclass
class TokenMap:
    """The token-side map of the predicted class on the backbone's grid: the exact additive split (``additive``; with
    its ``total``) or, for a head without one, each token's exact removal from the graph."""

    values: list  # (gh, gw)
    additive: bool
    total: float | None = None

    def to_json(self) -> dict[str, Any]:
        if self.additive:
            return {"region_sum": self.total, "region_contributions": self.values}
        return {"region_removal": self.values}


@dataclass
class PixelMap:
    """A map of the predicted class over the input's cells: its values (gh, gw), seconds, and for the page's pixel map
    (``method`` set) what it sums to and its error."""

    values: list
    seconds: float
    method: str | None = None
    removal: str | None = None  # how a cell is removed (carrot.attribution.pixels.REMOVALS)
    removed_logit: float | None = None  # the logit with every cell removed: the map sums to logit - this
    completeness_error: float | None = None
    permutations: int | None = None  # shapley
    block: int | None = None  # shapley: its players are blocks of block x block cells
    sem: list | None = None  # shapley: each cell's standard error (None where not estimable)

    def to_json(self, key: str) -> dict[str, Any]:
        out = {key: self.values, key + "_seconds": self.seconds, f"{key}_removal": self.removal}
        if self.method is not None:
            out.update({f"{key}_method": self.method, f"{key}_removed_logit": self.removed_logit,
                        f"{key}_completeness_error": self.completeness_error})
            if self.permutations is not None:
                out.update({f"{key}_permutations": self.permutations, f"{key}_block": self.block, f"{key}_sem": self.sem})
        return out


@dataclass
class Explanation:
    """One explained image: its prediction, the training images for and against it, its token and pixel maps, the
    counterfactual certificate, and the error of every exact identity. Rendered by the page and the JSON alike."""

    image: str
    predicted: str
    predicted_index: int
    logits: dict[str, float]
    prior: float
    head: str
    meaning: dict[str, str]
    data_sum: float
    equivalent_kernel_sum: float
    identity_error: dict[str, float]
    supporting: list[TrainingImage]
    inhibiting: list[TrainingImage]
    grid: list[int]
    train_grid: list[int]
    tokens: TokenMap
    global_term: float | None = None
    certificate: dict[str, Any] | None = None
    pixel_map: PixelMap | None = None
    occlusion: PixelMap | None = None
    graph: dict[str, Any] = field(default_factory=dict)  # node_removal, deletion, insertion (graph side)
    segments: dict[str, float] | None = None
    segment_removal: dict[str, float] | None = None
    picture: Any = None  # PIL image in the model's display geometry
    heatmap: str | None = None  # written files, once the page is written
    page: str | None = None
    ranking: str = "removal"
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part of the explanation, and total

    def to_json(self) -> dict[str, Any]:
        """The ``explanation.json`` schema (JSON-ready; pictures left out)."""
        out: dict[str, Any] = {
            "image": self.image, "predicted": self.predicted, "predicted_index": self.predicted_index,
            "logits": self.logits, "prior": self.prior, "ranking": self.ranking, "meaning": self.meaning,
            "head": self.head, "data_sum": self.data_sum, "equivalent_kernel_sum": self.equivalent_kernel_sum,
            "identity_error": self.identity_error, "supporting": [r.to_json() for r in self.supporting],
            "inhibiting": [r.to_json() for r in self.inhibiting], "grid": list(self.grid),
            "train_grid": list(self.train_grid), **self.tokens.to_json(),
        }
        if self.global_term is not None:
            out["global_term"] = self.global_term
        if self.certificate is not None:
            out["certificate"] = self.certificate
        if self.pixel_map is not None:
            out.update(self.pixel_map.to_json("pixel_map"))
        if self.occlusion is not None:
            out.update(self.occlusion.to_json("pixel_occlusion"))
        out.update(self.graph)
        if self.seconds:
            out["seconds"] = self.seconds
        for key in ("segments", "segment_removal", "heatmap", "page"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out
