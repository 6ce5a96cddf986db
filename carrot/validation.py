"""Input validation at the boundary: arrays, weights, labels. Imports nothing from carrot but errors."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from carrot.errors import CarrotError

ArrayLike = Any


def as_float64_matrix(G: ArrayLike, name: str = "G") -> torch.Tensor:
    """(n, D) finite float64 CPU tensor from a numpy array or tensor, with a named error."""
    t = torch.as_tensor(np.asarray(G) if not torch.is_tensor(G) else G).detach().cpu().to(torch.float64)
    if t.dim() != 2:
        raise CarrotError(f"{name}: expected a 2-D array (n_samples, n_features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise CarrotError(f"{name}: expected at least one sample, got 0 rows")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(1).sum())
        raise CarrotError(f"{name}: features must be finite, found NaN/Inf in {bad} row(s)")
    return t


def float64_rows(G: ArrayLike, sl: slice, name: str = "G") -> torch.Tensor:
    """Rows ``sl`` of G (tensor, array or memmap) as a finite float64 CPU tensor, with a named error."""
    block = G[sl]
    block = block.detach().cpu().to(torch.float64) if torch.is_tensor(block) else torch.from_numpy(np.array(block, dtype=np.float64))
    if not torch.isfinite(block).all():
        bad = int((~torch.isfinite(block)).any(1).sum())
        raise CarrotError(f"{name}: features must be finite, found NaN/Inf in {bad} row(s)")
    return block


def as_weights(sample_weight: ArrayLike | None, n: int) -> torch.Tensor:
    """(n,) float64 weights, ones when None; finite, >= 0, positive sum, or a named error."""
    if sample_weight is None:
        return torch.ones(n, dtype=torch.float64)
    a = torch.as_tensor(np.asarray(sample_weight.detach().cpu() if torch.is_tensor(sample_weight) else sample_weight,
                                   dtype=np.float64))
    if a.shape != (n,) or not torch.isfinite(a).all() or (a < 0).any() or a.sum() <= 0:
        raise CarrotError(f"sample_weight: expected {n} finite weights >= 0 with a positive sum, got shape {tuple(a.shape)}")
    return a


def one_hot(y_idx: ArrayLike, c: int) -> torch.Tensor:
    """(n, C) float64 one-hot targets from class indices (n,) in [0, C)."""
    y_idx = torch.as_tensor(np.asarray(y_idx), dtype=torch.long)
    Y = torch.zeros(len(y_idx), c, dtype=torch.float64)
    Y[torch.arange(len(y_idx)), y_idx] = 1.0
    return Y


def encode_labels(y: ArrayLike, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, class indices) of labels y, which must have shape (n,): the classes a fit defines."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise CarrotError(f"y: expected shape ({n},) to match G, got {y.shape}")
    return np.unique(y, return_inverse=True)


def index_labels(classes: ArrayLike, y: ArrayLike, name: str = "y") -> np.ndarray:
    """Positions (n,) of labels y (n,) in ``classes`` (C,), the one label -> index map.

    Refuses, naming them, labels that are not among ``classes`` (a class the head never saw would
    otherwise map silently onto a neighbour). ``classes`` need not be sorted.

    Parameters
    ----------
    classes : array (C,) of distinct labels, e.g. a fitted head's ``classes_``.
    y : array (n,) of labels.
    name : the parameter named in the error.

    Returns
    -------
    idx : int64 array (n,) with ``classes[idx] == y``.
    """
    classes, y = np.asarray(classes), np.asarray(y)
    if y.ndim != 1:
        raise CarrotError(f"{name}: expected a 1-D array of labels, got shape {y.shape}")
    if classes.ndim != 1 or len(classes) == 0:
        raise CarrotError(f"classes: expected a non-empty 1-D array of labels, got shape {classes.shape}")
    order = np.argsort(classes, kind="stable")
    ordered = classes[order]
    try:
        pos = np.searchsorted(ordered, y)
    except TypeError:  # labels of a type that does not compare with the classes' (e.g. str vs int)
        pos = np.full(len(y), len(classes))
    known = pos < len(classes)
    known[known] = ordered[pos[known]] == y[known]
    if not known.all():
        unknown = list(dict.fromkeys(y[~known].tolist()))
        shown = ", ".join(repr(u) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise CarrotError(f"{name}: {int((~known).sum())} label(s) not among the {len(classes)} known classes: {shown}")
    return order[pos].astype(np.int64)
