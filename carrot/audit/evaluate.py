"""Evaluations of attributions: mislabel detection, faithfulness, LDS, rank agreement with exact LOO.

Every routine takes embeddings (the backbone is never re-run) and uses the head's exact training system
(:class:`~carrot.ridge.system.TrainingSystem`, whichever head it is) as ground truth; scores follow the convention
"higher = more of the thing".
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from carrot.audit.registry import Audit, register
from carrot.errors import CarrotError
from carrot.progress import bar
from carrot.ridge.baselines import TracInHead
from carrot.ridge.head import as_head, fitted_head, frozen_clone
from carrot.ridge.heads import keeps
from carrot.ridge.system import TrainingSystem
from carrot.validation import index_labels, one_hot


def flip_labels(y: np.ndarray, fraction: float, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``fraction`` of the labels to a different random class; returns (noisy labels, flipped mask)."""
    if not 0 < fraction < 1:
        raise CarrotError(f"flip fraction: expected a number in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    y = np.asarray(y).copy()
    idx = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, n_classes, len(idx))) % n_classes
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    return y, mask


def mislabel_scores(G: np.ndarray, y: np.ndarray, head: Any, tracin: dict | None = None) -> dict[str, np.ndarray]:
    """Suspicion scores per training point (higher = more likely mislabelled); ``head`` (a registered head, or a bare
    lambda: the default head) is refitted on the labels y with every setting and the weights it was fitted with."""
    template = as_head(head)
    head = frozen_clone(template).fit(G, y, getattr(template, "sample_weight_", None))
    system = head.system(G, y)
    y_idx = index_labels(head.classes_, y)
    Y = one_hot(y_idx, len(head.classes_))
    loo = system.loo_logits()
    fit = system.train_decision()
    rows = torch.arange(len(y))
    own = loo[rows, y_idx]
    other = loo.clone()
    other[rows, y_idx] = -torch.inf
    scores = {
        "carrot_loo_ce_calibrated": system.loo_cross_entropy(loo)[0],
        "carrot_loo_loss": ((loo - Y) ** 2).sum(1),
        "carrot_loo_margin": other.max(1).values - own,
        "carrot_self_representer": system.dual_coef[rows, y_idx],
        "train_loss": ((fit - Y) ** 2).sum(1),
    }
    th = TracInHead.fit(G, y, **(tracin or {}))
    scores["tracin_self_influence"] = th.self_influence(G, y)
    logits = torch.as_tensor(th.decision_function(G))
    scores["ce_train_loss"] = -torch.log_softmax(logits, 1)[rows, y_idx]
    return {k: v.numpy() for k, v in scores.items()}


def mislabel_detection(scores: dict[str, np.ndarray], flipped: np.ndarray,
                       fractions: Sequence[float] = (0.05, 0.1, 0.2)) -> dict[str, dict]:
    """ROC-AUC and the share of flipped labels found in the top x% of each ranking."""
    from sklearn.metrics import roc_auc_score

    out = {}
    n_flip = max(1, int(flipped.sum()))
    for name, s in scores.items():
        order = np.argsort(-s, kind="stable")
        found = {f"{x:g}": float(flipped[order[: int(round(x * len(s)))]].sum() / n_flip) for x in fractions}
        out[name] = {"roc_auc": float(roc_auc_score(flipped, s)), "found_in_top": found}
    return out


EFFECT_BLOCK = 2**25  # float64 values of one (rows, n, C) block of LOO effects (256 MiB)


def removal_effects(system: TrainingSystem, G_test: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Exact LOO effect on each test image's logit of ``classes``: f_-i(x)_c - f(x)_c, (m, n); the (m, n, C) effects
    are computed a block of test images at a time, so memory stays at EFFECT_BLOCK values whatever n and C."""
    G_test, classes = np.asarray(G_test), np.asarray(classes)
    rows = max(1, EFFECT_BLOCK // max(1, system.n * system.n_classes))
    out = np.empty((len(G_test), system.n))
    for s in range(0, len(G_test), rows):
        c = torch.as_tensor(classes[s : s + rows])
        out[s : s + rows] = system.removal_effect(G_test[s : s + rows])[torch.arange(len(c)), :, c].numpy()
    return out


def faithfulness(system: TrainingSystem, G_test: np.ndarray, attributions: np.ndarray, ks: Sequence[int] = (1, 5, 10, 20),
                 n_random: int = 3, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """Remove (Woodbury) or keep (refit) K training images chosen by an attribution, per test image.

    ``attributions`` (m, n) score the training images for each test image's predicted class. Strategies:
    remove top / random / bottom K, keep top / random K. Reports the mean drop of the predicted logit
    and the rate at which the prediction changes. Only training images with weight > 0 (the ones in the
    model) are removed, kept or drawn.
    """
    m, _ = attributions.shape
    active = np.flatnonzero(system.a.numpy() > 0)
    n = len(active)
    if max(ks) >= n:
        raise CarrotError(f"k: expected every K < n = {n} (training images with weight > 0), got {max(ks)}")
    rng = np.random.default_rng(seed)
    F = system.decision(G_test)
    pred = F.argmax(1)
    out: dict[str, dict[str, dict[str, float]]] = {}
    steps = bar(total=len(ks) * m, desc="faithfulness", unit="img")
    for k in ks:
        res: dict[str, list[tuple[float, bool]]] = {s: [] for s in ("remove_top", "remove_random", "remove_bottom", "keep_top", "keep_random")}
        for x in range(m):
            steps.update(1)
            order = active[np.argsort(-attributions[x, active], kind="stable")]
            c = int(pred[x])
            sets = {"remove_top": [order[:k]], "remove_bottom": [order[-k:]],
                    "remove_random": [rng.choice(active, k, replace=False) for _ in range(n_random)]}
            for name, idx_list in sets.items():
                for idx in idx_list:
                    f = system.decision_without(G_test[x : x + 1], idx)[0]
                    res[name].append((float(F[x, c] - f[c]), int(f.argmax()) != c))
            keeps = {"keep_top": [order[:k]], "keep_random": [rng.choice(active, k, replace=False) for _ in range(n_random)]}
            for name, idx_list in keeps.items():
                for idx in idx_list:
                    f = system.decision_only(G_test[x : x + 1], idx)[0]
                    res[name].append((float(F[x, c] - f[c]), int(f.argmax()) != c))
        out[str(k)] = {s: {"logit_drop": float(np.mean([d for d, _ in v])), "flip_rate": float(np.mean([f for _, f in v]))}
                       for s, v in res.items()}
    steps.close()
    return out


def lds(system: TrainingSystem, G_test: np.ndarray, classes: np.ndarray, estimators: dict[str, np.ndarray],
        n_subsets: int = 50, fraction: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Linear datamodeling score (TRAK protocol): Spearman over random subsets S between the predicted
    sum_{i in S} tau_i(x) and the refitted logit f_S(x)_c, averaged over test images. Subsets are drawn
    from the training images with weight > 0."""
    if n_subsets < 3:
        raise CarrotError(f"n_subsets: expected at least 3, got {n_subsets}")
    rng = np.random.default_rng(seed)
    n = system.n
    active = np.flatnonzero(system.a.numpy() > 0)
    masks = np.zeros((n_subsets, n), dtype=bool)
    actual = np.zeros((n_subsets, len(classes)))
    for j in bar(range(n_subsets), desc="LDS subsets", unit="refit"):
        idx = np.sort(rng.choice(active, int(round(fraction * len(active))), replace=False))
        masks[j, idx] = True
        actual[j] = system.decision_only(G_test, idx)[torch.arange(len(classes)), torch.as_tensor(classes)].numpy()
    from scipy.stats import spearmanr  # here, not at import: scipy.stats costs every command 0.6 s

    out = {}
    for name, tau in estimators.items():
        pred = masks.astype(np.float64) @ tau.T  # (subsets, m)
        rhos = [spearmanr(pred[:, x], actual[:, x]).statistic for x in range(len(classes))]
        out[name] = float(np.nanmean(rhos))
    return out


def rank_agreement(estimators: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean Spearman and Kendall correlation, per test image, of each estimator with the reference (m, n)."""
    from scipy.stats import kendalltau, spearmanr

    out = {}
    for name, est in estimators.items():
        sp = [spearmanr(est[x], reference[x]).statistic for x in range(len(reference))]
        kt = [kendalltau(est[x], reference[x]).statistic for x in range(len(reference))]
        out[name] = {"spearman": float(np.nanmean(sp)), "kendall": float(np.nanmean(kt))}
    return out


def estimator_scores(system: TrainingSystem, G: np.ndarray, y: np.ndarray, G_test: np.ndarray,
                     tracin: TracInHead | None = None, classes: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """For each test image's predicted class: the exact LOO support (f - f_-i) and each estimator (m, n): the two
    additive views, TracIn (``tracin``, a head with linear coefficients only; ``classes``: the head's labels) and
    plain kernel similarity."""
    pred = system.decision(G_test).argmax(1).numpy()
    loo_support = -removal_effects(system, G_test, pred)
    terms = system.training_terms(G_test, pred)
    est = {"carrot_representer": terms.representer.numpy(), "carrot_equivalent_kernel": terms.equivalent_kernel.numpy()}
    if tracin is not None:
        est["tracin"] = tracin.influence(G, y, G_test, np.asarray(classes)[pred]).numpy()
    est["kernel_similarity"] = system.similarity(G_test).numpy()
    return loo_support, est


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, n_classes: int) -> list[float | None]:
    """Accuracy of the predictions (m,) on each class index 0..C-1 of the true labels y (m,); None where absent."""
    pred, y = np.asarray(pred), np.asarray(y)
    return [float((pred[y == c] == c).mean()) if (y == c).any() else None for c in range(n_classes)]


def accuracy_over_seeds(G: np.ndarray, y: np.ndarray, G_test: np.ndarray, y_test: np.ndarray, head: Any,
                        classes: Sequence[str], seeds: Sequence[int] = (0, 1, 2, 3, 4), shots: int | None = None,
                        resplit: bool = False) -> dict:
    """Top-1 and per-class test accuracy, mean and std (ddof=1) over seeds. A seed draws the ``shots``
    training images per class (few-shot) and/or, with ``resplit``, a new stratified train/test split of
    the pooled embeddings (same test share); with neither, every seed would give the same closed-form head,
    so only the first is run. Each fit is ``head`` refitted with all its settings (its chosen lambda) and,
    for a weighted head, the weights of the rows drawn (re-splitting a weighted run is refused: test rows
    have no weights)."""
    from carrot.data import stratified_indices

    if not seeds:
        raise CarrotError("seeds: expected at least one seed")
    if shots is None and not resplit:
        seeds = list(seeds)[:1]
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise CarrotError(f"shots: expected a positive integer or None, got {shots!r}")
    C = len(classes)
    template = as_head(head)
    a = getattr(template, "sample_weight_", None)
    a = None if a is None else np.asarray(a)
    if resplit and a is not None:
        raise CarrotError("resplit: this run's head is weighted and test images have no weights; "
                          "evaluate accuracy without --resplit, or on the unweighted run it was derived from")
    pooled_G, pooled_y = np.concatenate([G, G_test]), np.concatenate([y, y_test])
    rows = []
    for seed in bar(seeds, desc="accuracy over seeds", unit="fit"):
        if resplit:
            tr, te = stratified_indices(pooled_y, classes, len(y_test) / len(pooled_y), seed, "pooled train+test")
            Gtr, ytr, Gte, yte = pooled_G[tr], pooled_y[tr], pooled_G[te], pooled_y[te]
        else:
            Gtr, ytr, Gte, yte = G, y, G_test, y_test
        atr = a
        if shots is not None:
            rng = np.random.default_rng(seed)
            counts = np.bincount(ytr, minlength=C)
            if counts.min() < shots:
                c = int(counts.argmin())
                raise CarrotError(f"shots: expected at most {counts.min()} (class '{classes[c]}' has {counts.min()} "
                                  f"training images), got {shots}")
            keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(ytr == c), shots, replace=False) for c in range(C)]))
            Gtr, ytr = Gtr[keep], ytr[keep]
            atr = None if a is None else a[keep]
        head = frozen_clone(template).fit(Gtr, ytr, atr)
        pred = head.predict(Gte)
        per_class = [float("nan") if v is None else v for v in per_class_accuracy(pred, yte, C)]
        rows.append({"seed": int(seed), "accuracy": float((pred == yte).mean()), "lam": float(head.lam_),
                     "n_train": int(len(ytr)), "n_test": int(len(yte)), "per_class": per_class})
    acc = np.array([r["accuracy"] for r in rows])
    pc = np.array([r["per_class"] for r in rows])
    ddof = 1 if len(rows) > 1 else 0
    return {
        "seeds": [int(s) for s in seeds], "shots": shots, "resplit": resplit,
        "mean": float(acc.mean()), "std": float(acc.std(ddof=ddof)),
        "per_class": {c: {"mean": float(np.nanmean(pc[:, i])) if np.isfinite(pc[:, i]).any() else None,
                          "std": float(np.nanstd(pc[:, i], ddof=ddof)) if np.isfinite(pc[:, i]).sum() > ddof else None}
                      for i, c in enumerate(classes)},
        "per_seed": [{k: v for k, v in r.items() if k != "per_class"} for r in rows],
    }


def summary_lines(res: dict) -> list[str]:
    """One human-readable line per evaluation in ``res`` (the dict :func:`evaluate_embeddings` and the
    accuracy / pointing evaluations build)."""
    out = []
    if "accuracy" in res:
        a = res["accuracy"]
        if not a.get("shots") and not a.get("resplit"):
            out.append(f"accuracy (full training split; deterministic, one fit): {a['mean']:.4f}")
        else:
            how = f"{a['shots']}-shot" if a.get("shots") else "full train"
            out.append(f"accuracy ({how}{', re-split' if a.get('resplit') else ''}, {len(a['seeds'])} seeds): "
                       f"{a['mean']:.4f} +- {a['std']:.4f}")
    if "mislabel" in res:
        best = sorted(res["mislabel"]["results"].items(), key=lambda kv: -kv[1]["roc_auc"])
        out.append(f"mislabel detection ({res['mislabel']['flip_fraction']:.0%} flipped), ROC-AUC: "
                   + ", ".join(f"{k} {v['roc_auc']:.3f}" for k, v in best))
    if "faithfulness" in res:
        k = max(next(iter(res["faithfulness"].values())), key=int)
        out.append(f"faithfulness, logit drop after removing the top {k}: "
                   + ", ".join(f"{n} {v[k]['remove_top']['logit_drop']:.3f}" for n, v in res["faithfulness"].items()))
    if "lds" in res:
        out.append("LDS: " + ", ".join(f"{n} {v:.3f}" for n, v in res["lds"].items()))
    if "agreement_with_exact_loo" in res:
        out.append("Spearman with exact LOO: " + ", ".join(f"{n} {v['spearman']:.3f}" for n, v in res["agreement_with_exact_loo"].items()))
    if "deletion" in res:
        d = res["deletion"]
        out.append(f"region deletion AUC ({d['n']} images, pooled; 1 = full logit, 0 = prior): exact order {d['deletion']:.3f}, "
                   f"random {d['deletion_random']:.3f}; insertion AUC: exact {d['insertion']:.3f}, random {d['insertion_random']:.3f}")
    if "pixel_deletion" in res:
        p = res["pixel_deletion"]
        for r, scores in p.get("scores", {"blur": p["maps"]}).items():  # before the removals: blurring only
            out.append(f"pixel deletion / insertion AUC, cells removed by {r} ({p['n']} images; image = 1, all removed = 0; "
                       f"raw logit deletion AUC): " + ", ".join(
                           f"{m} {v['deletion']['mean']:.3f} / {v['insertion']['mean']:.3f}"
                           + (f" ({v['raw_deletion']['mean']:+.3f})" if "raw_deletion" in v else "")
                           for m, v in scores.items()))
    if "certificates" in res:
        c = res["certificates"]
        med = "" if c["median_size"] is None else f", median {c['median_size']:g} images"
        out.append(f"certificates ({c['n']} predictions, up to {c['limit']} removals): {c['found']} change{med}; "
                   f"{c['seconds_per_image_median'] * 1e3:.0f} ms per image")
    if "pointing" in res:
        p = res["pointing"]
        out.append(f"pointing game ({p['n']} images): hit rate {p['hit_rate']:.3f} (random region {p['random_region_hit_rate']:.3f})")
    return out


register(Audit("evaluation", "evaluation.json", summary_lines, help="carrot-run evaluate"))

EVALUATIONS = ("mislabel", "faithfulness", "lds", "agreement")


def evaluate_embeddings(
    G: np.ndarray, y: np.ndarray, G_test: np.ndarray, head: Any, what: Sequence[str] = EVALUATIONS,
    flip_fraction: float = 0.1, ks: Sequence[int] = (1, 5, 10, 20), n_test: int = 50, n_subsets: int = 50,
    seed: int = 0, tracin: dict | None = None, progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the chosen evaluations on fitted-run embeddings; returns a JSON-ready dict.

    ``head``: the run's head fitted on (G, y) (with its weights, if any): the exact quantities are the
    ones of that model, and refits (flipped labels, subsets) carry every one of its settings. A bare
    lambda fits the default head on (G, y) first.
    """
    unknown = sorted(set(what) - set(EVALUATIONS))
    if unknown:
        raise CarrotError(f"evaluations: unknown {unknown}; expected some of {list(EVALUATIONS)}")
    if not isinstance(n_test, int) or n_test < 1:
        raise CarrotError(f"n_test: expected a positive integer, got {n_test!r}")
    log = progress or (lambda _: None)
    head = fitted_head(head, G, y)
    a = getattr(head, "sample_weight_", None)
    n_in = len(y) if a is None else int((a > 0).sum())
    if "faithfulness" in what and (not ks or min(ks) < 1 or max(ks) >= n_in):
        raise CarrotError(f"k: expected every K in 1..{n_in - 1} (K < n = {n_in} training images"
                          f"{' with weight > 0' if a is not None else ''}), got {list(ks)}")
    out: dict = {"lam": float(head.lam_), "n_train": int(len(y)), "seed": seed}
    rng = np.random.default_rng(seed)
    if "mislabel" in what:
        log("mislabel detection")
        yn, mask = flip_labels(y, flip_fraction, len(np.unique(y)), seed)
        out["mislabel"] = {"flip_fraction": flip_fraction,
                           "results": mislabel_detection(mislabel_scores(G, yn, head, tracin), mask)}
    rest = [w for w in what if w != "mislabel"]
    if rest:
        system = head.system(G, y)
        rows = np.sort(rng.choice(len(G_test), min(n_test, len(G_test)), replace=False))
        Gt = G_test[rows]
        log("exact LOO and estimators")
        th = TracInHead.fit(G, y, **(tracin or {})) if keeps(head, "linear_coef") else None
        loo_support, est = estimator_scores(system, G, y, Gt, th, head.classes_)
        out["n_test_evaluated"] = int(len(rows))
        if "agreement" in what:
            out["agreement_with_exact_loo"] = rank_agreement(est, loo_support)
        if "faithfulness" in what:
            log("faithfulness")
            out["faithfulness"] = {name: faithfulness(system, Gt, s, ks, seed=seed)
                                   for name, s in {"exact_loo": loo_support, **est}.items()}
        if "lds" in what:
            log("LDS")
            pred = system.decision(Gt).argmax(1).numpy()
            out["lds"] = lds(system, Gt, pred, {"exact_loo": loo_support, **est}, n_subsets, seed=seed)
    return out
