"""Diffusion-time sweeps on cached tokens: one graph and one diffusion per image serve every t."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.base import clone

from carrot.audit.registry import Audit, json_lines, register
from carrot.features.cache import TokenStore
from carrot.progress import bar
from carrot.config import GraphConfig
from carrot.embed.embedder import Embedder
from carrot.ridge.head import as_head


register(Audit("t_sweep", "t_sweep.json", json_lines(), extra=("t_sweep.csv",), help="carrot-run bench"))


def embeddings_over_t(store: TokenStore, ts: Sequence[float], embedder: Embedder | GraphConfig) -> np.ndarray:
    """Embeddings for every t: (T, n, D) float64, one graph per image and one diffusion for all t
    (``diffusion.method='auto'``: one eigendecomposition on small graphs, else one Chebyshev recurrence),
    on the embedder's device and method (a bare GraphConfig: the default diffusion, on the CPU)."""
    if isinstance(embedder, GraphConfig):
        embedder = Embedder(embedder, device="cpu")
    return embedder.embed_store(store, ts=ts)


def t_sweep(train: TokenStore, test: TokenStore, ts: Sequence[float], embedder: Embedder | GraphConfig,
            head: Any = "auto", sample_weight: np.ndarray | None = None,
            on_fit: Callable[[float, Any], dict] | None = None) -> list[dict]:
    """Test accuracy (and the LOO-chosen lambda with its LOO accuracy) for each diffusion time t.

    ``head``: the run's head (unfitted copies with every setting are fitted per t: lam 'auto' is chosen
    again for each t's embeddings), or a bare lambda; ``sample_weight`` (n,): the run's weights;
    ``on_fit(t, head)``: more columns for t's row from t's fitted head (the pixel protocol)."""
    t0 = time.perf_counter()
    Gtr, Gte = embeddings_over_t(train, ts, embedder), embeddings_over_t(test, ts, embedder)
    t_embed = time.perf_counter() - t0
    rows = []
    for i, t in enumerate(bar(ts, desc="t sweep", unit="t")):
        t1 = time.perf_counter()
        fitted = clone(as_head(head)).fit(Gtr[i], train.labels, sample_weight)
        row = {"t": float(t), "lam": fitted.lam_, "test_accuracy": float((fitted.predict(Gte[i]) == test.labels).mean()),
               "seconds_fit": time.perf_counter() - t1, "seconds_embed_all_t": t_embed}
        if getattr(fitted, "lam_path_", None):
            row["loo_accuracy"] = max(fitted.lam_path_["loo_accuracy"])
        elif getattr(fitted, "loo_path_", None):  # the kernel head: the best (gamma, lambda)
            row["loo_accuracy"] = max(max(p["loo_accuracy"]) for p in fitted.loo_path_)
            row["gamma"] = fitted.gamma_
        if on_fit is not None:
            row.update(on_fit(float(t), fitted))
        rows.append(row)
    return rows
