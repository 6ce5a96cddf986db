"""Exact removal / reweighting algebra for the weighted ridge head.

In centred coordinates x = [1, g - mu] (mu the fit's weighted mean, frozen; without intercept x = g)
the head is theta = [ybar; W] = M^-1 X^T A Y with M = X^T A X + diag(0, lam I) = blockdiag(S, Gc^T A Gc + lam I):
the head's own factorisation (:class:`carrot.ridge.core.RidgeFactor`) solves it, nothing is refactorised.
Changing the weights of k rows U by delta is a rank-k update handled by Woodbury (Hager 1989),
O(k D^2 + k^3) instead of a refit (exact for any change: freezing mu only reparametrises the intercept):

    theta' = theta1 - Z (I + diag(delta) U Z)^-1 diag(delta) U theta1,
    Z = M^-1 U^T,  theta1 = theta + Z diag(delta) Y_U.

Removing one row i (delta = -a_i) gives the exact leave-one-out effect on any input x:
    f_-i(x) - f(x) = -a_i (x^T M^-1 x_i) r_i / (1 - h_ii),  h_ii = a_i x_i^T M^-1 x_i.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from carrot.devices import resolve_device
from carrot.errors import CarrotError, check_is_fitted
from carrot.ridge.head import RidgeHead
from carrot.ridge.core import CentredMoments, RidgeFactor
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, index_labels, one_hot


@dataclass
class RidgeSystem:
    """A ridge fit with its training rows, in centred coordinates; build with :meth:`fit` or :meth:`from_head`."""

    G: torch.Tensor  # (n, D) float64
    Y: torch.Tensor  # (n, C) targets
    a: torch.Tensor  # (n,) weights
    lam: float
    fit_intercept: bool
    factor: RidgeFactor  # of Gc^T A Gc + lam I
    mu: torch.Tensor  # (D,) frozen centre
    S: float  # total weight, the intercept block of M
    theta: torch.Tensor  # (p, C) = [ybar; W], p = D + fit_intercept
    device: str = "cpu"
    chunk_size: int = 65536

    @classmethod
    def fit(cls, G: ArrayLike, Y: torch.Tensor, a: ArrayLike | None, lam: float, fit_intercept: bool = True,
            device: str = "cpu", chunk_size: int = 65536) -> "RidgeSystem":
        """Solve for weights ``a`` (n,) and targets Y (n, C): the ridge core's centred moments and one Cholesky."""
        G = as_float64_matrix(G, "G")
        n = G.shape[0]
        if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and np.isfinite(lam) and lam > 0):
            raise CarrotError(f"lam: expected a finite number > 0, got {lam!r}")
        a = as_weights(a, n)
        Y = torch.as_tensor(Y, dtype=torch.float64)
        if Y.shape[0] != n:
            raise CarrotError(f"Y: expected {n} rows to match G, got {Y.shape[0]}")
        dev = resolve_device(device)
        m = CentredMoments.accumulate(G, Y, a, fit_intercept=fit_intercept, chunk_size=chunk_size, device=dev).to("cpu")
        factor = RidgeFactor.primal(m.M, float(lam))
        return cls._from_solution(G, Y, a, float(lam), fit_intercept, factor, m.mu, float(m.S), m.ybar, factor.solve(m.B),
                                  str(device), chunk_size)

    @classmethod
    def _from_solution(cls, G, Y, a, lam, fit_intercept, factor, mu, S, ybar, W, device="cpu", chunk_size=65536) -> "RidgeSystem":
        theta = torch.cat([ybar.unsqueeze(0), W]) if fit_intercept else W
        return cls(G, Y, a, lam, fit_intercept, factor, mu, S, theta, device, chunk_size)

    @classmethod
    def from_head(cls, head: RidgeHead, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "RidgeSystem":
        """The system behind a fitted :class:`RidgeHead`, on its training rows G (n, D), y (n,).

        Uses the head's own factorisation and weights (``factor_``, ``sample_weight_``): nothing is
        re-accumulated. ``sample_weight``, if given, must be the head's weights.
        """
        check_is_fitted(head)
        G = as_float64_matrix(G, "G")
        idx = index_labels(head.classes_, y)
        n = G.shape[0]
        if head.dual_coef_ is not None and head.dual_coef_.shape[0] != n:
            raise CarrotError(f"G: expected the {head.dual_coef_.shape[0]} training rows the head was fitted on, got {n}")
        a = as_weights(getattr(head, "sample_weight_", None), n)
        if sample_weight is not None and not torch.equal(as_weights(sample_weight, n), a):
            raise CarrotError("sample_weight: differs from the weights the head was fitted with (head.sample_weight_)")
        Y = one_hot(idx, len(head.classes_))
        factor = getattr(head, "factor_", None)
        if factor is None:  # a head from an older file, or fitted from moments: factorise once here
            return cls.fit(G, Y, a, head.lam_, head.fit_intercept, head.device, head.chunk_size)
        if factor.kind == "dual":
            factor = RidgeFactor("dual", factor.chol, factor.lam).bind(a.sqrt().unsqueeze(1) * (G - head.feature_mean_))
        return cls._from_solution(G, Y, a, float(head.lam_), head.fit_intercept, factor, head.feature_mean_,
                                  float(a.sum()), head.prior_, head.coef_, str(head.device), head.chunk_size)

    def refit(self, rows: ArrayLike | None = None, a: ArrayLike | None = None) -> "RidgeSystem":
        """The same settings (lam, intercept, device) refitted on training rows ``rows`` and/or weights ``a``."""
        idx = torch.arange(self.G.shape[0]) if rows is None else torch.as_tensor(np.asarray(rows), dtype=torch.long)
        w = self.a[idx] if a is None else a
        return RidgeSystem.fit(self.G[idx], self.Y[idx], w, self.lam, self.fit_intercept, self.device, self.chunk_size)

    # -- basic quantities -------------------------------------------------------------------
    def augment(self, G: ArrayLike) -> torch.Tensor:
        """x = [1, g - mu] (or g without intercept) for rows G (m, D): (m, p)."""
        return _augment(as_float64_matrix(G, "G"), self.mu, self.fit_intercept)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """M^-1 B for B (p, k): a division for the intercept block, the ridge factor for the rest."""
        if not self.fit_intercept:
            return self.factor.solve(B)
        return torch.cat([B[:1] / self.S, self.factor.solve(B[1:])])

    @property
    def coef(self) -> torch.Tensor:
        return self.theta[int(self.fit_intercept):]

    @property
    def intercept(self) -> torch.Tensor:
        """b of f(g) = W^T g + b."""
        if not self.fit_intercept:
            return torch.zeros(self.theta.shape[1], dtype=torch.float64)
        return self.theta[0] - self.coef.T @ self.mu

    def decision(self, G: ArrayLike, theta: torch.Tensor | None = None) -> torch.Tensor:
        return self.augment(G) @ (self.theta if theta is None else theta)

    def decision_without(self, G: ArrayLike, rows: Sequence[int]) -> torch.Tensor:
        """Logits (m, C) of the refit without training rows ``rows`` (Woodbury, no refit)."""
        return self.decision(G, self.updated_theta(rows))

    def decision_only(self, G: ArrayLike, rows: Sequence[int]) -> torch.Tensor:
        """Logits (m, C) of the refit on training rows ``rows`` only."""
        return self.refit(rows).decision(G)

    def weight_gradient(self, G_val: ArrayLike, dF: torch.Tensor) -> torch.Tensor:
        """dL/da (n,) for a loss whose gradient in the logits of G_val (m, D) is dF (m, C): x_i^T M^-1 X_v^T dF r_i,
        one solve for every training point (implicit differentiation of the quadratic inner problem)."""
        V = self.solve(self.augment(G_val).T @ dF)  # (p, C)
        return ((_augment(self.G, self.mu, self.fit_intercept) @ V) * self.residuals()).sum(1)

    def residuals(self) -> torch.Tensor:
        """r_i = y_i - f(x_i), (n, C)."""
        return self.Y - _augment(self.G, self.mu, self.fit_intercept) @ self.theta

    @cached_property
    def solved_rows(self) -> torch.Tensor:
        """M^-1 x_i for every training row, (p, n): computed once per system (hat diagonal, removal terms, certificates)."""
        return self.solve(_augment(self.G, self.mu, self.fit_intercept).T)

    def hat_diag(self) -> torch.Tensor:
        """h_ii = a_i x_i^T M^-1 x_i, (n,)."""
        X = _augment(self.G, self.mu, self.fit_intercept)
        return self.a * (X * self.solved_rows.T).sum(1)

    # -- exact removal ----------------------------------------------------------------------
    def loo_logits(self) -> torch.Tensor:
        """Exact leave-one-out logits of every training row.

        Returns
        -------
        tensor (n, C): f_-i(x_i) = (f(x_i) - h_ii y_i) / (1 - h_ii).
        """
        X = _augment(self.G, self.mu, self.fit_intercept)
        f = X @ self.theta
        h = self.hat_diag().unsqueeze(1)
        return (f - h * self.Y) / (1 - h)

    def loo_cross_entropy(self, loo: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Exact leave-one-out cross-entropy of every training label under a calibrated softmax of the LOO logits.

        The temperature T minimises the mean LOO cross-entropy on the training labels themselves (one bounded
        1-D search; no held-out labels): a label-review score (high: the rest of the data disagrees with this
        label), scale-free unlike the squared LOO loss.

        Parameters
        ----------
        loo : (n, C) :meth:`loo_logits`, when the caller already has them.

        Returns
        -------
        (scores (n,) = -log softmax(f_-i(x_i) / T)_{y_i}, T).
        """
        loo = self.loo_logits() if loo is None else loo
        return calibrated_cross_entropy(loo, self.Y.argmax(1), self.a > 0)

    def loo_loss_change(self, G_eval: ArrayLike, y_eval_idx: np.ndarray, chunk: int = 256) -> torch.Tensor:
        """:func:`loo_loss_change` of this system."""
        return loo_loss_change(self, G_eval, y_eval_idx, chunk)

    def removal_terms(self, idx: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, R) with Z = M^-1 X_i^T (p, k) and R_i = a_i r_i / (1 - h_ii) (k, C), so that removing
        row i changes the logits of any x by -(x^T Z_i) R_i."""
        idx = torch.arange(self.G.shape[0]) if idx is None else torch.as_tensor(np.asarray(idx), dtype=torch.long)
        Xi = _augment(self.G[idx], self.mu, self.fit_intercept)
        Z = self.solved_rows[:, idx]
        a = self.a[idx]
        h = a * (Xi * Z.T).sum(1)
        return Z, (self.Y[idx] - Xi @ self.theta) * (a / (1 - h)).unsqueeze(1)

    def loo_effect(self, G_test: ArrayLike, idx: Sequence[int] | None = None) -> torch.Tensor:
        """Exact change of the logits of test rows when one training row is removed (no refit).

        Parameters
        ----------
        G_test : array (m, D).
        idx : training rows to remove one at a time (k of them), or None for all n.

        Returns
        -------
        tensor (m, k, C): f_-i(x) - f(x).
        """
        Z, R = self.removal_terms(idx)
        Q = self.augment(G_test) @ Z  # (m, k)
        return -Q.unsqueeze(-1) * R.unsqueeze(0)

    # -- Woodbury -------------------------------------------------------------------------------
    def updated_theta(
        self,
        idx: Sequence[int] = (),
        new_weights: ArrayLike | None = None,
        G_add: ArrayLike | None = None,
        Y_add: torch.Tensor | None = None,
        w_add: ArrayLike | None = None,
    ) -> torch.Tensor:
        """Coefficients after a weight change, by one Woodbury update of the head's factor (no refit).

        Parameters
        ----------
        idx : k distinct training rows whose weights change.
        new_weights : (k,) their new weights >= 0 (None: 0, i.e. remove them).
        G_add, Y_add, w_add : rows (q, D), targets (q, C) and weights (q,) to add, or None.

        Returns
        -------
        tensor (p, C) theta' in this system's coordinates: ``decision(G, theta')`` gives the new logits.
        """
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
        if len(idx_t) and (idx_t.min() < 0 or idx_t.max() >= self.G.shape[0]):
            raise CarrotError(f"idx: expected training row indices in [0, {self.G.shape[0]}), got {idx_t.tolist()[:5]}...")
        if len(torch.unique(idx_t)) != len(idx_t):
            raise CarrotError("idx: expected distinct training rows")
        nw = torch.zeros(len(idx_t), dtype=torch.float64) if new_weights is None else torch.as_tensor(
            np.asarray(new_weights, dtype=np.float64).reshape(-1))
        if nw.shape != idx_t.shape or (nw < 0).any():
            raise CarrotError(f"new_weights: expected {len(idx_t)} weights >= 0, got {tuple(nw.shape)}")
        U = [_augment(self.G[idx_t], self.mu, self.fit_intercept)]
        delta = [nw - self.a[idx_t]]
        YU = [self.Y[idx_t]]
        if G_add is not None:
            Ga = as_float64_matrix(G_add, "G_add")
            if Y_add is None or Y_add.shape != (Ga.shape[0], self.Y.shape[1]):
                raise CarrotError(f"Y_add: expected shape ({Ga.shape[0]}, {self.Y.shape[1]})")
            wa = torch.ones(Ga.shape[0], dtype=torch.float64) if w_add is None else torch.as_tensor(np.asarray(w_add, dtype=np.float64))
            U.append(self.augment(Ga))
            delta.append(wa)
            YU.append(Y_add.to(torch.float64))
        U_, d_, Y_ = torch.cat(U), torch.cat(delta), torch.cat(YU)
        if len(d_) == 0:
            return self.theta.clone()
        Z = self.solve(U_.T)  # (p, k)
        theta1 = self.theta + Z @ (d_.unsqueeze(1) * Y_)
        cap = torch.eye(len(d_), dtype=torch.float64) + d_.unsqueeze(1) * (U_ @ Z)
        return theta1 - Z @ torch.linalg.solve(cap, d_.unsqueeze(1) * (U_ @ theta1))


def _augment(G: torch.Tensor, mu: torch.Tensor, fit_intercept: bool) -> torch.Tensor:
    if not fit_intercept:
        return G
    return torch.cat([torch.ones(G.shape[0], 1, dtype=G.dtype, device=G.device), G - mu], dim=1)


def calibrated_cross_entropy(loo: torch.Tensor, y: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, float]:
    """-log softmax(loo / T)_y per row (n,), with the temperature T minimising the mean over the ``active`` rows
    (one bounded 1-D search on the training labels themselves); and T."""
    from scipy.optimize import minimize_scalar

    rows = torch.arange(len(y))

    def ce(log_t: float) -> torch.Tensor:
        return -torch.log_softmax(loo / float(np.exp(log_t)), 1)[rows, y]

    best = minimize_scalar(lambda t: float(ce(t)[active].mean()), bounds=(-8.0, 8.0), method="bounded",
                           options={"xatol": 1e-6})
    return ce(best.x), float(np.exp(best.x))


def loo_loss_change(system: RidgeSystem, G_eval: ArrayLike, y_eval_idx: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """Exact change of the summed squared loss on (G_eval, y_eval) when training row i is removed, (n,).

    With Delta_i(x) = f_-i(x) - f(x) = -Q[x, i] R_i:  sum_x ||f_-i(x) - y_x||^2 - ||f(x) - y_x||^2
    = sum_x -2 Q[x, i] (E_x . R_i) + Q[x, i]^2 ||R_i||^2, E = F - Y. Negative: removing i helps
    (a harmful image); positive: i helps. Streamed over chunks of evaluation rows.
    """
    Z, R = system.removal_terms()
    Ge = as_float64_matrix(G_eval, "G_eval")
    Y = one_hot(np.asarray(y_eval_idx), system.Y.shape[1])
    r2 = (R * R).sum(1)
    total = torch.zeros(R.shape[0], dtype=torch.float64)
    for s in range(0, Ge.shape[0], chunk):
        Xe = system.augment(Ge[s : s + chunk])
        Q = Xe @ Z  # (mc, n)
        E = Xe @ system.theta - Y[s : s + chunk]  # (mc, C)
        total += (-2 * Q * (E @ R.T) + Q * Q * r2).sum(0)
    return total
