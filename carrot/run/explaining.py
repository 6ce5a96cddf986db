"""``Carrot.explain`` as a short pipeline: each image's training side, token side, certificate, pixel side and graph
side are small steps over the head's training system, whichever head it is (what a head keeps is asked of the head
registry), and together fill one :class:`~carrot.report.explanation.Explanation`."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from carrot.attribution.pixels import PIXEL_MAPS
from carrot.attribution.representer import centred_parts, region_contributions, top_k
from carrot.config import DEFAULT_BLOCK, DEFAULT_PERMUTATIONS, DEFAULT_REMOVAL, REMOVALS
from carrot.errors import CarrotError
from carrot.features.backbone import patch_centres
from carrot.report.explanation import Explanation, PairSplit, PixelMap, TokenMap, TrainingImage, meanings
from carrot.ridge.heads import keeps, kind_of
from carrot.ridge.system import TrainingSystem, TrainingTerms

if TYPE_CHECKING:
    from carrot.run.pipeline import Carrot


@dataclass(frozen=True)
class ExplainOptions:
    """What an explanation computes beyond the prediction (checked when built, one-line errors naming the setting)."""

    k: int = 5  # supporting and inhibiting training images listed (1 <= k <= n)
    pairs: int = 3  # strongest (test region, training region) pairs listed per training image
    node_removal: bool = False  # each region's removal from the graph, and deletion / insertion curves
    masks: dict[str, np.ndarray] | None = None  # {path: integer segment mask in the model's input geometry}
    certificate_limit: int = 50  # the most training images the certificate removes (0: no certificate)
    pixel_map: str | None = "shapley"  # one of PIXEL_MAPS, or None
    permutations: int = DEFAULT_PERMUTATIONS  # the even number of random orders the Shapley map samples
    occlusion: bool = False  # also the exact cell occlusion map (N + 1 runs of the whole model)
    removal: str = DEFAULT_REMOVAL  # how the pixel maps remove a cell: auto (Carrot.pixel_removal) or one of REMOVALS
    block: int | str = DEFAULT_BLOCK  # the Shapley map's players: blocks of block x block cells (1: every cell; auto)

    def check(self, n: int) -> "ExplainOptions":
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= n:
            raise CarrotError(f"top_k: expected 1 <= k <= {n} (the training set size), got {self.k!r}")
        if isinstance(self.certificate_limit, bool) or not isinstance(self.certificate_limit, int) or self.certificate_limit < 0:
            raise CarrotError(f"certificate_limit: expected an integer >= 0, got {self.certificate_limit!r}")
        if self.pixel_map is not None and (not isinstance(self.pixel_map, str) or self.pixel_map not in PIXEL_MAPS):
            raise CarrotError(f"pixel_map: expected one of {', '.join(PIXEL_MAPS)} or None, got {self.pixel_map!r}")
        if self.pixel_map == "shapley" and (isinstance(self.permutations, bool) or not isinstance(self.permutations, int)
                                            or self.permutations < 2 or self.permutations % 2):
            raise CarrotError(f"permutations: expected an even integer >= 2 (antithetic pairs), got {self.permutations!r}")
        if self.removal != "auto" and self.removal not in REMOVALS:  # what it means for a backbone: Carrot.pixel_removal
            raise CarrotError(f"removal: expected auto or one of {', '.join(REMOVALS)}, got {self.removal!r}")
        if self.block != "auto" and (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1):
            raise CarrotError(f"block: expected auto or an integer >= 1 (cells per block side), got {self.block!r}")
        return self


@dataclass
class Batch:
    """Images as the model sees them: embeddings G (m, D), tokens H (m, N, D), readout weights w (m, N), the grid,
    display pictures, global tokens (m, G, D') or None, what the readout sums F (tokens, or phi of them), logits
    (m, C), and the training views of each predicted class."""

    paths: Sequence[str]
    G: np.ndarray
    H: torch.Tensor
    w: torch.Tensor
    grid: tuple[int, int]
    pictures: list
    globals: torch.Tensor | None
    F: torch.Tensor
    logits: np.ndarray
    terms: TrainingTerms


def iter_explanations(model: "Carrot", paths: Sequence[str], options: ExplainOptions) -> Iterator[Explanation]:
    """The explanations of image files by a fitted run, one at a time as each is ready (the backbone runs once on
    all of them; see :meth:`carrot.run.pipeline.Carrot.explain`)."""
    options = options.check(len(model.train_records_))
    for method in [m for m in (options.pixel_map, "occlusion" if options.occlusion else None) if m]:
        model.pixel_removal(options.removal, method)  # the removal checked for this backbone before any image runs
    G, H, w, grid, pictures, glob = model.embed_images(paths)
    logits = model.head_.decision_function(G)
    system = model.training_system()
    terms = system.training_terms(G, logits.argmax(1))
    batch = Batch(paths, G, H, w, grid, pictures, glob, model.embedder.features(H), logits, terms)
    for i in range(len(paths)):
        yield explain_one(model, system, batch, i, options)


def explain_one(model: "Carrot", system: TrainingSystem, batch: Batch, i: int, options: ExplainOptions) -> Explanation:
    """The explanation of image ``i`` of a batch."""
    head, path = model.head_, str(batch.paths[i])
    c = int(batch.logits[i].argmax())
    logit, prior = float(batch.logits[i, c]), float(head.prior_[c])
    clock = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:  # the seconds of the part just done
        clock.append(time.perf_counter())
        seconds[name] = clock[-1] - clock[-2]

    tokens, global_term, drops = token_side(model, batch, i, c)
    lap("token_map")
    supporting, inhibiting, tgrid = training_side(model, system, batch, i, c, options)
    lap("training_images")
    ek_sum, rep_sum = float(batch.terms.equivalent_kernel[i].sum()), float(batch.terms.representer[i].sum())
    additive = keeps(head, "region_split")
    errors = {"data": abs(prior + rep_sum - logit), "equivalent_kernel": abs(prior + ek_sum - logit)}
    if additive:
        errors["regions"] = abs(prior + float(tokens.sum()) + (global_term or 0.0) - logit)
    exp = Explanation(
        image=path, predicted=model.classes_[c], predicted_index=c,
        logits={name: float(v) for name, v in zip(model.classes_, batch.logits[i])}, prior=prior,
        head=kind_of(head).name, meaning=meanings(head.refit_note, additive, options.pixel_map, global_term is not None,
                                                      model.pixel_removal(options.removal, options.pixel_map or "shapley"),
                                                      model.pixel_removal(options.removal, "occlusion") if options.occlusion
                                                      else None),
        data_sum=rep_sum, equivalent_kernel_sum=ek_sum, identity_error=errors, supporting=supporting,
        inhibiting=inhibiting, grid=list(batch.grid), train_grid=list(tgrid),
        tokens=TokenMap(tokens.reshape(batch.grid).tolist(), additive, float(tokens.sum()) if additive else None),
        global_term=global_term, picture=batch.pictures[i], seconds=seconds)
    if options.certificate_limit:
        exp.certificate = certificate_side(model, system, batch.G[i], options.certificate_limit)
        lap("certificate")
    pixel_side(model, exp, path, c, batch.grid, options)
    lap("pixel_maps")
    graph_side(model, exp, batch, i, c, tokens, drops, options)
    lap("graph")
    seconds["total"] = clock[-1] - clock[0]
    return exp


def token_side(model: "Carrot", batch: Batch, i: int, c: int) -> tuple[torch.Tensor, float | None, dict | None]:
    """(the token map (N,), the global tokens' term or None, the node-removal drops or None): the exact additive split
    where the head has one, else each token's exact removal from the graph (a counterfactual; the drops do not add
    up), whose drops the graph side reuses."""
    from carrot.attribution.regions import node_removal

    glob = None if batch.globals is None else batch.globals[i]
    if keeps(model.head_, "region_split"):
        split = region_contributions(model.head_, batch.F[i], batch.w[i], glob)[:, c]
        if glob is not None:  # the global tokens' own exact term, the last row
            return split[:-1], float(split[-1]), None
        return split, None, None
    P = patch_centres(batch.grid, torch.float64)
    drops = node_removal(model.head_, batch.H[i], P, c, model.embedder, globals=glob)
    return torch.as_tensor([drops[j] for j in range(len(drops))], dtype=torch.float64), None, drops


def training_side(model: "Carrot", system: TrainingSystem, batch: Batch, i: int, c: int,
                  options: ExplainOptions) -> tuple[list[TrainingImage], list[TrainingImage], tuple[int, int]]:
    """The k training images that support the prediction most and the k that inhibit it most, ranked by their exact
    removal effect, each with its three exact numbers and (a head with region pairs) its pair split; and their grid."""
    support = -batch.terms.removal[i]  # f(x) - f_-i(x): > 0, the image raises this logit (0 for weight 0)
    tk = top_k(support, options.k)
    idx = np.concatenate([tk.support_idx, tk.inhibit_idx])
    Ht, wt, tgrid, pictures, train_globs = model.train_regions(idx.tolist())
    pairs = keeps(model.head_, "region_pairs")
    if pairs:
        glob = None if batch.globals is None else batch.globals[i]
        U = centred_parts(batch.F[i], batch.w[i], system.mu, glob)
        Ft = model.embedder.features(Ht)
    weights = model.sample_weight_
    rows = []
    for r, j in enumerate(idx.tolist()):
        rows.append(TrainingImage(
            index=int(j), path=model.train_records_[j].path, label=model.classes_[model.train_records_[j].label],
            score=float(support[j]), removal_effect=float(batch.terms.removal[i, j]),
            equivalent_kernel=float(batch.terms.equivalent_kernel[i, j]), representer=float(batch.terms.representer[i, j]),
            weight=None if weights is None else float(weights[j]), picture=pictures[r],
            pairs=pair_split(system, U, centred_parts(Ft[r], wt[r], system.mu, None if train_globs is None else train_globs[r]), j, c,
                             float(support[j]), batch.grid, tgrid, batch.globals is not None, options.pairs)
            if pairs else None))
    return rows[: options.k], rows[options.k :], tgrid


def pair_split(system: Any, U: torch.Tensor, V: torch.Tensor, j: int, c: int, support: float, grid: tuple[int, int],
               tgrid: tuple[int, int], with_globals: bool, n_pairs: int) -> PairSplit:
    """Training image j's support split over (test token, training token) pairs (rows U of the test image, V of
    image j; with global tokens, one more row and column each, last)."""
    pm, base = system.removal_pairs(U, V, j, c)
    gpart = None
    if with_globals:  # the global row and column: pairs with either image's global tokens
        gpart, pm = float(pm[-1].sum() + pm[:-1, -1].sum()), pm[:-1, :-1]
    flat = torch.topk(pm.flatten().abs(), min(n_pairs, pm.numel())).indices
    return PairSplit(base, gpart, abs(float(pm.sum()) + base + (gpart or 0.0) - support), pm.sum(1).reshape(grid).tolist(),
                     pm.sum(0).reshape(tgrid).tolist(),
                     [{"test_region": int(f // pm.shape[1]), "train_region": int(f % pm.shape[1]),
                       "value": float(pm.flatten()[f])} for f in flat.tolist()])


def certificate_side(model: "Carrot", system: TrainingSystem, g: np.ndarray, limit: int) -> dict[str, Any]:
    """The counterfactual certificate of one prediction, with the training images named."""
    cert = system.certificate(g, limit)
    return {"found": cert.found, "limit": cert.limit, "seconds": cert.seconds,
            "images": [{"index": j, "path": model.train_records_[j].path,
                        "label": model.classes_[model.train_records_[j].label]} for j in cert.indices],
            "new_class": None if cert.new_class is None else model.classes_[int(model.head_.classes_[cert.new_class])],
            "margin": cert.margin, "refit_max_abs_diff": cert.refit_max_abs_diff}


def pixel_side(model: "Carrot", exp: Explanation, path: str, c: int, grid: tuple[int, int], options: ExplainOptions) -> None:
    """The page's pixel map and the occlusion map, each timed (whole-model re-runs)."""
    if not (options.pixel_map or options.occlusion):
        return
    x = model.inputs([path])[0]
    if options.pixel_map:
        t0 = time.perf_counter()
        values, info = model.pixel_map(x, c, grid, options.pixel_map, options.permutations, options.removal, options.block)
        shapley = options.pixel_map == "shapley"
        exp.pixel_map = PixelMap(values.tolist(), time.perf_counter() - t0, options.pixel_map, info["removal"],
                                 info["removed"], info["completeness_error"],
                                 permutations=info["permutations"] if shapley else None,
                                 block=info["block"] if shapley else None,
                                 sem=np.where(np.isfinite(info["sem"]), info["sem"], None).tolist() if shapley else None)
    if options.occlusion:
        t0 = time.perf_counter()
        values, info = model.pixel_map(x, c, grid, "occlusion", removal=options.removal)
        exp.occlusion = PixelMap(values.tolist(), time.perf_counter() - t0, removal=info["removal"])


def graph_side(model: "Carrot", exp: Explanation, batch: Batch, i: int, c: int, tokens: torch.Tensor,
               drops: dict | None, options: ExplainOptions) -> None:
    """Node removal and deletion / insertion curves on the graph, and the user's segments."""
    from carrot.attribution.regions import deletion_insertion, mask_to_grid, node_removal, segment_sum

    head, emb, H = model.head_, model.embedder, batch.H[i]
    glob = None if batch.globals is None else batch.globals[i]
    P = patch_centres(batch.grid, torch.float64)
    if options.node_removal:
        drops = drops if drops is not None else node_removal(head, H, P, c, emb, globals=glob)
        dele, ins = deletion_insertion(head, H, P, c, np.argsort(-tokens.numpy(), kind="stable"), emb, globals=glob)
        exp.graph = {"node_removal": [drops[j] for j in range(len(drops))],
                     "deletion": {"fractions": dele.fractions.tolist(), "logits": dele.logits.tolist(), "auc": dele.auc},
                     "insertion": {"fractions": ins.fractions.tolist(), "logits": ins.logits.tolist(), "auc": ins.auc}}
    if options.masks and exp.image in options.masks:
        seg = mask_to_grid(options.masks[exp.image], batch.grid)
        if exp.tokens.additive:
            exp.segments = {str(s): v for s, v in segment_sum(tokens.numpy(), seg).items()}
        if options.node_removal:
            exp.segment_removal = {str(s): v for s, v in node_removal(head, H, P, c, emb, seg, glob).items()}
