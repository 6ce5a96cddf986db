"""Baseline estimators on the same frozen features, for fair comparison with the exact ridge head.

* Softmax cross-entropy head with L2 (seed implementation-guide-head-only): minimise
  (1/n) sum_i a_i CE(W^T (g_i - mu) + b, y_i) + lam ||W||^2 to stationarity; then
  W = sum_i (g_i - mu) beta_i^T with representer values beta_i = -a_i dl_i/df_i / (2 lam n),
  so f_c(x) = b_c + sum_i beta_ic k(i, x)  (Yeh et al. 2018), exact up to the optimiser's tolerance.
* TracIn / TracInCP (Pruthi et al. 2020) on the same CE head trained by minibatch SGD with
  checkpoints: influence(z, z') = sum_t eta_t grad l(z; theta_t) . grad l(z'; theta_t). For a linear
  head the per-example gradient is x~ (p - y)^T, so the dot product factorises into
  <x~_i, x~_j> <p_i - y_i, p_j - y_j>.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, index_labels, one_hot


def _labels(y: ArrayLike, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    if classes is None:
        classes, idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise CarrotError(f"y: expected at least 2 classes, got {len(classes)}")
        return classes, idx
    return classes, index_labels(classes, y)


class SoftmaxHead:
    """L2-regularised multinomial logistic head on centred features, solved by L-BFGS in float64.

    Fitted: ``coef_`` (D, C), ``intercept_`` (C,), ``feature_mean_`` (D,), ``dual_coef_`` (n, C)
    representer values, ``classes_``, ``grad_norm_`` (stationarity reached).
    """

    def __init__(self, lam: float = 1e-3, max_iter: int = 500, tol: float = 1e-12) -> None:
        self.lam, self.max_iter, self.tol = lam, max_iter, tol

    def fit(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "SoftmaxHead":
        if not (isinstance(self.lam, (int, float)) and np.isfinite(self.lam) and self.lam > 0):
            raise CarrotError(f"lam: expected a finite number > 0, got {self.lam!r}")
        G = as_float64_matrix(G, "G")
        n, d = G.shape
        classes, y_idx = _labels(y)
        a = as_weights(sample_weight, n)
        mu = G.mean(0)
        X = G - mu
        Y = one_hot(y_idx, len(classes))
        W = torch.zeros(d, len(classes), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=self.max_iter, tolerance_grad=self.tol,
                                tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            logits = X @ W + b
            loss = (a * -(torch.log_softmax(logits, 1) * Y).sum(1)).sum() / n + self.lam * (W * W).sum()
            loss.backward()
            return loss

        for _ in range(20):  # L-BFGS restarts until stationary: the representer identity needs it
            opt.step(objective)
            objective()
            self.grad_norm_ = float(torch.cat([W.grad.flatten(), b.grad]).abs().max())
            if self.grad_norm_ < self.tol:
                break
        W, b = W.detach(), b.detach()
        P = torch.softmax(X @ W + b, 1)
        self.classes_, self.coef_, self.intercept_, self.feature_mean_ = classes, W, b, mu
        self.dual_coef_ = -(a.unsqueeze(1) * (P - Y)) / (2 * self.lam * n)
        return self

    def decision_function(self, G: ArrayLike) -> np.ndarray:
        return ((as_float64_matrix(G, "G") - self.feature_mean_) @ self.coef_ + self.intercept_).numpy()

    def predict(self, G: ArrayLike) -> np.ndarray:
        return self.classes_[self.decision_function(G).argmax(1)]


@dataclass
class TracInHead:
    """A CE head trained by minibatch SGD, with the checkpoints TracIn needs."""

    classes: np.ndarray
    feature_mean: torch.Tensor
    checkpoints: list[tuple[torch.Tensor, float]] = field(default_factory=list)  # (theta (D+1, C), lr)

    @classmethod
    def fit(cls, G: ArrayLike, y: ArrayLike, lam: float = 1e-4, epochs: int = 30, lr: float = 0.5,
            batch_size: int = 64, n_checkpoints: int = 5, seed: int = 0) -> "TracInHead":
        """SGD on (1/n) sum CE + lam ||W||^2; keeps ``n_checkpoints`` evenly spaced epoch-end checkpoints."""
        G = as_float64_matrix(G, "G")
        classes, y_idx = _labels(y)
        if epochs < 1 or n_checkpoints < 1 or n_checkpoints > epochs:
            raise CarrotError(f"TracIn: expected 1 <= n_checkpoints <= epochs, got {n_checkpoints} and {epochs}")
        mu = G.mean(0)
        X = _aug(G - mu)
        Y = one_hot(y_idx, len(classes))
        gen = torch.Generator().manual_seed(seed)
        theta = torch.zeros(X.shape[1], len(classes), dtype=torch.float64)
        keep = set(np.linspace(epochs, 0, n_checkpoints, endpoint=False).round().astype(int).tolist())
        head = cls(classes, mu)
        n = X.shape[0]
        for epoch in range(1, epochs + 1):
            for rows in torch.randperm(n, generator=gen).split(batch_size):
                P = torch.softmax(X[rows] @ theta, 1)
                grad = X[rows].T @ (P - Y[rows]) / len(rows)
                grad[1:] += 2 * lam * theta[1:]
                theta = theta - lr * grad
            if epoch in keep:
                head.checkpoints.append((theta.clone(), lr))
        return head

    def _errors(self, X: torch.Tensor, y_idx: np.ndarray, theta: torch.Tensor) -> torch.Tensor:
        return torch.softmax(X @ theta, 1) - one_hot(y_idx, len(self.classes))

    def influence(self, G_train: ArrayLike, y_train: ArrayLike, G_test: ArrayLike, y_test: ArrayLike) -> torch.Tensor:
        """TracInCP influence (m, n) of each training example on each test example's loss."""
        Xtr, Xte = _aug(as_float64_matrix(G_train, "G_train") - self.feature_mean), _aug(as_float64_matrix(G_test, "G_test") - self.feature_mean)
        _, ytr = _labels(y_train, self.classes)
        _, yte = _labels(y_test, self.classes)
        K = Xte @ Xtr.T
        E = sum(lr * self._errors(Xte, yte, th) @ self._errors(Xtr, ytr, th).T for th, lr in self.checkpoints)
        return K * E

    def self_influence(self, G: ArrayLike, y: ArrayLike) -> torch.Tensor:
        """sum_t eta_t ||grad l(z_i; theta_t)||^2, (n,)."""
        X = _aug(as_float64_matrix(G, "G") - self.feature_mean)
        _, yi = _labels(y, self.classes)
        sq = (X * X).sum(1)
        return sum(lr * sq * (self._errors(X, yi, th) ** 2).sum(1) for th, lr in self.checkpoints)

    def decision_function(self, G: ArrayLike) -> np.ndarray:
        return (_aug(as_float64_matrix(G, "G") - self.feature_mean) @ self.checkpoints[-1][0]).numpy()


def _aug(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(X.shape[0], 1, dtype=X.dtype), X], 1)
