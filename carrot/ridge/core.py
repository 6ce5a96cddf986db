"""The ridge core: weighted centred moments and the one factorisation every consumer shares.

For sum_i a_i ||W^T (g_i - mu) - (y_i - ybar)||^2 + lam ||W||^2 the sufficient statistics are
S = sum a, the a-weighted means mu (D,) and ybar (C,), M = Gc^T A Gc (D, D) and B = Gc^T A Yc (D, C).
They are accumulated in two streamed passes (means first, then centred products), never as
G^T A G - S mu mu^T, which cancels catastrophically when |mu| >> the spread (ViT features).
One factorisation of M + lam I serves the coefficients W = (M + lam I)^-1 B, the hat diagonal,
exact leave-one-out, Woodbury removal and the reweighting gradient. In centred coordinates
x~ = [1, g - mu] the augmented normal matrix sum a x~ x~^T + diag(0, lam I) is blockdiag(S, M + lam I),
so the intercept block is a division (sklearn's _RidgeGCV decomposes once and solves per lambda the same way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.validation import ArrayLike, as_weights, float64_rows, one_hot


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``size`` rows covering ``range(n)``."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _all_reduce(*tensors: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _targets(Y: ArrayLike, n_classes: int | None, sl: slice) -> torch.Tensor:
    """Rows ``sl`` of the targets as (k, C) float64: Y is class indices (n,) or a target matrix (n, C)."""
    if Y.ndim == 1:
        return one_hot(np.asarray(Y[sl]), n_classes)
    block = Y[sl]
    return block.to(torch.float64) if torch.is_tensor(block) else torch.as_tensor(np.asarray(block, dtype=np.float64))


@dataclass
class CentredMoments:
    """Sufficient statistics of the weighted ridge problem about the weighted means.

    Attributes
    ----------
    S : tensor () total weight sum a.
    mu : tensor (D,) a-weighted feature mean (zeros without intercept).
    ybar : tensor (C,) a-weighted target mean, the prior (zeros without intercept).
    M : tensor (D, D) Gc^T A Gc, exactly symmetric; None when only the means were asked for.
    B : tensor (D, C) Gc^T A (Y - ybar); None when only the means were asked for.
    n : number of rows (over all ranks when distributed).
    fit_intercept : whether mu and ybar were estimated (else fixed at 0).
    """

    S: torch.Tensor
    mu: torch.Tensor
    ybar: torch.Tensor
    M: torch.Tensor | None
    B: torch.Tensor | None
    n: int
    fit_intercept: bool

    @classmethod
    def accumulate(cls, G: ArrayLike, Y: ArrayLike, sample_weight: ArrayLike | None = None, *, n_classes: int | None = None,
                   fit_intercept: bool = True, chunk_size: int = 65536, device: str | torch.device = "cpu",
                   second_moments: bool = True, distributed: bool = False) -> "CentredMoments":
        """Two streamed passes over G in ``chunk_size`` rows, float64 accumulation on ``device``.

        Parameters
        ----------
        G : (n, D) array, tensor or memmap (never loaded whole).
        Y : (n,) class indices in [0, n_classes), or (n, C) targets.
        sample_weight : (n,) weights >= 0, or None for ones.
        n_classes : C, required when Y holds class indices.
        fit_intercept : estimate the weighted means (else mu = 0, ybar = 0).
        second_moments : also accumulate M and B (the dual solver needs only the means).
        distributed : all_reduce the sums over torch.distributed ranks after each pass, so every rank
            holds the moments of all rows (two-pass centring across ranks: the means are global).

        Returns
        -------
        CentredMoments on ``device``.
        """
        n, d = int(G.shape[0]), int(G.shape[1])
        Y = Y if torch.is_tensor(Y) else np.asarray(Y)
        if Y.ndim == 1 and n_classes is None:
            raise CarrotError("n_classes: required when Y holds class indices")
        C = n_classes if Y.ndim == 1 else int(Y.shape[1])
        if int(Y.shape[0]) != n:
            raise CarrotError(f"Y: expected {n} rows to match G, got {Y.shape[0]}")
        a = as_weights(sample_weight, n)
        z = dict(dtype=torch.float64, device=device)
        S, count = a.sum().to(device), torch.tensor(float(n), **z)
        mu, ybar = torch.zeros(d, **z), torch.zeros(C, **z)
        if fit_intercept:
            for sl in chunks(n, chunk_size):
                ac = a[sl].to(device)
                mu += ac @ float64_rows(G, sl).to(device)
                ybar += ac @ _targets(Y, C, sl).to(device)
        if distributed:
            _all_reduce(S, count, mu, ybar)
        if float(S) <= 0:
            raise CarrotError("sample_weight: expected a positive total weight")
        if fit_intercept:
            mu, ybar = mu / S, ybar / S
        M = B = None
        if second_moments:
            M, B = torch.zeros(d, d, **z), torch.zeros(d, C, **z)
            for sl in chunks(n, chunk_size):
                Gc = float64_rows(G, sl).to(device) - mu
                aG = Gc * a[sl].to(device).unsqueeze(1)
                M += aG.T @ Gc
                B += aG.T @ (_targets(Y, C, sl).to(device) - ybar)
            if distributed:
                _all_reduce(M, B)
            M = 0.5 * (M + M.T)
        return cls(S, mu, ybar, M, B, int(count), fit_intercept)

    @classmethod
    def from_rows(cls, G: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, fit_intercept: bool = True) -> "CentredMoments":
        """In-memory moments of float64 tensors G (n, D), Y (n, C), a (n,), differentiable in ``a`` (RRO)."""
        S = a.sum()
        if fit_intercept:
            mu, ybar = (a @ G) / S, (a @ Y) / S
        else:
            mu = torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
            ybar = torch.zeros(Y.shape[1], dtype=Y.dtype, device=Y.device)
        Gc = G - mu
        aG = Gc * a.unsqueeze(1)
        M = aG.T @ Gc
        return cls(S, mu, ybar, 0.5 * (M + M.T), aG.T @ (Y - ybar), int(G.shape[0]), fit_intercept)

    def to(self, device: str | torch.device) -> "CentredMoments":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return CentredMoments(mv(self.S), mv(self.mu), mv(self.ybar), mv(self.M), mv(self.B), self.n, self.fit_intercept)


def cholesky(A: torch.Tensor, what: str = "ridge system") -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite A, or a named error."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise CarrotError(f"{what} is not positive definite (features overflow, or a class with no weight?); increase lam")
    return L


class RidgeFactor:
    """The factorisation of M + lam I that every solve goes through.

    ``kind='primal'``: the Cholesky factor of M + lam I (+ a penalty) (D, D). ``kind='dual'``: the
    Cholesky factor of U U^T + lam I (n, n) with U = A^1/2 Gc (n, D) bound, and solves through the
    push-through identity (U^T U + lam I)^-1 = (I - U^T (U U^T + lam I)^-1 U) / lam.
    """

    def __init__(self, kind: str, chol: torch.Tensor, lam: float, rows: torch.Tensor | None = None) -> None:
        if kind not in ("primal", "dual"):
            raise CarrotError(f"factor kind: expected 'primal' or 'dual', got {kind!r}")
        self.kind, self.chol, self.lam, self.rows = kind, chol, float(lam), rows

    @classmethod
    def primal(cls, M: torch.Tensor, lam: float, penalty: torch.Tensor | None = None) -> "RidgeFactor":
        """Factor M + lam I (+ ``penalty``, a symmetric (D, D) term) of a (D, D) Gram."""
        A = M + penalty if penalty is not None else M.clone()
        A.diagonal().add_(lam)
        return cls("primal", cholesky(A), lam)

    @classmethod
    def dual(cls, U: torch.Tensor, lam: float) -> "RidgeFactor":
        """Factor U U^T + lam I (n, n) for U = A^1/2 Gc (n, D), keeping U for the solves."""
        K = U @ U.T
        K = 0.5 * (K + K.T)
        K.diagonal().add_(lam)
        return cls("dual", cholesky(K), lam, U)

    def bind(self, U: torch.Tensor) -> "RidgeFactor":
        """A dual factor read from disk needs its rows U = A^1/2 Gc (n, D) back before it can solve."""
        if self.kind == "dual":
            if U.shape[0] != self.chol.shape[0]:
                raise CarrotError(f"G: expected the {self.chol.shape[0]} training rows the head was fitted on, got {U.shape[0]}")
            self.rows = U
        return self

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        """(M + lam I)^-1 V for V (D, k), by two triangular solves (and two products for the dual)."""
        if self.kind == "primal":
            return torch.cholesky_solve(V, self.chol.to(V.device))
        if self.rows is None:
            raise CarrotError("this dual ridge factor has no training rows bound; build it with RidgeHead.system")
        U, L = self.rows.to(V.device), self.chol.to(V.device)
        return (V - U.T @ torch.cholesky_solve(U @ V, L)) / self.lam

    def cpu(self) -> "RidgeFactor":
        return RidgeFactor(self.kind, self.chol.cpu(), self.lam, None if self.rows is None else self.rows.cpu())


def dual_solve_coef(U: torch.Tensor, sY: torch.Tensor, factor: RidgeFactor) -> torch.Tensor:
    """W = U^T (U U^T + lam I)^-1 A^1/2 Yc for U = A^1/2 Gc and sY = A^1/2 Yc: the dual form of (M + lam I)^-1 B."""
    return U.T @ torch.cholesky_solve(sY, factor.chol)


def spectrum(m: CentredMoments, U: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s2 (r,), V (D, r)): eigenpairs of M = Gc^T A Gc from its eigh, or, given U = A^1/2 Gc (n, D) with
    n < D, from the thin SVD of U (r = n). One decomposition serves every lambda."""
    if U is None:
        s2, V = torch.linalg.eigh(m.M)
        return s2.clamp_min(0), V
    _, s, Vh = torch.linalg.svd(U, full_matrices=False)
    return s * s, Vh.T
