"""Exact removal / reweighting algebra for the weighted ridge head.

The head is the augmented system  theta = M^-1 X^T A Y,  M = X^T A X + diag(0, lam I),
X = [1, G] (the intercept column unpenalised; without intercept X = G, M = G^T A G + lam I).
Changing the weights of k rows U by delta is a rank-k update handled by Woodbury
(Hager 1989) on the Cholesky factor of M, O(k D^2 + k^3) instead of a refit:

    theta' = theta1 - Z (I + diag(delta) U Z)^-1 diag(delta) U theta1,
    Z = M^-1 U^T,  theta1 = theta + Z diag(delta) Y_U.

Removing one row i (delta = -a_i) gives the exact leave-one-out effect on any input x:
    f_-i(x) - f(x) = -a_i (x^T M^-1 x_i) r_i / (1 - h_ii),  h_ii = a_i x_i^T M^-1 x_i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .devices import resolve_device
from .errors import CarrotError, check_is_fitted
from .head import RidgeHead
from .validation import ArrayLike, as_float64_matrix, as_weights, index_labels, one_hot


@dataclass
class RidgeSystem:
    """Factorised augmented ridge system for one weighting; build with :meth:`fit`."""

    G: torch.Tensor  # (n, D) float64
    Y: torch.Tensor  # (n, C) targets
    a: torch.Tensor  # (n,) weights
    lam: float
    fit_intercept: bool
    chol: torch.Tensor  # (p, p) lower Cholesky factor of M, p = D + fit_intercept
    theta: torch.Tensor  # (p, C)

    @classmethod
    def fit(cls, G: ArrayLike, Y: torch.Tensor, a: ArrayLike | None, lam: float, fit_intercept: bool = True,
            device: str = "cpu", chunk_size: int = 65536) -> "RidgeSystem":
        """Solve for weights ``a`` (n,) and targets Y (n, C); chunked float64 accumulation of M."""
        G = as_float64_matrix(G, "G")
        n, d = G.shape
        if not (isinstance(lam, (int, float)) and np.isfinite(lam) and lam > 0):
            raise CarrotError(f"lam: expected a finite number > 0, got {lam!r}")
        a = as_weights(a, n)
        if Y.shape[0] != n:
            raise CarrotError(f"Y: expected {n} rows to match G, got {Y.shape[0]}")
        dev = resolve_device(device)
        p = d + int(fit_intercept)
        M = torch.zeros(p, p, dtype=torch.float64, device=dev)
        B = torch.zeros(p, Y.shape[1], dtype=torch.float64, device=dev)
        for s in range(0, n, chunk_size):
            X = _augment(G[s : s + chunk_size], fit_intercept).to(dev)
            aX = X * a[s : s + chunk_size].to(dev).unsqueeze(1)
            M += aX.T @ X
            B += aX.T @ Y[s : s + chunk_size].to(dev)
        M.diagonal()[int(fit_intercept):].add_(lam)
        chol, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            raise CarrotError("ridge system is not positive definite; increase lam or give some weight to every class")
        theta = torch.cholesky_solve(B, chol)
        return cls(G, Y, a, float(lam), fit_intercept, chol.cpu(), theta.cpu())

    @classmethod
    def from_head(cls, head: RidgeHead, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "RidgeSystem":
        """The system behind a fitted :class:`RidgeHead` (same lam, intercept, classes, device)."""
        check_is_fitted(head)
        idx = index_labels(head.classes_, y)
        return cls.fit(G, one_hot(idx, len(head.classes_)), sample_weight, head.lam_, head.fit_intercept, head.device,
                       head.chunk_size)

    # -- basic quantities -------------------------------------------------------------------
    def augment(self, G: ArrayLike) -> torch.Tensor:
        return _augment(as_float64_matrix(G, "G"), self.fit_intercept)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """M^-1 B by two triangular solves; B (p, k)."""
        return torch.cholesky_solve(B, self.chol)

    @property
    def coef(self) -> torch.Tensor:
        return self.theta[int(self.fit_intercept):]

    @property
    def intercept(self) -> torch.Tensor:
        return self.theta[0] if self.fit_intercept else torch.zeros(self.theta.shape[1], dtype=torch.float64)

    def decision(self, G: ArrayLike, theta: torch.Tensor | None = None) -> torch.Tensor:
        return self.augment(G) @ (self.theta if theta is None else theta)

    def residuals(self) -> torch.Tensor:
        """r_i = y_i - f(x_i), (n, C)."""
        return self.Y - _augment(self.G, self.fit_intercept) @ self.theta

    def hat_diag(self) -> torch.Tensor:
        """h_ii = a_i x_i^T M^-1 x_i, (n,)."""
        X = _augment(self.G, self.fit_intercept)
        return self.a * (X * self.solve(X.T).T).sum(1)

    # -- exact removal ----------------------------------------------------------------------
    def loo_logits(self) -> torch.Tensor:
        """f_-i(x_i) for every training row, (n, C)."""
        X = _augment(self.G, self.fit_intercept)
        f = X @ self.theta
        h = self.hat_diag().unsqueeze(1)
        return (f - h * self.Y) / (1 - h)

    def removal_terms(self, idx: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, R) with Z = M^-1 X_i^T (p, k) and R_i = a_i r_i / (1 - h_ii) (k, C), so that removing
        row i changes the logits of any x by -(x^T Z_i) R_i."""
        idx = torch.arange(self.G.shape[0]) if idx is None else torch.as_tensor(np.asarray(idx), dtype=torch.long)
        Xi = _augment(self.G[idx], self.fit_intercept)
        Z = self.solve(Xi.T)
        a = self.a[idx]
        h = a * (Xi * Z.T).sum(1)
        return Z, (self.Y[idx] - Xi @ self.theta) * (a / (1 - h)).unsqueeze(1)

    def loo_effect(self, G_test: ArrayLike, idx: Sequence[int] | None = None) -> torch.Tensor:
        """f_-i(x) - f(x) for test rows x and training rows i: (m, k, C) (k = len(idx) or n)."""
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
        """theta after setting rows ``idx`` to ``new_weights`` (0 removes) and adding rows (G_add, Y_add, w_add)."""
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
        if len(idx_t) and (idx_t.min() < 0 or idx_t.max() >= self.G.shape[0]):
            raise CarrotError(f"idx: expected training row indices in [0, {self.G.shape[0]}), got {idx_t.tolist()[:5]}...")
        if len(torch.unique(idx_t)) != len(idx_t):
            raise CarrotError("idx: expected distinct training rows")
        nw = torch.zeros(len(idx_t), dtype=torch.float64) if new_weights is None else torch.as_tensor(
            np.asarray(new_weights, dtype=np.float64).reshape(-1))
        if nw.shape != idx_t.shape or (nw < 0).any():
            raise CarrotError(f"new_weights: expected {len(idx_t)} weights >= 0, got {tuple(nw.shape)}")
        U = [_augment(self.G[idx_t], self.fit_intercept)]
        delta = [nw - self.a[idx_t]]
        YU = [self.Y[idx_t]]
        if G_add is not None:
            Ga = as_float64_matrix(G_add, "G_add")
            if Y_add is None or Y_add.shape != (Ga.shape[0], self.Y.shape[1]):
                raise CarrotError(f"Y_add: expected shape ({Ga.shape[0]}, {self.Y.shape[1]})")
            wa = torch.ones(Ga.shape[0], dtype=torch.float64) if w_add is None else torch.as_tensor(np.asarray(w_add, dtype=np.float64))
            U.append(_augment(Ga, self.fit_intercept))
            delta.append(wa)
            YU.append(Y_add.to(torch.float64))
        U_, d_, Y_ = torch.cat(U), torch.cat(delta), torch.cat(YU)
        if len(d_) == 0:
            return self.theta.clone()
        Z = self.solve(U_.T)  # (p, k)
        theta1 = self.theta + Z @ (d_.unsqueeze(1) * Y_)
        cap = torch.eye(len(d_), dtype=torch.float64) + d_.unsqueeze(1) * (U_ @ Z)
        return theta1 - Z @ torch.linalg.solve(cap, d_.unsqueeze(1) * (U_ @ theta1))


def _augment(G: torch.Tensor, fit_intercept: bool) -> torch.Tensor:
    if not fit_intercept:
        return G
    return torch.cat([torch.ones(G.shape[0], 1, dtype=G.dtype, device=G.device), G], dim=1)


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
