"""The primal back-end of :class:`~carrot.ridge.system.TrainingSystem`: the linear ridge head on its training rows.

In centred coordinates x~ = [1, g - mu] (mu the fit's weighted mean, frozen; without intercept x~ = g) the head is
theta = [ybar; W] = M~^-1 X~^T A Y with M~ = X~^T A X~ + diag(0, lam I) = blockdiag(S, Gc^T A Gc + lam I): the head's
own factorisation (:class:`carrot.ridge.core.RidgeFactor`) solves it, nothing is refactorised. The equivalent
kernel is l_i(x) = a_i x~^T M~^-1 x~_i, computed from the solved training rows Z = M~^-1 X~^T (p, n), once.
Beside the protocol's weight changes (which need only the k x k block of the hat matrix here), changing the weights of
k rows U by delta is a rank-k update of theta itself (Woodbury; Hager 1989), O(k D^2 + k^3), exact for any change
(freezing mu only reparametrises the intercept), adding rows the fit never saw included (:meth:`updated_theta`):

    theta' = theta1 - Z_U (I + diag(delta) X~_U Z_U)^-1 diag(delta) X~_U theta1,   theta1 = theta + Z_U diag(delta) Y_U.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from carrot.devices import resolve_device
from carrot.errors import CarrotError
from carrot.ridge.core import CentredMoments, RidgeFactor
from carrot.ridge.system import Counterfactuals, TrainingSystem
from carrot.validation import ArrayLike, as_float64_matrix, as_weights


@dataclass
class PrimalSystem(TrainingSystem):
    """A ridge fit with its training rows, in centred coordinates; build with :meth:`fit` or ``RidgeHead.system``."""

    G: torch.Tensor  # (n, D) float64
    Y: torch.Tensor  # (n, C) targets
    a: torch.Tensor  # (n,) weights
    lam: float
    fit_intercept: bool
    factor: RidgeFactor  # of Gc^T A Gc + lam I
    mu: torch.Tensor  # (D,) frozen centre
    S: float  # total weight, the intercept block of M~
    theta: torch.Tensor  # (p, C) = [ybar; W], p = D + fit_intercept
    device: str = "cpu"
    chunk_size: int = 65536

    @classmethod
    def fit(cls, G: ArrayLike, Y: torch.Tensor, a: ArrayLike | None, lam: float, fit_intercept: bool = True,
            device: str = "cpu", chunk_size: int = 65536) -> "PrimalSystem":
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
        return cls.from_solution(G, Y, a, float(lam), fit_intercept, factor, m.mu, float(m.S), m.ybar, factor.solve(m.B),
                                 str(device), chunk_size)

    @classmethod
    def from_solution(cls, G: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, lam: float, fit_intercept: bool,
                      factor: RidgeFactor, mu: torch.Tensor, S: float, ybar: torch.Tensor, W: torch.Tensor,
                      device: str = "cpu", chunk_size: int = 65536) -> "PrimalSystem":
        """The system of an already solved fit: rows G (n, D), targets Y (n, C), weights a (n,), its factor, centre mu,
        total weight S, prior ybar (C,) and coefficients W (D, C)."""
        theta = torch.cat([ybar.unsqueeze(0), W]) if fit_intercept else W
        return cls(G, Y, a, lam, fit_intercept, factor, mu, S, theta, device, chunk_size)

    # -- the protocol's primitives ------------------------------------------------------------------
    def refit(self, rows: ArrayLike | None = None, weights: ArrayLike | None = None) -> "PrimalSystem":
        idx = self._rows(rows)
        w = self.a[idx] if weights is None else weights
        return PrimalSystem.fit(self.G[idx], self.Y[idx], w, self.lam, self.fit_intercept, self.device, self.chunk_size)

    def decision(self, G: ArrayLike, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (m, C) of rows G (m, D) (with coefficients ``theta`` (p, C), default the fit's)."""
        return self.augment(G) @ (self.theta if theta is None else theta)

    def train_decision(self) -> torch.Tensor:
        return self._memo("train_decision", lambda: self._X @ self.theta)

    def hat_diag(self) -> torch.Tensor:
        return self.a * (self._X * self.solved_rows.T).sum(1)

    def equivalent_kernel(self, G: ArrayLike, rows: Sequence[int] | None = None) -> torch.Tensor:
        idx = self._rows(rows)
        return self.augment(G) @ self.solved_rows[:, idx] * self.a[idx]

    def hat_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._X[rows] @ self.solved_rows * self.a

    def hat_columns(self, rows: torch.Tensor) -> torch.Tensor:
        return self._X @ self.solved_rows[:, rows] * self.a[rows]

    def hat_block(self, rows: torch.Tensor) -> torch.Tensor:
        return self._X[rows] @ self.solved_rows[:, rows] * self.a[rows]

    def counterfactuals(self, G: ArrayLike) -> Counterfactuals:
        """Inputs G prepared for many exact counterfactuals: their logits and centred coordinates (m, p), from which
        the equivalent kernel's columns of each changed set cost O(m p k) (no (m, n) matrix is held)."""
        X = self.augment(G)
        return Counterfactuals(self, X @ self.theta, lambda U: X @ self.solved_rows[:, U] * self.a[U])

    def similarity(self, G: ArrayLike) -> torch.Tensor:
        return (as_float64_matrix(G, "G") - self.mu) @ (self.G - self.mu).T

    @property
    def dual_coef(self) -> torch.Tensor:
        return self.a.unsqueeze(1) * self.residuals() / self.lam

    def intercept_share(self) -> torch.Tensor:
        return self.a / self.S if self.fit_intercept else torch.zeros_like(self.a)

    @property
    def prior(self) -> torch.Tensor:
        """ybar (C,), or 0 without an intercept."""
        return self.theta[0] if self.fit_intercept else torch.zeros(self.theta.shape[1], dtype=torch.float64)

    def weight_gradient(self, G_val: ArrayLike, dF: torch.Tensor) -> torch.Tensor:
        V = self.solve(self.augment(G_val).T @ dF)  # (p, C)
        return ((self._X @ V) * self.residuals()).sum(1)

    # -- the primal form -------------------------------------------------------------------------------
    def augment(self, G: ArrayLike) -> torch.Tensor:
        """x~ = [1, g - mu] (or g without intercept) for rows G (m, D): (m, p)."""
        G = as_float64_matrix(G, "G")
        if not self.fit_intercept:
            return G
        return torch.cat([torch.ones(G.shape[0], 1, dtype=G.dtype, device=G.device), G - self.mu], dim=1)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """M~^-1 B for B (p, k): a division for the intercept block, the ridge factor for the rest."""
        if not self.fit_intercept:
            return self.factor.solve(B)
        return torch.cat([B[:1] / self.S, self.factor.solve(B[1:])])

    @property
    def coef(self) -> torch.Tensor:
        """W (D, C)."""
        return self.theta[int(self.fit_intercept):]

    @property
    def intercept(self) -> torch.Tensor:
        """b of f(g) = W^T g + b."""
        if not self.fit_intercept:
            return torch.zeros(self.theta.shape[1], dtype=torch.float64)
        return self.theta[0] - self.coef.T @ self.mu

    @cached_property
    def _X(self) -> torch.Tensor:
        """X~ (n, p): the training rows in centred coordinates."""
        return self.augment(self.G)

    @cached_property
    def solved_rows(self) -> torch.Tensor:
        """Z = M~^-1 X~^T (p, n): computed once per system (hat, equivalent kernel, removal, certificates)."""
        return self.solve(self._X.T)

    def updated_theta(self, idx: Sequence[int] = (), new_weights: ArrayLike | None = None, G_add: ArrayLike | None = None,
                      Y_add: torch.Tensor | None = None, w_add: ArrayLike | None = None) -> torch.Tensor:
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
        U, delta, YU = [self._X[idx_t]], [nw - self.a[idx_t]], [self.Y[idx_t]]
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

    def removal_pairs(self, U: torch.Tensor, V: torch.Tensor, i: int, c: int) -> tuple[torch.Tensor, float]:
        """Split training row i's support f_c(x) - f_-i(x)_c over the parts of g_x - mu and of g_i - mu.

        With x~^T M~^-1 x~_i = [1 / S] + (g_x - mu)^T M^-1 (g_i - mu) and l_i(x) e_ic / (1 - h_ii) the support, the
        pair (j, k) of rows U_j (of the test image, summing to g_x - mu) and V_k (of image i, summing to g_i - mu)
        takes R_ic U_j^T M^-1 V_k with R_ic = a_i e_ic / (1 - h_ii), and the intercept R_ic / S.

        Returns
        -------
        (pairs (N, N'), intercept part): pairs.sum() + intercept part = the support of row i for class c.
        """
        Ric = float(self.a[i] * self.loo_residuals()[i, c])
        pairs = Ric * (U @ self.factor.solve(V.T))
        return pairs, (Ric / self.S if self.fit_intercept else 0.0)
