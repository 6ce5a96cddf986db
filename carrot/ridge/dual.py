"""The dual back-end of :class:`~carrot.ridge.system.TrainingSystem`: the kernel head on its training rows.

With weights a (s = sqrt a, S = sum a), the weighted-centred Gram Kc (:func:`carrot.ridge.gram.weighted_centred`) and
M = diag(s) Kc diag(s), the head is

    f(x) = ybar + kc(x)^T alpha,   alpha = s * (M + lam I)^-1 (s * (Y - ybar)),

the intercept unpenalised (ybar the a-weighted class means). It is linear in the labels, f(x) = l(x)^T Y with the
equivalent kernel l(x) = a / S + s * (M + lam I)^-1 (s * kc(x)), whose rows on the training images form the hat matrix
(h_ii = a_i / S + [M (M + lam I)^-1]_ii). In primal form, x~ = [1, phi(z) - mu_a] and M~ = X~^T A X~ + lam diag(0, I),
x~_i^T M~^-1 x~_v = 1 / S + (kc(i, v) - kc_i^T diag(s) (M + lam I)^-1 diag(s) kc_v) / lam (the push-through
identity), so the implicit weight gradient needs no feature map.

(M + lam I)^-1 comes from one of two solvers over the same centred Gram: :class:`Spectrum` (M = Q diag(m) Q^T, one
eigendecomposition serving every lambda: the head's fit, exact LOO) or :class:`CholeskySolve` (one Cholesky at one
lambda: refits under new weights, RRO's steps). For a Nystroem head the Gram is held as its factor (n, r) and both
solvers work in O(n r^2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.ridge.gram import Gram, LowRankGram, centre_cross, gram_sub, weighted_centred
from carrot.ridge.loo import LooPath, LooScorer
from carrot.ridge.system import TrainingSystem
from carrot.validation import ArrayLike


@dataclass
class CentredGram:
    """A training Gram centred at the a-weighted mean of its feature map: Kc (dense (n, n) or factored), r = K a / S
    (n,), t = a^T K a / S^2, the weights a, s = sqrt a and S = sum a."""

    Kc: Gram
    r: torch.Tensor
    t: float
    a: torch.Tensor
    s: torch.Tensor
    S: float

    @classmethod
    def of(cls, K: Gram, a: torch.Tensor) -> "CentredGram":
        Kc, r, t = weighted_centred(K, a)
        return cls(Kc, r, t, a, a.sqrt(), float(a.sum()))

    @property
    def low_rank(self) -> bool:
        return isinstance(self.Kc, LowRankGram)


class Spectrum:
    """M = diag(s) Kc diag(s) = Q diag(m) Q^T for one kernel parameter: every lambda's solve, hat and LOO. For a
    factored Gram, U = diag(s) Fc (n, r) = Q diag(sqrt m) V^T (thin SVD, nothing truncated), Q (n, r) spanning the range
    of M; M is 0 on the rest."""

    def __init__(self, cg: CentredGram) -> None:
        self.cg = cg
        if cg.low_rank:
            Q, sv, _ = torch.linalg.svd(cg.s.unsqueeze(1) * cg.Kc.F, full_matrices=False)
            self.m, self.Q = sv * sv, Q
        else:
            M = cg.s.unsqueeze(1) * cg.Kc * cg.s.unsqueeze(0)
            m, self.Q = torch.linalg.eigh((M + M.T) / 2)
            self.m = m.clamp_min(0.0)

    def solve(self, V: torch.Tensor, lam: float) -> torch.Tensor:
        """(M + lam I)^-1 V (the null space of a low-rank M scaled by 1 / lam)."""
        QtV = self.Q.T @ V
        out = self.Q @ (QtV / (self.m + lam).unsqueeze(1))
        return out + (V - self.Q @ QtV) / lam if self.cg.low_rank else out

    def inverse_columns(self, R: torch.Tensor, lam: float) -> torch.Tensor:
        """Columns R (k,) of (M + lam I)^-1, (n, k), from rows R of Q (and the 1 / lam of a low-rank M's null space)."""
        QR = self.Q[R].T
        out = self.Q @ (QR / (self.m + lam).unsqueeze(1))
        if self.cg.low_rank:
            out = out - self.Q @ QR / lam
            out[R, torch.arange(len(R), device=R.device)] += 1 / lam
        return out

    def mass(self, lam: float) -> torch.Tensor:
        """diag(M (M + lam I)^-1) (n,)."""
        return torch.einsum("ik,ik,k->i", self.Q, self.Q, self.m / (self.m + lam))

    def loo_path(self, Y: torch.Tensor, y_idx: np.ndarray, lams: Sequence[float],
                 on_lambda: Callable[[int, float], Any] | None = None) -> LooPath:
        """Exact LOO accuracy and mean squared error for every lambda, by the one LOO scorer (``on_lambda(i,
        accuracy)`` after each lambda: the search's progress)."""
        cg = self.cg
        ybar = cg.a @ Y / cg.S
        QtV = self.Q.T @ (cg.s.unsqueeze(1) * (Y - ybar))
        # f = ybar + Kc diag(s) (M + lam)^-1 diag(s) Yc; Kc diag(s) is 0 on the null space of M
        KcSQ = cg.Kc @ (cg.s.unsqueeze(1) * self.Q)
        QQ = self.Q * self.Q
        y_t = torch.as_tensor(y_idx, device=Y.device)
        scorer = LooScorer(lams)
        for li, lam in enumerate(scorer.lambdas):
            scorer.add(li, ybar + KcSQ @ (QtV / (self.m + lam).unsqueeze(1)), cg.a / cg.S + QQ @ (self.m / (self.m + lam)),
                       Y, y_t)
            if on_lambda is not None:
                on_lambda(li, scorer.accuracy(li))
        return scorer.path()


class CholeskySolve:
    """(M + lam I)^-1 at one lambda by one Cholesky: of M + lam I (n x n), or for a factored Gram (U = diag(s) Fc) of
    U^T U + lam I (r x r) with (U U^T + lam I)^-1 = (I - U (U^T U + lam I)^-1 U^T) / lam."""

    def __init__(self, cg: CentredGram, lam: float) -> None:
        self.cg, self.lam = cg, float(lam)
        if cg.low_rank:
            self.U = cg.s.unsqueeze(1) * cg.Kc.F
            M = self.U.T @ self.U
        else:
            M = cg.s.unsqueeze(1) * cg.Kc * cg.s.unsqueeze(0)
        M.diagonal().add_(self.lam)
        self.chol = torch.linalg.cholesky(M)  # reads the lower triangle only
        self._inv_diag: torch.Tensor | None = None
        self._known: tuple[torch.Tensor, torch.Tensor] | None = None  # (V, (M + lam I)^-1 V) found by the LOO search

    def solve(self, V: torch.Tensor, lam: float) -> torch.Tensor:
        self._check(lam)
        if self._known is not None and self._known[0].shape == V.shape and torch.equal(self._known[0], V):
            return self._known[1]
        if self.cg.low_rank:
            return (V - self.U @ torch.cholesky_solve(self.U.T @ V, self.chol)) / self.lam
        return torch.cholesky_solve(V, self.chol)

    def inverse_columns(self, R: torch.Tensor, lam: float) -> torch.Tensor:
        E = torch.zeros(len(self.cg.a), len(R), dtype=torch.float64, device=self.cg.a.device)
        E[R, torch.arange(len(R), device=R.device)] = 1.0
        return self.solve(E, lam)

    def mass(self, lam: float) -> torch.Tensor:
        self._check(lam)
        if self.cg.low_rank:  # diag(U (U^T U + lam I)^-1 U^T)
            return (self.U * torch.cholesky_solve(self.U.T, self.chol).T).sum(1)
        if self._inv_diag is None:
            self._inv_diag = _inverse_diagonal(self.chol)
        return 1 - self.lam * self._inv_diag

    def _check(self, lam: float) -> None:
        if float(lam) != self.lam:
            raise CarrotError(f"lam: this factor was built for {self.lam}, got {lam}")


def _inverse_diagonal(chol: torch.Tensor) -> torch.Tensor:
    """diag(A^-1) (n,) from A = L L^T: the squared column norms of L^-1 (LAPACK trtri, n^3 / 3 flops, against 2 n^3 / 3
    for the whole inverse, which other devices compute)."""
    if chol.device.type != "cpu":
        return torch.cholesky_inverse(chol).diagonal()
    from scipy.linalg.lapack import dtrtri

    inv, info = dtrtri(chol.numpy(), lower=1)
    if info != 0:
        raise CarrotError(f"lam: the Cholesky factor is singular at row {info} (raise head.lam)")
    return torch.from_numpy(np.einsum("ij,ij->j", inv, inv))


CHOLESKY_UP_TO = 3  # a search over at most this many lambdas factors M + lam I once per lambda instead of M once


def loo_path(cg: CentredGram, Y: torch.Tensor, y_idx: np.ndarray, lams: Sequence[float],
             on_lambda: Callable[[int, float], Any] | None = None) -> tuple[LooPath, Spectrum | CholeskySolve]:
    """Exact LOO accuracy and squared error of the kernel head on ``cg`` for every lambda, with a solver that serves
    the best one: one eigendecomposition of M for a grid (~10 n^3 flops, every lambda then costs 2 n^2 C), or, for at
    most :data:`CHOLESKY_UP_TO` lambdas, one Cholesky of M + lam I per lambda (n^3 / 3 and the diagonal of its
    inverse), which is several times cheaper: the same numbers to rounding either way.

    Parameters
    ----------
    cg : the centred training Gram with its weights; Y : (n, C) one-hot targets; y_idx : (n,) class indices;
    lams : (L,) lambdas > 0; on_lambda : called as ``on_lambda(i, accuracy)`` after each lambda (progress).

    Returns
    -------
    (LooPath over ``lams``, Spectrum or CholeskySolve of the best lambda)
    """
    if len(lams) > CHOLESKY_UP_TO:
        spec = Spectrum(cg)
        return spec.loo_path(Y, y_idx, lams, on_lambda), spec
    ybar = cg.a @ Y / cg.S
    V = cg.s.unsqueeze(1) * (Y - ybar)
    y_t = torch.as_tensor(y_idx, device=Y.device)
    scorer, solvers, solutions = LooScorer(lams), {}, {}
    held = (cg.s > 0).nonzero().squeeze(1)
    zero = (cg.s == 0).nonzero().squeeze(1)
    for li, lam in enumerate(scorer.lambdas):
        solver = solvers[float(lam)] = CholeskySolve(cg, float(lam))
        W = solutions[float(lam)] = solver.solve(V, float(lam))
        # Kc diag(s) W = diag(s)^-1 M W = diag(s)^-1 (V - lam W) on rows of weight > 0
        f = torch.empty_like(Y)
        f[held] = ybar + (V[held] - lam * W[held]) / cg.s[held].unsqueeze(1)
        if len(zero):
            f[zero] = ybar + cg.Kc[zero] @ (cg.s.unsqueeze(1) * W)
        scorer.add(li, f, cg.a / cg.S + solver.mass(float(lam)), Y, y_t)
        if on_lambda is not None:
            on_lambda(li, scorer.accuracy(li))
    path = scorer.path()
    best = solvers[float(path.best_lambda)]
    best._known = (V, solutions[float(path.best_lambda)])  # the head's solution at that lambda
    return path, best


class DualSystem(TrainingSystem):
    """The kernel head's exact training system: preprocessed training rows Z (n, D), targets Y (n, C), a solver of
    their centred Gram (its weights a) and lambda, with the head's feature map (preprocessing, kernel, gamma, Nystroem
    landmarks) held. ``features``: phi(Z) (n, r) for a Nystroem head; ``alpha``: the solution when already known."""

    def __init__(self, head: Any, Z: torch.Tensor, Y: torch.Tensor, solver: Spectrum | CholeskySolve, lam: float,
                 features: torch.Tensor | None = None, alpha: torch.Tensor | None = None) -> None:
        cg = solver.cg
        self.head, self.solver, self.cg, self.lam = head, solver, cg, float(lam)
        self.dev = cg.a.device
        self.Z, self.features = Z, features
        self.a, self.Y = cg.a.cpu(), Y.cpu()
        self._prior = (cg.a @ Y.to(self.dev) / cg.S)
        if alpha is None:
            s = cg.s.unsqueeze(1)
            alpha = s * solver.solve(s * (Y.to(self.dev) - self._prior), self.lam)
        self.alpha = alpha.to(self.dev)
        self._F: torch.Tensor | None = None
        self._K: Gram | None = None

    @classmethod
    def on_weights(cls, head: Any, Z: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, K: Gram | None = None,
                   lam: float | None = None) -> "DualSystem":
        """The head's model (its feature map held) on preprocessed rows Z (n, D) with targets Y (n, C) and weights a
        (n,), solved by one Cholesky at ``lam`` (default the head's); ``K``: their Gram under the head's kernel, when
        already computed. The system keeps that Gram, so refits under other weights of the same rows reuse it."""
        K = head.train_gram(Z) if K is None else K
        lam = head.lam_ if lam is None else float(lam)
        features = K.F if isinstance(K, LowRankGram) else None
        system = cls(head, Z, Y, CholeskySolve(CentredGram.of(K, a), lam), lam, features)
        system._K = K
        return system

    # -- the protocol's primitives ------------------------------------------------------------------
    def decision(self, G: ArrayLike) -> torch.Tensor:
        Zq = self.head.preprocess(G).to(self.dev)
        intercept = self._prior - self.cg.r @ self.alpha  # f = intercept + k(x)^T alpha, as sum(alpha) = 0
        if self.features is not None:  # k(x)^T alpha = phi(x) . (Phi^T alpha), without the (m, n) kernel
            return (self.head.phi(Zq) @ (self.features.to(self.dev).T @ self.alpha) + intercept).cpu()
        return (self.head.gram(Zq, self.Z.to(self.dev)) @ self.alpha + intercept).cpu()

    def train_decision(self) -> torch.Tensor:
        if self._F is None:
            self._F = (self._prior + self.cg.Kc @ self.alpha).cpu()
        return self._F

    def hat_diag(self) -> torch.Tensor:
        return (self.cg.a / self.cg.S + self.solver.mass(self.lam)).cpu()

    def equivalent_kernel(self, G: ArrayLike, rows: Sequence[int] | None = None) -> torch.Tensor:
        kc = self._similarity(G)
        if rows is None:
            return self._smoother(kc)
        U = self._rows(rows).to(self.dev)
        cg = self.cg
        return (cg.a[U] / cg.S + (kc * cg.s) @ self.solver.inverse_columns(U, self.lam) * cg.s[U]).cpu()

    def hat_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._smoother(self.cg.Kc[rows.to(self.dev)])

    def hat_columns(self, rows: torch.Tensor) -> torch.Tensor:
        cg, U = self.cg, rows.to(self.dev)
        return (cg.a[U] / cg.S + cg.Kc @ (cg.s.unsqueeze(1) * self.solver.inverse_columns(U, self.lam)) * cg.s[U]).cpu()

    def similarity(self, G: ArrayLike) -> torch.Tensor:
        return self._similarity(G).cpu()

    @property
    def dual_coef(self) -> torch.Tensor:
        return self.alpha.cpu()

    def refit(self, rows: ArrayLike | None = None, weights: ArrayLike | None = None) -> "DualSystem":
        idx = self._rows(rows)
        a = self.a[idx] if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64)).reshape(-1)
        if a.shape != idx.shape or not torch.isfinite(a).all() or (a < 0).any() or float(a.sum()) <= 0:
            raise CarrotError(f"weights: expected {len(idx)} finite weights >= 0 with a positive sum, got {tuple(a.shape)}")
        K = self.train_gram() if rows is None else self._gram_of(idx)
        return DualSystem.on_weights(self.head, self.Z[idx], self.Y[idx].to(self.dev), a.to(self.dev), K, self.lam)

    def weight_gradient(self, G_val: ArrayLike, dF: torch.Tensor) -> torch.Tensor:
        cg = self.cg
        B = self._similarity(G_val).T @ dF.to(self.dev)  # (n, C): sum_v kc(i, v) dF_v
        s = cg.s.unsqueeze(1)
        xMx = (B - cg.Kc @ (s * self.solver.solve(s * B, self.lam))) / self.lam + dF.to(self.dev).sum(0) / cg.S
        return (xMx.cpu() * self.residuals()).sum(1)

    # -- the dual form ------------------------------------------------------------------------------
    def train_gram(self) -> Gram:
        """The (uncentred) Gram of the training rows under the head's kernel: the one this system was built on when it
        has it (a refit's), else computed (the head's own system does not hold a second n x n array)."""
        if self._K is not None:
            return self._K
        return LowRankGram(self.features.to(self.dev)) if self.features is not None else self.head.gram(self.Z.to(self.dev), None)

    def _gram_of(self, idx: torch.Tensor) -> Gram:
        """The Gram of training rows ``idx`` only (k x k, or their factor rows)."""
        if self._K is not None:
            return gram_sub(self._K, idx.to(self.dev))
        if self.features is not None:
            return LowRankGram(self.features[idx].to(self.dev))
        return self.head.gram(self.Z[idx].to(self.dev), None)

    def _similarity(self, G: ArrayLike) -> torch.Tensor:
        """kc(x, z_i) (m, n) on the system's device."""
        Zq = self.head.preprocess(G).to(self.dev)
        k = (self.head.phi(Zq) @ self.features.to(self.dev).T if self.features is not None
             else self.head.gram(Zq, self.Z.to(self.dev)))
        return centre_cross(k, self.cg.r, self.cg.a, self.cg.t)

    def _smoother(self, kc: torch.Tensor) -> torch.Tensor:
        """l (m, n) = a / S + s * (M + lam I)^-1 (s * kc) of centred kernel rows kc (m, n)."""
        cg = self.cg
        kc = kc.to(self.dev)
        return (cg.a / cg.S + cg.s * self.solver.solve((cg.s * kc).T, self.lam).T).cpu()
