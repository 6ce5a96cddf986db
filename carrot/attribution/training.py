"""Three exact views of a logit through the training images, and the counterfactual certificate.

For the ridge head f_c(x) = ybar_c + (g_x - mu)^T W_c, W = (Gc^T A Gc + lam I)^-1 Gc^T A Yc:

* representer:        f_c(x) = ybar_c + sum_i beta_ic <g_i - mu, g_x - mu>,   beta = A (Y - F) / lam
* equivalent kernel:  f_c(x) = ybar_c + sum_i s_i(x) (y_ic - ybar_c),          s_i(x) = a_i gc_i^T M^-1 (g_x - mu)
  (the hat-matrix row of x: the weight the fit gives to each training label, Hastie et al. 2009, 5.4.1)
* removal (exact LOO): f_-i(x)_c - f_c(x) = -(x~^T M~^-1 x~_i) a_i r_ic / (1 - h_ii)   (Sherman-Morrison)

The first two sum to the logit exactly; the third is what removing image i would change, checked
against refits. The certificate is the smallest set found (greedily, on exact effects, each step an exact
Woodbury downdate) whose removal changes the predicted class, verified by one refit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from carrot.attribution.representer import centred_parts
from carrot.errors import CarrotError
from carrot.ridge.removal import RidgeSystem
from carrot.validation import ArrayLike, as_float64_matrix

VIEWS = ("removal", "equivalent_kernel", "representer")
VIEW_MEANING = {
    "removal": "exact change of this logit if the image were removed from training (refit-exact, no sum identity)",
    "equivalent_kernel": "weight of the image's label in this prediction (hat-matrix term); the terms sum to logit - prior",
    "representer": "beta * kernel similarity (representer form); the terms sum to logit - prior, large ones cancel",
}


def training_terms(system: RidgeSystem, G_test: ArrayLike, classes: ArrayLike | None = None) -> dict[str, torch.Tensor]:
    """Per test image and training image, the three exact terms for one class of each test image.

    Parameters
    ----------
    system : the head's :class:`RidgeSystem` (``RidgeSystem.from_head``: its factor, no refit).
    G_test : (m, D) test embeddings.
    classes : (m,) class index per test image (default: the predicted class).

    Returns
    -------
    dict of tensors (m, n): ``removal`` (f_-i(x)_c - f(x)_c), ``equivalent_kernel`` (s_i(x) (y_ic - ybar_c)),
    ``representer`` (beta_ic k(i, x)); plus ``logit`` (m,) and ``prior`` (m,) of the class.
    """
    Gt = as_float64_matrix(G_test, "G_test")
    F = system.decision(Gt)
    c = F.argmax(1) if classes is None else torch.as_tensor(np.asarray(classes), dtype=torch.long)
    if c.shape != (Gt.shape[0],):
        raise CarrotError(f"classes: expected one class per test image ({Gt.shape[0]}), got shape {tuple(c.shape)}")
    rows = torch.arange(Gt.shape[0])
    theta = system.theta
    fi = int(system.fit_intercept)
    ybar = theta[0] if fi else torch.zeros(theta.shape[1], dtype=torch.float64)
    Gc = system.G - system.mu  # (n, D)
    V = system.factor.solve((Gt - system.mu).T)  # M^-1 (g_x - mu), (D, m)
    S = system.a.unsqueeze(1) * (Gc @ V)  # s_i(x), (n, m)
    ek = S.T * (system.Y - ybar).T[c]  # (m, n)
    R = system.Y - system.augment(system.G) @ theta  # residuals (n, C)
    beta = system.a.unsqueeze(1) * R / system.lam
    rep = ((Gt - system.mu) @ Gc.T) * beta.T[c]
    Z, Rm = system.removal_terms()  # Z = M~^-1 x~_i (p, n), Rm = a_i r_i / (1 - h_ii) (n, C)
    removal = -(system.augment(Gt) @ Z) * Rm.T[c]
    return {"removal": removal, "equivalent_kernel": ek, "representer": rep,
            "logit": F[rows, c], "prior": ybar[c]}


@dataclass
class Certificate:
    """The training images whose removal changes a prediction, found greedily on exact effects."""

    indices: list[int]  # in removal order; empty when none of up to ``limit`` images changes it
    found: bool
    new_class: int | None  # predicted class after removing ``indices`` (by refit)
    margin: float | None  # its logit minus the original class's, after the refit (> 0: it changed)
    limit: int
    seconds: float
    refit_max_abs_diff: float | None = None  # Woodbury vs refit logits of x after the removal
    path: list[float] = field(default_factory=list)  # original-class margin after each removal (Woodbury)


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


def certificate(system: RidgeSystem, g_x: ArrayLike, limit: int = 50) -> Certificate:
    """Smallest set (greedy) of training images whose removal changes the predicted class of one image.

    Each step removes the image with the largest exact drop of the margin f_c - f_k (c the original class,
    k the current runner-up) given the images already removed: the drop is the exact leave-one-out effect in
    the downdated system, M_S^-1 = M^-1 + M^-1 X_S^T (A_S^-1 - X_S M^-1 X_S^T)^-1 X_S M^-1 (Woodbury). The
    set is checked by one refit.

    Parameters
    ----------
    system : the head's RidgeSystem.
    g_x : (D,) embedding of the image.
    limit : the most images removed before answering "no set of up to ``limit`` changes it".

    Returns
    -------
    Certificate.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise CarrotError(f"limit: expected a positive integer, got {limit!r}")
    t0 = time.perf_counter()
    x = system.augment(as_float64_matrix(np.asarray(g_x).reshape(1, -1), "g_x"))[0]  # (p,)
    X = system.augment(system.G)  # (n, p)
    a, Y, theta = system.a, system.Y, system.theta
    f0 = x @ theta
    c = int(f0.argmax())
    Z = system.solved_rows  # M^-1 x_i, (p, n), shared by every certificate of this system
    qx0 = x @ Z  # x^T M^-1 x_i, (n,)
    h0 = (X * Z.T).sum(1)  # x_i^T M^-1 x_i (unweighted), (n,)
    active = a > 0
    S: list[int] = []
    path: list[float] = []
    limit = min(limit, int(active.sum()) - 1)
    th = theta
    for _ in range(limit):
        f = x @ th
        k = runner_up(f, c)
        if S:
            idx = torch.as_tensor(S)
            Bs = X[idx] @ Z  # X_S M^-1 X^T, (s, n)
            Cap = torch.diag(1.0 / a[idx]) - Bs[:, idx]  # A_S^-1 - X_S M^-1 X_S^T
            Ci = torch.linalg.solve(Cap, torch.eye(len(S), dtype=torch.float64))
            qx = qx0 + (x @ Z[:, idx]) @ Ci @ Bs
            h = h0 + (Bs * (Ci @ Bs)).sum(0)
        else:
            qx, h = qx0, h0
        r = Y[:, [c, k]] - X @ th[:, [c, k]]  # residuals under the current fit, (n, 2)
        denom = 1 - a * h
        i = next_removal(qx * a * (r[:, 0] - r[:, 1]) / denom.clamp_min(1e-12), denom, active, S)  # exact drops of f_c - f_k
        if i is None:
            break
        S.append(i)
        th = system.updated_theta(S)
        f = x @ th
        path.append(class_margin(f, c))
        if int(f.argmax()) != c:
            break
    return verified(S, path, c, x @ th, lambda: system.refit(np.setdiff1d(np.arange(len(a)), S)).decision(
        system.G.new_tensor(np.asarray(g_x, dtype=np.float64)).reshape(1, -1))[0], limit, t0)


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


def removal_pairs(system: RidgeSystem, H_x: torch.Tensor, w_x: torch.Tensor, H_i: torch.Tensor, w_i: torch.Tensor,
                  i: int, c: int, globals_x: torch.Tensor | None = None,
                  globals_i: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Split training image i's support f_c(x) - f_-i(x)_c over (test region j, training region k).

    With x~^T M~^-1 x~_i = [1 / S] + (g_x - mu)^T M^-1 (g_i - mu), g - mu = sum_j (w_j h_j - mu / N) and
    R_ic = a_i r_ic / (1 - h_ii), the support is R_ic / S + sum_jk R_ic u_j^T M^-1 v_k.

    Parameters
    ----------
    system : the head's RidgeSystem; H_x (N, D), w_x (N,) : the test image's tokens and readout weights;
    H_i (N', D), w_i (N',) : training image i's; i : its row; c : the class; globals_x, globals_i : the two
    images' global tokens when the embedding reads them (one more row and column, last: the global part).

    Returns
    -------
    (pairs (N, N'), intercept part): pairs.sum() + intercept part = the support of image i for class c.
    """
    U = centred_parts(H_x, w_x, system.mu, globals_x)  # (N, D)
    V = centred_parts(H_i, w_i, system.mu, globals_i)  # (N', D)
    _, R = system.removal_terms([i])
    Ric = float(R[0, c])
    pairs = Ric * (U @ system.factor.solve(V.T))
    return pairs, (Ric / system.S if system.fit_intercept else 0.0)
