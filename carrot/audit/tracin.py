"""TracIn analysis report (seed tracin-report): influence and self-influence over checkpoints, keyed
by sample ids, with quantiles, per-class summaries, label-review flags and the comparison with
carrot's exact leave-one-out scores on the same features."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from carrot.audit.registry import Audit, json_lines, register
from carrot.ridge.baselines import TracInHead
from carrot.ridge.head import fitted_head
from carrot.validation import index_labels, one_hot

QUANTILES = (0.25, 0.5, 0.75, 0.9)

register(Audit("tracin", "tracin/summary.json", json_lines(), extra=("tracin",), help="carrot-run tracin"))


def sample_ids(paths: Sequence[str]) -> list[str]:
    """File stems, made unique with the row index where two files share a stem."""
    stems = [Path(p).stem for p in paths]
    dup = {s for s, c in Counter(stems).items() if c > 1}
    return [f"{s}#{i}" if s in dup else s for i, s in enumerate(stems)]


def _quantiles(v: np.ndarray) -> dict[str, float]:
    return {f"q{int(q * 100)}": float(np.quantile(v, q)) for q in QUANTILES} | {"mean": float(v.mean())}


def tracin_report(G: np.ndarray, y: np.ndarray, paths: Sequence[str], classes: Sequence[str], G_test: np.ndarray,
                  y_test: np.ndarray, test_paths: Sequence[str], head: Any, n_test: int = 20,
                  flag_fraction: float = 0.02, tracin: dict | None = None) -> dict[str, Any]:
    """Self-influence per training image (total and per checkpoint), influence on ``n_test`` test images,
    summaries, flags and agreement with exact LOO; a JSON-ready dict of three parts. ``head``: the run's
    head fitted on (G, y), whose exact LOO is compared (a bare lambda fits the default head first)."""
    from scipy.stats import spearmanr

    th = TracInHead.fit(G, y, **(tracin or {}))
    ids, test_ids = sample_ids(paths), sample_ids(test_paths)
    Gt = torch.as_tensor(G, dtype=torch.float64)
    X = torch.cat([torch.ones(len(y), 1, dtype=torch.float64), Gt - th.feature_mean], 1)
    sq = (X * X).sum(1)
    per_ckpt = torch.stack([lr * sq * (th._errors(X, y, theta) ** 2).sum(1) for theta, lr in th.checkpoints], 1)
    self_inf = per_ckpt.sum(1).numpy()
    rows = np.arange(min(n_test, len(y_test)))
    infl = th.influence(G, y, G_test[rows], y_test[rows]).numpy()  # (m, n)
    head = fitted_head(head, G, y)
    system = head.system(G, y)
    loo = system.loo_logits()
    loo_loss = ((loo - one_hot(index_labels(head.classes_, y), len(head.classes_))) ** 2).sum(1).numpy()
    k = max(1, int(round(flag_fraction * len(y))))
    flag_tr = np.argsort(-self_inf, kind="stable")[:k]
    flag_loo = np.argsort(-loo_loss, kind="stable")[:k]
    self_json = {ids[i]: {"tracin_self_influence": float(self_inf[i]), "per_checkpoint": per_ckpt[i].tolist(),
                          "label": classes[y[i]], "path": str(paths[i]), "carrot_loo_loss": float(loo_loss[i])}
                 for i in range(len(y))}
    infl_json = {ids[i]: {f"tracin_influence_{test_ids[x]}": float(infl[j, i]) for j, x in enumerate(rows)}
                 for i in range(len(y))}
    summary = {
        "n_train": int(len(y)), "n_checkpoints": len(th.checkpoints), "test_images": [test_ids[x] for x in rows],
        "self_influence_quantiles": _quantiles(self_inf), "influence_quantiles": _quantiles(infl.ravel()),
        "per_class": {c: {"n": int((y == ci).sum()), "self_influence_mean": float(self_inf[y == ci].mean()),
                          "self_influence_median": float(np.median(self_inf[y == ci])),
                          "influence_mean": float(infl[:, y == ci].mean())}
                      for ci, c in enumerate(classes) if (y == ci).any()},
        "flagged_for_review": [{"id": ids[i], "label": classes[y[i]], "path": str(paths[i]),
                                "tracin_self_influence": float(self_inf[i]), "carrot_loo_loss": float(loo_loss[i])}
                               for i in flag_tr],
        "comparison_with_carrot": {
            "spearman_self_influence_vs_exact_loo_loss": float(spearmanr(self_inf, loo_loss).statistic),
            "flag_overlap_with_exact_loo": float(len(set(flag_tr) & set(flag_loo)) / k),
            "exact_loo_flagged": [ids[i] for i in flag_loo],
        },
    }
    return {"summary": summary, "self_influence": self_json, "influence": infl_json}
