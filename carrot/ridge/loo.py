"""Exact leave-one-out over a whole path of lambdas: one scorer for every head, and the linear head's path.

Every head is a linear smoother of its labels, so its leave-one-out prediction is
f_-i(x_i) = (f(x_i) - h_ii y_i) / (1 - h_ii) (Sherman-Morrison, as in sklearn's _RidgeGCV), and :class:`LooScorer`
scores per-lambda (f, h) the same way whichever head computed them. For the linear head the hat diagonal is
h_ii = a_i (1 / sum(a) + gc_i^T (Gc^T A Gc + lam I)^-1 gc_i), and one spectral decomposition of Gc^T A Gc
(:func:`carrot.ridge.core.spectrum`) serves every lambda (:func:`loo_path`); the kernel head's spectrum feeds the
same scorer (:meth:`carrot.ridge.dual.Spectrum.loo_path`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.ridge.core import CentredMoments, spectrum
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, encode_labels

DEFAULT_LAMBDAS = tuple(float(v) for v in np.logspace(-3, 4, 15))


@dataclass
class LooPath:
    """Accuracy and mean squared error of the LOO predictions per lambda; LOO logits (L, n, C) and hat
    diagonals (L, n) when asked for (``keep=True``), else None."""

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


def check_lambdas(lambdas: Sequence[float]) -> np.ndarray:
    lams = np.asarray(lambdas, dtype=np.float64)
    if lams.ndim != 1 or len(lams) == 0 or not np.all(np.isfinite(lams)) or np.any(lams <= 0):
        raise CarrotError(f"lambdas: expected a non-empty list of finite numbers > 0, got {lambdas!r}")
    return lams


class LooScorer:
    """The one LOO criterion of every head's search (as sklearn's ``_RidgeGCV`` scores each alpha): per lambda,
    blocks of training rows with their fitted logits f and hat diagonal h give f_-i = (f - h y) / (1 - h), whose
    accuracy and summed squared error are accumulated; a back-end feeds it (:func:`loo_path`, the kernel head's
    spectrum) and :meth:`path` reads the result."""

    def __init__(self, lambdas: Sequence[float], keep: bool = False) -> None:
        self.lambdas = check_lambdas(lambdas)
        self.keep = keep
        L = len(self.lambdas)
        self._correct, self._sq, self._n = np.zeros(L), np.zeros(L), np.zeros(L, dtype=np.int64)
        self._logits: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._hats: list[list[torch.Tensor]] = [[] for _ in range(L)]

    def add(self, li: int, f: torch.Tensor, h: torch.Tensor, Y: torch.Tensor, y: torch.Tensor) -> None:
        """Score rows with fitted logits f (k, C), hat diagonal h (k,), one-hot targets Y (k, C) and classes y (k,)
        at the ``li``-th lambda."""
        f_loo = (f - h.unsqueeze(1) * Y) / (1 - h).unsqueeze(1)
        self._correct[li] += float((f_loo.argmax(1) == y).sum())
        self._sq[li] += float(((f_loo - Y) ** 2).sum())
        self._n[li] += len(y)
        if self.keep:
            self._logits[li].append(f_loo.cpu())
            self._hats[li].append(h.cpu())

    def accuracy(self, li: int) -> float:
        """The LOO accuracy of the rows scored so far at the ``li``-th lambda."""
        return float(self._correct[li] / max(1, self._n[li]))

    def path(self) -> "LooPath":
        keep = self.keep
        return LooPath(self.lambdas,
                       torch.stack([torch.cat(b) for b in self._logits]).numpy() if keep else None,
                       torch.stack([torch.cat(b) for b in self._hats]).numpy() if keep else None,
                       self._correct / self._n, self._sq / self._n)


def loo_path(m: CentredMoments, eig: tuple[torch.Tensor, torch.Tensor], centred_rows: Iterable[tuple[slice, torch.Tensor]],
             y_idx: np.ndarray, a: torch.Tensor, lambdas: Sequence[float], keep: bool = False) -> LooPath:
    """Exact LOO accuracy and squared error per lambda from one spectral decomposition.

    Parameters
    ----------
    m : the fit's centred moments (B = Gc^T A Yc (D, C) and ybar are used).
    eig : (s2 (r,), V (D, r)) from :func:`carrot.ridge.core.spectrum`: every row with a_i > 0 lies in
        span(V), so f and h_ii need only the coordinates z_i = V^T gc_i (rows with a_i = 0 have h_ii = 0).
    centred_rows : (row slice, Gc[rows] (k, D)) chunks covering the n rows in order, on M's device.
    y_idx : (n,) class indices; a : (n,) weights.
    keep : also return the LOO logits (L, n, C) and hat diagonals (L, n) (memory L n C).

    Returns
    -------
    LooPath with accuracy (L,) and mse (L,) (mean over rows of the summed squared error).
    """
    scorer = LooScorer(lambdas, keep)
    s2, V = eig
    dev = V.device
    VtB = V.T @ m.B.to(dev)
    a_dev, ybar = a.to(dev), m.ybar.to(dev)
    base = 1.0 / float(m.S) if m.fit_intercept else 0.0
    inv = 1.0 / (s2.unsqueeze(0) + torch.as_tensor(scorer.lambdas, dtype=torch.float64, device=dev).unsqueeze(1))  # (L, r)
    for sl, Gc in centred_rows:
        Z = Gc @ V
        y_t = torch.as_tensor(y_idx[sl], dtype=torch.long, device=dev)
        Y = torch.nn.functional.one_hot(y_t, VtB.shape[1]).to(torch.float64)
        Z2 = Z * Z
        for li in range(len(scorer.lambdas)):
            scorer.add(li, ybar + Z @ (inv[li].unsqueeze(1) * VtB), a_dev[sl] * (base + Z2 @ inv[li]), Y, y_t)
    return scorer.path()


def ridge_loo_path(G: ArrayLike, y: ArrayLike, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                   sample_weight: ArrayLike | None = None, fit_intercept: bool = True) -> LooPath:
    """Exact LOO predictions of :class:`~carrot.ridge.head.RidgeHead` for every lambda, in memory.

    Parameters
    ----------
    G : (n, D) embeddings; y : (n,) labels; sample_weight : (n,) or None.

    Returns
    -------
    LooPath with loo_logits (L, n, C) and hat_diag (L, n).
    """
    G = as_float64_matrix(G, "G")
    n, d = G.shape
    classes, y_idx = encode_labels(y, n)
    check_lambdas(lambdas)
    a = as_weights(sample_weight, n)
    m = CentredMoments.accumulate(G, y_idx, a, n_classes=len(classes), fit_intercept=fit_intercept, chunk_size=n)
    Gc = G - m.mu
    eig = spectrum(m, a.sqrt().unsqueeze(1) * Gc if n < d else None)
    return loo_path(m, eig, [(slice(0, n), Gc)], y_idx, a, lambdas, keep=True)
