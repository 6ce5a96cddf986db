"""Exact what-if of a training-set edit: remove, relabel and reweight training images at once, without a refit.

Both heads are linear smoothers of their labels, f(x) = l(x)^T Y (:mod:`carrot.ridge.system`), with l independent of Y.
An edit gives rows V new labels Y'_V and new weights a'_V (0 removes). In two exact steps:

* relabel: Y' = Y + Delta (Delta = Y'_V - Y_V on the rows V), so f1(x) = f(x) + l_V(x) Delta and the training
  residuals become e1 = Y' - F - H_:V Delta;
* reweight the rows U of V whose weight changes, rho = (a'_U - a_U) / a_U (Sherman-Morrison-Woodbury on M~, as
  :meth:`TrainingSystem.decision_reweighted`, which holds for any fixed Y):
      f'(x) = f1(x) + l_U(x) diag(rho) K^-1 e1_U,      K = I + H_UU diag(rho),
  and the new leverages, from the same downdate of M~^-1 (H_Uj = H_jU a_j / a_U, as l_i(x) = a_i x~^T M~^-1 z~_i):
      h'_jj = (a'_j / a_j) (h_jj - H_jU diag(rho) K^-1 H_Uj).

So an edit of k images costs the k hat columns H_:V (cached per image by :class:`WhatIf`), the inputs' k equivalent kernel
columns and a k x k solve; the new leave-one-out logits (f'_j - h'_jj y'_j) / (1 - h'_jj) and the label review follow.
"Exact" means equal to a refit on the edited data with the head's settings and fitted choices held (lambda; the kernel
head's preprocessing, gamma and Nystroem landmarks), every class kept as a column.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.ridge.system import TrainingSystem, calibrated_cross_entropy
from carrot.validation import ArrayLike, as_float64_matrix

ACTIONS = ("remove", "relabel", "weight")


@dataclass(frozen=True)
class Edits:
    """An edit of k distinct training rows: ``rows`` (k,), their new ``weights`` (k,) (0 removes), new ``labels``
    (k,) as the system's class columns, and the ``actions`` asked for. Built checked by :meth:`of`."""

    rows: np.ndarray
    weights: np.ndarray
    labels: np.ndarray
    actions: tuple[str, ...]  # what was asked for, per row (remove, relabel, weight), for the record

    def __post_init__(self) -> None:
        k = len(self.rows)
        if self.weights.shape != (k,) or self.labels.shape != (k,) or len(self.actions) != k:
            raise CarrotError(f"edits: expected one weight, label (and action) per row ({k}), got {self.weights.shape}, "
                              f"{self.labels.shape}")
        if len(np.unique(self.rows)) != k:
            raise CarrotError("edits: a training image is edited twice")

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def of(cls, system: TrainingSystem, actions: Sequence[Mapping[str, Any]]) -> "Edits":
        """The edit of ``actions``, one per training image: ``{"index": i, "action": "remove"}``,
        ``{"index": i, "action": "relabel", "to": c}`` (c a class column) or ``{"index": i, "action": "weight",
        "weight": w}`` (w >= 0, relative to nothing: the image's new weight). Refused by name when malformed."""
        if not isinstance(actions, (list, tuple)):
            raise CarrotError(f"edits: expected a list of edits, got {type(actions).__name__}")
        a, y = system.a.numpy(), system.Y.argmax(1).numpy()
        rows, weights, labels = [], [], []
        for k, act in enumerate(actions):
            if not isinstance(act, Mapping):
                raise CarrotError(f"edits[{k}]: expected an object with 'index' and 'action', got {act!r}")
            i, what = act.get("index"), act.get("action")
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < system.n:
                raise CarrotError(f"edits[{k}].index: expected a training image index in 0..{system.n - 1}, got {i!r}")
            if i in rows:
                raise CarrotError(f"edits[{k}].index: training image {i} is edited twice")
            if what not in ACTIONS:
                raise CarrotError(f"edits[{k}].action: expected one of {', '.join(ACTIONS)}, got {what!r}")
            w, c = float(a[i]), int(y[i])
            if what == "remove":
                w = 0.0
            elif what == "relabel":
                c = act.get("to")
                if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < system.n_classes:
                    raise CarrotError(f"edits[{k}].to: expected a class column in 0..{system.n_classes - 1}, got {c!r}")
            else:
                w = _weight(act.get("weight"), k)
                if a[i] == 0 and w > 0:
                    raise CarrotError(f"edits[{k}].weight: training image {i} has weight 0 in this fit; giving it a "
                                      "weight needs a refit")
            rows.append(i)
            weights.append(float(w))
            labels.append(int(c))
        edits = cls(np.asarray(rows, dtype=np.int64), np.asarray(weights, dtype=np.float64),
                    np.asarray(labels, dtype=np.int64), tuple(act["action"] for act in actions))
        left = np.bincount(edits.applied(system)[1], minlength=system.n_classes)
        if (left == 0).any() and (np.bincount(y, minlength=system.n_classes) > 0).all():
            raise CarrotError(f"edits: class column {int(np.flatnonzero(left == 0)[0])} would have no training image left "
                              "after relabelling; a model keeps every class (remove its images instead: weight 0)")
        return edits

    def applied(self, system: TrainingSystem) -> tuple[np.ndarray, np.ndarray]:
        """The edited training weights (n,) and labels (n,) (class columns) of ``system``: what a refit is given."""
        a, y = system.a.numpy().copy(), system.Y.argmax(1).numpy().copy()
        a[self.rows], y[self.rows] = self.weights, self.labels
        return a, y


def _weight(w: Any, k: int) -> float:
    """A new weight from a request, checked: a finite number >= 0."""
    try:
        ok = not isinstance(w, bool) and isinstance(w, (int, float)) and np.isfinite(float(w)) and float(w) >= 0
    except OverflowError:
        ok = False
    if not ok:
        raise CarrotError(f"edits[{k}].weight: expected a finite number >= 0, got {str(w)[:40]!r}")
    return float(w)


@dataclass
class EditResult:
    """The system after an edit, exactly: the inputs' ``logits`` (m, C), the training rows' ``train_logits`` (n, C),
    ``leverage`` h' (n,), targets ``Y`` (n, C) and weights ``a`` (n,)."""

    logits: torch.Tensor
    train_logits: torch.Tensor
    leverage: torch.Tensor
    Y: torch.Tensor
    a: torch.Tensor

    def loo_logits(self) -> torch.Tensor:
        """Exact leave-one-out logits (n, C) of the edited system: (f'_j - h'_jj y'_j) / (1 - h'_jj)."""
        h = self.leverage.unsqueeze(1)
        return (self.train_logits - h * self.Y) / (1 - h)

    def label_review(self, loo: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """The edited system's label-review scores (n,) and temperature (:meth:`TrainingSystem.loo_cross_entropy`);
        ``loo``: :meth:`loo_logits`, when the caller already has them."""
        return calibrated_cross_entropy(self.loo_logits() if loo is None else loo, self.Y.argmax(1), self.a > 0)


class WhatIf:
    """A system and m inputs G (m, D) prepared for many exact edits (:class:`Edits`): the inputs' and training rows'
    logits once (the inputs through :meth:`TrainingSystem.counterfactuals`, so a back-end whose columns are costly
    computes them all once), and each training image's hat column H_:j (n,) and the inputs' equivalent kernel column
    l_j(G) (m,) the first time an edit touches it, then kept (a basket grows one image at a time). Thread-safe."""

    def __init__(self, system: TrainingSystem, G: ArrayLike) -> None:
        self.system = system
        self.G = as_float64_matrix(G, "G")
        self.inputs = system.counterfactuals(self.G)  # the back-end's way to the inputs' kernel columns
        self.logits = self.inputs.logits
        self.train_logits = system.train_decision()
        self._hat: dict[int, torch.Tensor] = {}
        self._kernel: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def columns(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(H[:, rows] (n, k), l_rows(G) (m, k)), each image's column computed once."""
        with self._lock:
            new = [int(j) for j in dict.fromkeys(rows.tolist()) if int(j) not in self._hat]
            if new:
                idx = torch.as_tensor(new, dtype=torch.long)
                H, L = self.system.hat_columns(idx), self.inputs.columns(idx)
                for k, j in enumerate(new):
                    self._hat[j], self._kernel[j] = H[:, k].clone(), L[:, k].clone()
            n, m = self.system.n, self.G.shape[0]
            if not len(rows):
                return torch.zeros(n, 0, dtype=torch.float64), torch.zeros(m, 0, dtype=torch.float64)
            return (torch.stack([self._hat[int(j)] for j in rows], 1),
                    torch.stack([self._kernel[int(j)] for j in rows], 1))

    def __call__(self, edits: Edits) -> EditResult:
        """The edited system's logits, training logits and leverages (:class:`EditResult`), exact."""
        s = self.system
        a, Y, h = s.a, s.Y, s.leverage()
        V = torch.as_tensor(edits.rows, dtype=torch.long)
        HV, LV = self.columns(edits.rows)
        Yn = Y.clone()
        Yn[V] = torch.nn.functional.one_hot(torch.as_tensor(edits.labels), s.n_classes).to(torch.float64)
        delta = Yn[V] - Y[V]
        logits, F = self.logits + LV @ delta, self.train_logits + HV @ delta
        w = torch.as_tensor(edits.weights, dtype=torch.float64)
        aV = a[V]
        if ((aV == 0) & (w > 0)).any():
            raise CarrotError(f"edits: training image {int(V[(aV == 0) & (w > 0)][0])} has weight 0 in this fit; giving "
                              "it a weight needs a refit")
        moved = (aV > 0) & (w != aV)
        a_new = a.clone()
        a_new[V] = torch.where(aV > 0, w, aV)
        if float(a_new.sum()) <= float(a.sum()) * 1e-12:
            raise CarrotError(f"edits: this edit of {len(edits)} training images leaves none with weight > 0 to fit")
        if not moved.any():
            return EditResult(logits, F, h.clone(), Yn, a_new)
        U, HU, LU = V[moved], HV[:, moved], LV[:, moved]
        rho = (w[moved] - aV[moved]) / aV[moved]
        K = torch.eye(len(U), dtype=torch.float64) + HU[U] * rho
        E1 = Yn[U] - F[U]
        rows_U = (HU / aV[moved]).T * a  # H[U, :] = H[:, U]^T a_j / a_U
        try:
            if float(torch.linalg.cond(K)) > 1e13:
                raise torch.linalg.LinAlgError
            S, Q = torch.linalg.solve(K, torch.cat([E1, rows_U], 1)).split([s.n_classes, s.n], 1)
        except torch.linalg.LinAlgError:
            raise CarrotError(f"edits: the fit under this edit of {len(U)} training images is undetermined "
                              "(I + H_UU diag(rho) is singular to working precision)") from None
        HUr = HU * rho
        logits, F = logits + (LU * rho) @ S, F + HUr @ S
        h_new = torch.where(a > 0, (h - (HUr * Q.T).sum(1)) * a_new / a.where(a > 0, torch.ones_like(a)),
                            torch.zeros_like(h))
        return EditResult(logits, F, h_new, Yn, a_new)
