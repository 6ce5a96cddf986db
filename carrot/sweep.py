"""Diffusion-time sweeps on cached tokens: one graph and one diffusion per image serve every t."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .cache import TokenStore
from .config import GraphConfig, RunConfig
from .diffusion import _check_t
from .head import RidgeHead
from .pipeline import Carrot


def embeddings_over_t(store: TokenStore, ts: Sequence[float], graph: GraphConfig, device: str = "cpu") -> np.ndarray:
    """Embeddings for every t: (T, n, D) float64, one graph per image and one diffusion for all t
    (``diffusion.method='auto'``: one eigendecomposition on small graphs, else one Chebyshev recurrence)."""
    return Carrot(RunConfig(graph=graph, device=device)).embed_store(store, ts=_check_t(ts))


def t_sweep(train: TokenStore, test: TokenStore, ts: Sequence[float], graph: GraphConfig,
            lam: float | str = "auto") -> list[dict]:
    """Test accuracy (and the LOO-chosen lambda with its LOO accuracy) for each diffusion time t."""
    t0 = time.perf_counter()
    Gtr, Gte = embeddings_over_t(train, ts, graph), embeddings_over_t(test, ts, graph)
    t_embed = time.perf_counter() - t0
    rows = []
    for i, t in enumerate(ts):
        t1 = time.perf_counter()
        head = RidgeHead(lam=lam).fit(Gtr[i], train.labels)
        row = {"t": float(t), "lam": head.lam_, "test_accuracy": float((head.predict(Gte[i]) == test.labels).mean()),
               "seconds_fit": time.perf_counter() - t1, "seconds_embed_all_t": t_embed}
        if head.lam_path_:
            row["loo_accuracy"] = max(head.lam_path_["loo_accuracy"])
        rows.append(row)
    return rows
