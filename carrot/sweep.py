"""Diffusion-time sweeps on cached tokens: one eigendecomposition per image serves every t."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from .cache import TokenStore
from .config import GraphConfig
from .diffusion import SpectralDiffusion, _check_t
from .graph import affinity, normalized_laplacian
from .head import RidgeHead


def embeddings_over_t(store: TokenStore, ts: Sequence[float], graph: GraphConfig, batch: int = 64) -> np.ndarray:
    """Embeddings for every t: (T, n, D) float64, from one batched eigh per image."""
    ts = _check_t(ts)
    P = store.positions.to(torch.float64)
    out = np.empty((len(ts), len(store), store.tokens.shape[-1]))
    for s in range(0, len(store), batch):
        H = torch.from_numpy(np.asarray(store.tokens[s : s + batch], dtype=np.float64))
        L = normalized_laplacian(affinity(H, P, graph.sigma_space, graph.sigma_feat, graph.knn))
        w = SpectralDiffusion.from_laplacian(L).readout_weights(ts)  # (T, B, N)
        out[:, s : s + batch] = torch.einsum("bnd,tbn->tbd", H, w).numpy()
    return out


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
