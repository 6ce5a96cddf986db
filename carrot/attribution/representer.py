"""Exact attribution of logits to training images and, for the linear head, to image regions.

Data:    f_c(x) = prior_c + sum_i beta_ic k(i, x)  (any head's training system; the linear head's
         k(i, x) = <g_i - mu, g_x - mu>)
Regions: with g_x = H^T w (w = exp(-tL) 1 / N),
         f_c(x) = prior_c + sum_j r_jc,  r_jc = W_c . (w_j h_j - mu / N)
         and with the global tokens c read too, g_x = [H^T w ; c]: one more exact term W_c^glob . (c - mu^glob)
Both identities hold to floating-point precision; tests check them against the prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from carrot.errors import CarrotError, check_is_fitted
from carrot.ridge.head import RidgeHead
from carrot.ridge.system import TrainingSystem
from carrot.validation import ArrayLike, as_float64_matrix


def centred_kernel(head: RidgeHead, G_train: torch.Tensor, G_test: torch.Tensor) -> torch.Tensor:
    """The head's centred linear kernel k(i, x) = <g_i - mu, g_x - mu>.

    Parameters
    ----------
    head : fitted RidgeHead (mu = ``feature_mean_``).
    G_train : (n, D) its training embeddings; G_test : (m, D).

    Returns
    -------
    tensor (m, n) float64.
    """
    check_is_fitted(head)
    Gtr = as_float64_matrix(G_train, "G_train") - head.feature_mean_
    Gte = as_float64_matrix(G_test, "G_test") - head.feature_mean_
    if Gtr.shape[0] != head.dual_coef_.shape[0]:
        raise CarrotError(f"G_train: expected the {head.dual_coef_.shape[0]} training rows of the fit, got {Gtr.shape[0]}")
    return Gte @ Gtr.T


def representer_contributions(head: RidgeHead, G_train, G_test) -> torch.Tensor:
    """Exact representer split of every logit over the training images.

    Parameters
    ----------
    head : fitted RidgeHead; G_train : (n, D) its training embeddings; G_test : (m, D).

    Returns
    -------
    tensor (m, n, C): beta_ic k(i, x); summed over n plus ``head.prior_`` it is ``decision_function(G_test)``.
    """
    K = centred_kernel(head, G_train, G_test)
    return K.unsqueeze(-1) * head.dual_coef_.unsqueeze(0)


@dataclass
class TopK:
    """Top-k supporting (largest positive) and inhibiting (most negative) training indices."""

    support_idx: np.ndarray
    support_val: np.ndarray
    inhibit_idx: np.ndarray
    inhibit_val: np.ndarray


def top_k(contrib: torch.Tensor, k: int) -> TopK:
    """Top-k of a contribution vector (n,) for one test image and class."""
    n = contrib.shape[0]
    if not isinstance(k, int) or k < 1 or k > n:
        raise CarrotError(f"top_k: expected 1 <= k <= {n} (training set size), got {k!r}")
    pos = torch.topk(contrib, k)
    neg = torch.topk(-contrib, k)
    return TopK(pos.indices.numpy(), pos.values.numpy(), neg.indices.numpy(), -neg.values.numpy())


def centred_parts(H: torch.Tensor, w: torch.Tensor, mu: torch.Tensor, globals: torch.Tensor | None = None) -> torch.Tensor:
    """Rows that sum exactly to g - mu: one per region, [w_j h_j - mu_p / N, 0], and with the global tokens c one
    more, [0, c - mu_glob] (mu split as g is: mu_p over the patch part, mu_glob over the global part).

    Parameters
    ----------
    H : (N, Dp) the per-region vectors the readout sums (tokens, or phi of them); w : (N,) readout weights.
    mu : (D,) the head's feature mean, D = Dp (+ G D'); globals : (G, D') the image's global tokens, or None.

    Returns
    -------
    (N, D), or (N + 1, D) with the global row last, float64.
    """
    H, w = H.to(torch.float64), w.to(torch.float64)
    if H.dim() != 2 or w.shape != (H.shape[0],):
        raise CarrotError(f"H, w: expected (N, D) and (N,), got {tuple(H.shape)} and {tuple(w.shape)}")
    n, dp = H.shape
    extra = 0 if globals is None else globals.numel()
    if dp + extra != mu.shape[0]:
        raise CarrotError(f"H, globals: expected {mu.shape[0]} embedding features in all (the head's), got {dp} per "
                          f"region + {extra} global")
    if globals is None:
        return w.unsqueeze(1) * H - mu / n
    U = torch.zeros(n + 1, mu.shape[0], dtype=torch.float64)
    U[:n, :dp] = w.unsqueeze(1) * H - mu[:dp] / n
    U[n, dp:] = globals.to(torch.float64).reshape(-1) - mu[dp:]
    return U


def region_contributions(head: RidgeHead, H: torch.Tensor, w: torch.Tensor,
                         globals: torch.Tensor | None = None) -> torch.Tensor:
    """Exact split of one image's logits over its regions (and its global tokens).

    Parameters
    ----------
    head : fitted RidgeHead; H : (N, D) the per-region vectors the readout sums; w : (N,) readout weights
    (g = H^T w); globals : (G, D') the global tokens when the embedding reads them.

    Returns
    -------
    tensor (N, C) r with r_jc = W_c . (w_j h_j - mu / N), and with ``globals`` one more row, the global term
    W_c^glob . (c - mu^glob); r.sum(0) + ``head.prior_`` are the logits of g.
    """
    check_is_fitted(head)
    return centred_parts(H, w, head.feature_mean_, globals) @ head.coef_


def region_pairs(head: RidgeHead, H_x: torch.Tensor, w_x: torch.Tensor, H_i: torch.Tensor, w_i: torch.Tensor,
                 beta_ic: float, c: int | None = None, globals_x: torch.Tensor | None = None,
                 globals_i: torch.Tensor | None = None) -> torch.Tensor:
    """Split one training image's contribution beta_ic k(i, x) over (test region j, training region k): (N, N')
    ((N + 1, N' + 1) with the global tokens, their row and column last).

    With g - mu = sum_j (w_j h_j - mu / N), the pair term is beta_ic <w_j h_j - mu/N, w'_k h'_k - mu/N'>;
    the matrix sums exactly to the image-level contribution.
    """
    check_is_fitted(head)
    mu = head.feature_mean_
    return float(beta_ic) * (centred_parts(H_x, w_x, mu, globals_x) @ centred_parts(H_i, w_i, mu, globals_i).T)


def class_summary(system: TrainingSystem, G_test: ArrayLike, chunk: int = 1024, flow: bool = True) -> dict:
    """Per-class and global summaries of the exact representer contributions to each test image's predicted logit,
    streamed over ``chunk`` test rows at a time (memory O(chunk x n)); any head's training system.

    ``class_flow`` (C, C): mean over test images predicted as c (rows) of the total contribution of the
    training images of class k (columns), or None without ``flow`` (many classes); ``total_contribution`` (n,): per
    training image, the sum of its contributions over all test images (to their predicted class); ``predicted`` (m,).
    """
    G_test = as_float64_matrix(G_test, "G_test")
    y_idx = system.Y.argmax(1)
    C, n = system.n_classes, system.n
    beta = system.dual_coef
    flows = torch.zeros(C, C, dtype=torch.float64) if flow else None
    total = torch.zeros(n, dtype=torch.float64)
    preds = []
    for s in range(0, len(G_test), chunk):
        p = system.decision(G_test[s : s + chunk]).argmax(1)
        contrib = system.similarity(G_test[s : s + chunk]) * beta.T[p]  # (m, n): i -> x's logit
        if flows is not None:
            flows.index_add_(0, p, torch.zeros(len(p), C, dtype=torch.float64).index_add(1, y_idx, contrib))
        total += contrib.sum(0)
        preds.append(p)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(pred, minlength=C).clamp_min(1).to(torch.float64)
    return {"class_flow": None if flows is None else (flows / counts.unsqueeze(1)).numpy(), "total_contribution": total.numpy(),
            "predicted": pred.numpy()}
