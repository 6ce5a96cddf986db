"""One protocol for an exact training system, and every identity written once over it.

Both heads are linear smoothers of their training labels: for the ridge head (primal, :mod:`carrot.ridge.primal`)
and the kernel head (dual, :mod:`carrot.ridge.dual`, exact or Nystroem) alike, with training weights a and
one-hot targets Y (n, C),

    f(x) = l(x)^T Y,        l_i(x) = a_i x~^T M~^-1 z~_i      (the equivalent kernel)

where x~ = [1, phi(x) - mu] are the centred (feature-map) coordinates, mu frozen at the fit's a-weighted mean, and
M~ = blockdiag(S, Phi_c^T A Phi_c + lam I) (S = sum a; the intercept is unpenalised, and sum_i l_i(x) = 1). A linear
head without an intercept has x~ = g, M~ = G^T A G + lam I and no 1 / S share. The hat matrix is
H_ij = l_j(z_i), its diagonal h, the residuals e = Y - F (F = f on the training rows). A back-end supplies these
few primitives (:class:`TrainingSystem`'s abstract methods); every exact identity below follows from them
(Sherman-Morrison-Woodbury on M~; Hastie, Tibshirani & Friedman, "Elements of Statistical Learning", 5.4.1, 7.10):

* leave-one-out:  f_-i(z_i) = (f_i - h_ii y_i) / (1 - h_ii)
* removal of one image (the sign convention, used everywhere):  removal effect  f_-i(x) - f(x) = -l_i(x) e_i / (1 - h_ii)
* new weights a'_U on rows U (a_U > 0), rho = (a'_U - a_U) / a_U:
      f'(x) - f(x) = l_U(x) diag(rho) (I + H_UU diag(rho))^-1 e_U        (rho = -1: removal of the set U)
* the three views of a logit: removal (above), equivalent kernel s_i(x) (y_ic - ybar_c), s_i(x) = l_i(x) - a_i / S the
  hat-matrix row without the intercept's equal share (Hastie et al., 5.4.1), and representer beta_ic k(x, z_i); the
  last two sum to f_c(x) - ybar_c.

The certificate (:meth:`TrainingSystem.certificate`), the LOO loss change and the label-review score are written
here once, over the protocol. "Exact" means equal to a refit with the head's settings and fitted choices held
(lambda; for the kernel head also its preprocessing, gamma and Nystroem landmarks).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.validation import ArrayLike, as_float64_matrix, one_hot


@dataclass(frozen=True)
class TrainingTerms:
    """Per test image (m) and training image (n), the three exact views of one class's logit (tensors (m, n)).

    ``removal``: f_-i(x)_c - f_c(x) (refit-exact; no sum identity); ``equivalent_kernel``: s_i(x) (y_ic - ybar_c) with
    s_i(x) = l_i(x) - a_i / S (without an intercept, l_i(x));
    ``representer``: beta_ic k(x, z_i); the last two sum to ``logit`` - ``prior`` (both (m,)).
    """

    removal: torch.Tensor
    equivalent_kernel: torch.Tensor
    representer: torch.Tensor
    logit: torch.Tensor
    prior: torch.Tensor


@dataclass
class Certificate:
    """The training images whose removal changes a prediction, found greedily on exact effects."""

    indices: list[int]  # in removal order; empty when none of up to ``limit`` images changes it
    found: bool
    new_class: int | None  # predicted class after removing ``indices`` (by refit)
    margin: float | None  # its logit minus the original class's, after the refit (> 0: it changed)
    limit: int
    seconds: float
    refit_max_abs_diff: float | None = None  # downdated vs refit logits of x after the removal
    path: list[float] = field(default_factory=list)  # original-class margin after each removal (downdated)


class TrainingSystem(ABC):
    """A fitted closed-form head together with its n training rows: the exact counterfactual algebra.

    A back-end sets ``a`` (n,) the training weights, ``Y`` (n, C) the one-hot targets and ``lam``, and implements
    the abstract primitives; everything else is derived here, once. Every tensor returned is float64 on the CPU.
    """

    a: torch.Tensor
    Y: torch.Tensor
    lam: float

    # -- the back-end's primitives -----------------------------------------------------------------
    @abstractmethod
    def decision(self, G: ArrayLike) -> torch.Tensor:
        """Logits (m, C) of embeddings G (m, D)."""

    @abstractmethod
    def train_decision(self) -> torch.Tensor:
        """F (n, C): the logits of the training rows."""

    @abstractmethod
    def hat_diag(self) -> torch.Tensor:
        """h (n,): the leverage h_ii = l_i(z_i) of each training row (0 for weight 0)."""

    @abstractmethod
    def equivalent_kernel(self, G: ArrayLike, rows: Sequence[int] | None = None) -> torch.Tensor:
        """l(x) (m, k): the weight of each training label (columns ``rows``, default all n) in the logits of G."""

    @abstractmethod
    def hat_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """H[rows, :] (k, n): the equivalent kernel of training rows ``rows``."""

    @abstractmethod
    def hat_columns(self, rows: torch.Tensor) -> torch.Tensor:
        """H[:, rows] (n, k): the weight of the labels ``rows`` in every training row's fit."""

    def hat_block(self, rows: torch.Tensor) -> torch.Tensor:
        """H[rows][:, rows] (k, k) (a back-end may compute it without the other n - k rows)."""
        return self.hat_columns(rows)[rows]

    @abstractmethod
    def similarity(self, G: ArrayLike) -> torch.Tensor:
        """k(x, z_i) (m, n): the head's centred kernel (the linear head's <g_x - mu, g_i - mu>)."""

    @property
    @abstractmethod
    def dual_coef(self) -> torch.Tensor:
        """beta (n, C) = A E / lam: f_c(x) = ybar_c + sum_i beta_ic k(x, z_i)."""

    @abstractmethod
    def refit(self, rows: ArrayLike | None = None, weights: ArrayLike | None = None) -> "TrainingSystem":
        """The system refitted from scratch on training rows ``rows`` (default all) with ``weights`` (one per row;
        default their current ones), every class kept as a column, the head's settings and fitted choices held."""

    @abstractmethod
    def weight_gradient(self, G_val: ArrayLike, dF: torch.Tensor) -> torch.Tensor:
        """dL/da (n,) for a loss whose gradient in the logits of G_val (m, D) is dF (m, C): x~_i^T M~^-1 X~_v^T dF
        r_i, one solve for every training row (implicit differentiation of the quadratic inner problem)."""

    # -- derived, written once -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.a.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.Y.shape[1])

    @property
    def prior(self) -> torch.Tensor:
        """ybar (C,): the a-weighted class means, the logit without evidence (a back-end without an intercept
        overrides it: 0)."""
        return self.a @ self.Y / self.a.sum()

    def intercept_share(self) -> torch.Tensor:
        """a / S (n,): the part of every l(x) that is the unpenalised intercept's (0 for a head without one)."""
        return self.a / self.a.sum()

    def residuals(self) -> torch.Tensor:
        """e = Y - F (n, C), computed once per system (a system never changes)."""
        return self._memo("residuals", lambda: self.Y - self.train_decision())

    def leverage(self) -> torch.Tensor:
        """The hat diagonal h (n,) (:meth:`hat_diag`), computed once per system."""
        return self._memo("leverage", self.hat_diag)

    def loo_logits(self) -> torch.Tensor:
        """Exact leave-one-out logits (n, C): f_-i(z_i) = (f_i - h_ii y_i) / (1 - h_ii)."""
        h = self.leverage().unsqueeze(1)
        return (self.train_decision() - h * self.Y) / (1 - h)

    def loo_residuals(self) -> torch.Tensor:
        """e_i / (1 - h_ii) (n, C): removing row i changes the logits of any x by -l_i(x) times this row; computed once
        per system."""
        return self._memo("loo_residuals", lambda: self.residuals() / (1 - self.leverage()).unsqueeze(1))

    def _memo(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        memo = self.__dict__.setdefault("_memo_", {})
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def removal_effect(self, G: ArrayLike, rows: Sequence[int] | None = None) -> torch.Tensor:
        """f_-i(x) - f(x) (m, k, C) for removing each training row i of ``rows`` (default all n) alone; exact."""
        idx = self._rows(rows)
        return -self.equivalent_kernel(G, idx).unsqueeze(2) * self.loo_residuals()[idx].unsqueeze(0)

    def training_terms(self, G: ArrayLike, classes: ArrayLike | None = None) -> TrainingTerms:
        """The three exact views (:class:`TrainingTerms`) of one class per test image (default: the predicted one)."""
        Gt = as_float64_matrix(G, "G_test")
        F = self.decision(Gt)
        c = F.argmax(1) if classes is None else torch.as_tensor(np.asarray(classes), dtype=torch.long)
        if c.shape != (Gt.shape[0],):
            raise CarrotError(f"classes: expected one class per test image ({Gt.shape[0]}), got shape {tuple(c.shape)}")
        L = self.equivalent_kernel(Gt)
        prior = self.prior
        return TrainingTerms(removal=-L * self.loo_residuals().T[c],
                             equivalent_kernel=(L - self.intercept_share()) * (self.Y - prior).T[c],
                             representer=self.similarity(Gt) * self.dual_coef.T[c],
                             logit=F[torch.arange(len(c)), c], prior=prior[c])

    def decision_reweighted(self, G: ArrayLike, rows: Sequence[int], weights: ArrayLike) -> torch.Tensor:
        """Logits (m, C) of the refit with training rows ``rows`` given new ``weights`` (>= 0; 0 removes), exact
        without a refit: f + l_U(x) diag(rho) (I + H_UU diag(rho))^-1 e_U, rho = (a'_U - a_U) / a_U."""
        U, rho = self._weight_change(rows, weights)
        if not len(U):
            return self.decision(G)
        return self.decision(G) + self._change(self.equivalent_kernel(G, U), U, rho)

    def decision_without(self, G: ArrayLike, rows: Sequence[int]) -> torch.Tensor:
        """Logits (m, C) of the refit without training rows ``rows`` (exact, no refit)."""
        return self.decision_reweighted(G, rows, np.zeros(len(np.asarray(rows).reshape(-1))))

    def decision_only(self, G: ArrayLike, rows: Sequence[int]) -> torch.Tensor:
        """Logits (m, C) of the refit on training rows ``rows`` only (rows of weight 0 stay out)."""
        keep = np.unique(np.asarray(rows, dtype=np.int64))
        keep = keep[self.a[torch.as_tensor(keep)].numpy() > 0] if len(keep) else keep
        if not len(keep):
            raise CarrotError(f"rows: expected training images with weight > 0 to refit on, got {list(rows)!r}")
        return self.refit(keep).decision(G)

    def counterfactuals(self, G: ArrayLike) -> "Counterfactuals":
        """Inputs G prepared for many exact counterfactuals: their logits, and the equivalent kernel's columns of
        each changed set (by default all n columns are computed once; a back-end for which a few columns are cheap
        computes them per change instead)."""
        L = self.equivalent_kernel(G)
        return Counterfactuals(self, self.decision(G), lambda U: L[:, U])

    def loo_loss_change(self, G_eval: ArrayLike, y_eval_idx: np.ndarray, chunk: int = 256,
                        inputs: "Counterfactuals | None" = None) -> torch.Tensor:
        """Exact change of the summed squared loss on (G_eval, y_eval) when training row i is removed, (n,).

        With f_-i(x) - f(x) = -l_i(x) r_i (r = :meth:`loo_residuals`): the sum over x of -2 l_i(x) (E_x . r_i) +
        l_i(x)^2 |r_i|^2, E = F - Y. Negative: removing i helps (a harmful image). Streamed over ``chunk`` rows;
        ``inputs``: G_eval already prepared (:meth:`counterfactuals`), whose logits and kernel columns are used instead.
        """
        Ge = as_float64_matrix(G_eval, "G_eval")
        Y = one_hot(np.asarray(y_eval_idx), self.n_classes)
        if inputs is not None and (inputs.system is not self or inputs.logits.shape[0] != Ge.shape[0]):
            raise CarrotError(f"inputs: expected these {Ge.shape[0]} inputs prepared by this system's counterfactuals()")
        loo_res = self.loo_residuals()
        r2 = (loo_res * loo_res).sum(1)
        total = torch.zeros(self.n, dtype=torch.float64)
        L_all = None if inputs is None else inputs.columns(torch.arange(self.n))  # (m, n), held by the caller anyway
        for s in range(0, Ge.shape[0], chunk):
            if L_all is None:
                L, F = self.equivalent_kernel(Ge[s : s + chunk]), self.decision(Ge[s : s + chunk])
            else:
                L, F = L_all[s : s + chunk], inputs.logits[s : s + chunk]
            E = F - Y[s : s + chunk]
            total += (-2 * L * (E @ loo_res.T) + L * L * r2).sum(0)
        return total

    def loo_cross_entropy(self, loo: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """The label-review score: exact LOO cross-entropy of every training label under a softmax of the LOO logits
        at the temperature T that minimises its mean on the training labels themselves (no held-out labels; high:
        the rest of the data disagrees with this label).

        Parameters
        ----------
        loo : (n, C) :meth:`loo_logits`, when the caller already has them.

        Returns
        -------
        (scores (n,) = -log softmax(f_-i(z_i) / T)_{y_i}, T).
        """
        loo = self.loo_logits() if loo is None else loo
        return calibrated_cross_entropy(loo, self.Y.argmax(1), self.a > 0)

    def certificate(self, g_x: ArrayLike, limit: int = 50) -> Certificate:
        """The fewest training images found whose removal changes the predicted class of one image (D,).

        Greedy on exact effects: each step removes the image with the largest exact drop of the margin f_c - f_k
        (c the original class, k the current runner-up) in the fit without the images S already removed, through
        the downdated smoother l_S'(x) = l(x) + l_S(x) (I - H_SS)^-1 H_S,: and h'_ii = h_ii + H_iS (I - H_SS)^-1 H_Si;
        the set is checked by one refit. ``limit``: the most images removed before answering "none changes it".
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise CarrotError(f"limit: expected a positive integer, got {limit!r}")
        t0 = time.perf_counter()
        x = as_float64_matrix(np.asarray(g_x).reshape(1, -1), "g_x")
        l_x, f0 = self.equivalent_kernel(x)[0], self.decision(x)[0]
        c = int(f0.argmax())
        F, h, a = self.train_decision(), self.leverage(), self.a
        E = self.Y - F
        active = a > 0
        limit = min(limit, int(active.sum()) - 1)
        S: list[int] = []
        rows = torch.empty(0, self.n, dtype=torch.float64)  # H[S, :]
        cols = torch.empty(self.n, 0, dtype=torch.float64)  # H[:, S]
        path: list[float] = []
        f, B, idx = f0, None, torch.as_tensor(S, dtype=torch.long)  # B: LU factors of I - H_SS, set at each step's end
        for _ in range(limit):
            if S:  # the smoother and residuals of the fit without S, by LU solves with the last step's factors
                lx = l_x + _right_solve(B, l_x[idx].unsqueeze(0))[0] @ rows
                hS = h + (_right_solve(B, cols) * rows.T).sum(1)
                ES = self.Y - (F - cols @ torch.linalg.lu_solve(*B, E[idx]))
            else:
                lx, hS, ES = l_x, h, E
            k = runner_up(f, c)
            denom = 1 - hS
            i = next_removal(lx * (ES[:, c] - ES[:, k]) / denom.clamp_min(1e-12), denom, active, S)
            if i is None:
                break
            S.append(i)
            ii = torch.as_tensor([i])
            rows, cols = torch.cat([rows, self.hat_rows(ii)]), torch.cat([cols, self.hat_columns(ii)], 1)
            idx = torch.as_tensor(S)
            B = torch.linalg.lu_factor(torch.eye(len(S), dtype=torch.float64) - rows[:, idx])
            f = f0 - (_right_solve(B, l_x[idx].unsqueeze(0))[0] @ E[idx])
            path.append(class_margin(f, c))
            if int(f.argmax()) != c:
                break
        keep = np.setdiff1d(np.arange(self.n), S)
        return verified(S, path, c, f, lambda: self.refit(keep).decision(x)[0], limit, t0)

    # -- helpers ---------------------------------------------------------------------------------------
    def _rows(self, rows: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.n)
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64).reshape(-1))
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise CarrotError(f"rows: expected training indices in 0..{self.n - 1}, got {idx.tolist()[:5]}")
        return idx

    def _weight_change(self, rows: Sequence[int], weights: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, rho): the rows whose weight changes and (a'_U - a_U) / a_U, checked."""
        U = self._rows(rows)
        if len(torch.unique(U)) != len(U):
            raise CarrotError("rows: expected distinct training rows")
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64).reshape(-1))
        if w.shape != U.shape or not torch.isfinite(w).all() or (w < 0).any():
            raise CarrotError(f"weights: expected {len(U)} finite weights >= 0, one per row, got {tuple(w.shape)}")
        a = self.a[U]
        if ((a == 0) & (w > 0)).any():
            raise CarrotError(f"rows: training image {int(U[(a == 0) & (w > 0)][0])} has weight 0 in this fit; "
                              "giving it a weight needs a refit (refit(weights=...))")
        moved = (a > 0) & (w != a)
        if float(self.a.sum() - a[moved].sum() + w[moved].sum()) <= float(self.a.sum()) * 1e-12:
            raise CarrotError(f"rows: this change of {int(moved.sum())} training images leaves none with weight > 0 to fit")
        return U[moved], (w[moved] - a[moved]) / a[moved]

    def _change(self, L_U: torch.Tensor, U: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """l_U(x) diag(rho) (I + H_UU diag(rho))^-1 e_U (m, C) from the inputs' equivalent kernel columns L_U (m, k)."""
        H_UU = self.hat_block(U)
        e = self.residuals()[U]
        try:
            return (L_U * rho) @ torch.linalg.solve(torch.eye(len(U), dtype=torch.float64) + H_UU * rho, e)
        except torch.linalg.LinAlgError:
            raise CarrotError(f"rows: the fit under this change of {len(U)} training images is undetermined "
                              "(I + H_UU diag(rho) is singular)") from None


@dataclass
class Counterfactuals:
    """A fixed set of m inputs prepared for many exact counterfactuals of one system: their logits (m, C), computed
    once, and ``columns(U)``, their equivalent kernel's columns U (m, k); each change of weights then costs the columns
    and a k x k solve."""

    system: TrainingSystem
    logits: torch.Tensor
    columns: Callable[[torch.Tensor], torch.Tensor]

    def reweighted(self, rows: Sequence[int], weights: ArrayLike) -> torch.Tensor:
        """Logits (m, C) with training rows ``rows`` given new ``weights`` (0 removes), exact."""
        U, rho = self.system._weight_change(rows, weights)
        return self.logits if not len(U) else self.logits + self.system._change(self.columns(U), U, rho)

    def without(self, rows: Sequence[int]) -> torch.Tensor:
        """Logits (m, C) without training rows ``rows``, exact."""
        return self.reweighted(rows, np.zeros(len(np.asarray(rows).reshape(-1))))


def _right_solve(B: tuple[torch.Tensor, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """X B^-1 (k, s) for X (k, s) and B's LU factors (torch.linalg.lu_factor): (B^-T X^T)^T."""
    return torch.linalg.lu_solve(*B, X.T, adjoint=True).T


def runner_up(f: torch.Tensor, c: int) -> int:
    """The best class other than c of logits f (C,)."""
    other = f.clone()
    other[c] = -torch.inf
    return int(other.argmax())


def class_margin(f: torch.Tensor, c: int) -> float:
    """f_c minus the best other logit: < 0 once the prediction has left class c."""
    return float(f[c] - f[runner_up(f, c)])


def next_removal(drop: torch.Tensor, denom: torch.Tensor, active: torch.Tensor, chosen: Sequence[int]) -> int | None:
    """The certificate's greedy step: the image whose removal lowers f_c - f_k most (``drop`` (n,), exact), or None.
    Images outside the model, already chosen, or whose removal leaves the fit undetermined (1 - h <= 0) are
    never picked."""
    drop = drop.clone()
    drop[~active | (denom <= 1e-12)] = -torch.inf
    if chosen:
        drop[torch.as_tensor(list(chosen))] = -torch.inf
    i = int(drop.argmax())
    return i if torch.isfinite(drop[i]) else None


def verified(S: list[int], path: list[float], c: int, f: torch.Tensor, refit: Callable[[], torch.Tensor], limit: int,
             t0: float) -> Certificate:
    """The certificate of a greedy removal set S whose downdated logits f (C,) left class c, checked by one refit
    without S (``refit()``: its logits (C,)); kept only if the refit agrees that the class changes."""
    changed = bool(S) and path[-1] < 0
    new_class = margin = err = None
    if changed:
        fr = refit()
        new_class = int(fr.argmax())
        margin = float(fr[new_class] - fr[c])
        err = float((fr - f).abs().max())
        changed = new_class != c
    return Certificate(S if changed else [], changed, new_class if changed else None, margin if changed else None,
                       limit, time.perf_counter() - t0, err, path)


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
