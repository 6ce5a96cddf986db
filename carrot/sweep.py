"""Diffusion-time sweeps on cached tokens: one graph and one diffusion per image serve every t."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from sklearn.base import clone

from .cache import TokenStore
from .config import GraphConfig, RunConfig
from .diffusion import _check_t
from .head import RidgeHead, as_head
from .pipeline import Carrot


def embeddings_over_t(store: TokenStore, ts: Sequence[float], graph: GraphConfig, device: str = "cpu") -> np.ndarray:
    """Embeddings for every t: (T, n, D) float64, one graph per image and one diffusion for all t
    (``diffusion.method='auto'``: one eigendecomposition on small graphs, else one Chebyshev recurrence)."""
    return Carrot(RunConfig(graph=graph, device=device)).embed_store(store, ts=_check_t(ts))


def t_sweep(train: TokenStore, test: TokenStore, ts: Sequence[float], graph: GraphConfig,
            head: RidgeHead | float | str = "auto", sample_weight: np.ndarray | None = None) -> list[dict]:
    """Test accuracy (and the LOO-chosen lambda with its LOO accuracy) for each diffusion time t.

    ``head``: the run's head (unfitted copies with every setting are fitted per t: lam 'auto' is chosen
    again for each t's embeddings), or a bare lambda; ``sample_weight`` (n,): the run's weights."""
    t0 = time.perf_counter()
    Gtr, Gte = embeddings_over_t(train, ts, graph), embeddings_over_t(test, ts, graph)
    t_embed = time.perf_counter() - t0
    rows = []
    for i, t in enumerate(ts):
        t1 = time.perf_counter()
        fitted = clone(as_head(head)).fit(Gtr[i], train.labels, sample_weight)
        row = {"t": float(t), "lam": fitted.lam_, "test_accuracy": float((fitted.predict(Gte[i]) == test.labels).mean()),
               "seconds_fit": time.perf_counter() - t1, "seconds_embed_all_t": t_embed}
        if fitted.lam_path_:
            row["loo_accuracy"] = max(fitted.lam_path_["loo_accuracy"])
        rows.append(row)
    return rows
