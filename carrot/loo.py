"""Exact leave-one-out for the weighted ridge head, for a whole path of lambdas at once.

With weighted centring the intercept is unpenalised, so the hat diagonal is
h_ii = a_i (1 / sum(a) + gc_i^T (Gc^T A Gc + lam I)^-1 gc_i) and the leave-one-out prediction
is f_-i(x_i) = (f(x_i) - h_ii y_i) / (1 - h_ii) (Sherman-Morrison, as in sklearn's _RidgeGCV).
One spectral decomposition of Gc^T A Gc serves every lambda.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import CarrotError
from .validation import ArrayLike, as_float64_matrix, as_weights, encode_labels, one_hot

DEFAULT_LAMBDAS = tuple(float(v) for v in np.logspace(-3, 4, 15))


@dataclass
class LooPath:
    """Accuracy and mean squared error of the LOO predictions per lambda; LOO logits (L, n, C) and hat
    diagonals (L, n) from :func:`ridge_loo_path` (None from the streamed :func:`ridge_loo_scores`)."""

    lambdas: np.ndarray
    loo_logits: np.ndarray | None
    hat_diag: np.ndarray | None
    accuracy: np.ndarray
    mse: np.ndarray

    @property
    def best_lambda(self) -> float:
        """Highest LOO accuracy; ties broken by lower LOO squared error, then by larger lambda."""
        order = np.lexsort((-self.lambdas, self.mse, -self.accuracy))
        return float(self.lambdas[order[0]])


def _check_lambdas(lambdas: Sequence[float]) -> np.ndarray:
    lams = np.asarray(lambdas, dtype=np.float64)
    if lams.ndim != 1 or len(lams) == 0 or not np.all(np.isfinite(lams)) or np.any(lams <= 0):
        raise CarrotError(f"lambdas: expected a non-empty list of finite numbers > 0, got {lambdas!r}")
    return lams


def ridge_loo_scores(
    M: torch.Tensor,
    B: torch.Tensor,
    centred_rows: Iterable[tuple[slice, torch.Tensor]],
    y_idx: np.ndarray,
    a: torch.Tensor,
    ybar: torch.Tensor,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    fit_intercept: bool = True,
) -> LooPath:
    """LOO accuracy and squared error per lambda, streamed: M = Gc^T A Gc (D, D) and B = Gc^T A Yc (D, C)
    as accumulated for the primal solve, then one pass over (rows, Gc[rows]) chunks; only D x D and
    chunk x C arrays are held (no n x C x lambdas logits). Same numbers as :func:`ridge_loo_path`."""
    lams = _check_lambdas(lambdas)
    dev = M.device
    s2, V = torch.linalg.eigh(0.5 * (M + M.T))
    s2 = s2.clamp_min(0)
    VtB = V.T @ B  # Z^T A Yc, (D, C)
    a_dev, ybar = a.to(dev), ybar.to(dev)
    base = 1.0 / float(a.sum()) if fit_intercept else 0.0
    inv = 1.0 / (s2.unsqueeze(0) + torch.as_tensor(lams, dtype=torch.float64, device=dev).unsqueeze(1))  # (L, D)
    correct = torch.zeros(len(lams), dtype=torch.float64, device=dev)
    sq = torch.zeros(len(lams), dtype=torch.float64, device=dev)
    n = 0
    for sl, Gc in centred_rows:
        Z = Gc @ V  # V is a full basis of R^D: no part of gc_i lies outside it
        y_t = torch.as_tensor(y_idx[sl], dtype=torch.long, device=dev)
        Y = torch.nn.functional.one_hot(y_t, B.shape[1]).to(torch.float64)
        Z2 = Z * Z
        for li, lam in enumerate(lams):
            f = ybar + Z @ (inv[li].unsqueeze(1) * VtB)
            h = a_dev[sl] * (base + Z2 @ inv[li])
            f_loo = (f - h.unsqueeze(1) * Y) / (1 - h).unsqueeze(1)
            correct[li] += (f_loo.argmax(1) == y_t).sum()
            sq[li] += ((f_loo - Y) ** 2).sum()
        n += len(y_t)
    return LooPath(lams, None, None, (correct / n).cpu().numpy(), (sq / n).cpu().numpy())


def ridge_loo_path(
    G: ArrayLike,
    y: ArrayLike,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    sample_weight: ArrayLike | None = None,
    fit_intercept: bool = True,
) -> LooPath:
    """Exact LOO predictions of :class:`~carrot.head.RidgeHead` for every lambda; G (n, D), y (n,)."""
    G = as_float64_matrix(G, "G")
    n, d = G.shape
    classes, y_idx = encode_labels(y, n)
    lams = _check_lambdas(lambdas)
    Y = one_hot(y_idx, len(classes))
    a = as_weights(sample_weight, n)
    if fit_intercept:
        mu, ybar, base = (a @ G) / a.sum(), (a @ Y) / a.sum(), 1.0 / a.sum()
    else:
        mu, ybar, base = torch.zeros(d, dtype=torch.float64), torch.zeros(Y.shape[1], dtype=torch.float64), 0.0
    Gc, Yc = G - mu, Y - ybar
    if n >= d:
        s2, V = torch.linalg.eigh((Gc * a.unsqueeze(1)).T @ Gc)
        s2 = s2.clamp_min(0)
    else:
        _, s, Vh = torch.linalg.svd(a.sqrt().unsqueeze(1) * Gc, full_matrices=False)
        s2, V = s * s, Vh.T
    Z = Gc @ V  # (n, r) coordinates in the eigenbasis
    # a row with a_i > 0 lies in the row space of A^1/2 Gc, spanned by V: nothing outside V enters h_ii
    # (rows with a_i = 0 have h_ii = 0); the round-off of |gc_i|^2 - |z_i|^2 / lam would be all it added
    ZtAY = Z.T @ (a.unsqueeze(1) * Yc)  # (r, C)
    out_logits, out_h, acc, mse = [], [], [], []
    for lam in lams:
        inv = 1.0 / (s2 + lam)
        f = ybar + Z @ (inv.unsqueeze(1) * ZtAY)
        h = a * (base + (Z * Z) @ inv)
        f_loo = (f - h.unsqueeze(1) * Y) / (1 - h).unsqueeze(1)
        out_logits.append(f_loo.numpy())
        out_h.append(h.numpy())
        acc.append(float((f_loo.argmax(1).numpy() == y_idx).mean()))
        mse.append(float(((f_loo - Y) ** 2).sum(1).mean()))
    return LooPath(lams, np.stack(out_logits), np.stack(out_h), np.asarray(acc), np.asarray(mse))
