"""Label-safe feature-space augmentation (seed feature-space-augmentation).

Noise goes only into the nuisance subspace, the orthogonal complement of the discriminative
directions w_y - w_k of the top-K confusing classes: g~ = g + sqrt(alpha) P_N eps, eps ~ N(0, I).
Its scale comes from the margin chance constraint P(m_k(g~) < gamma) <= delta for every class k != y:
(w_y - w_k)^T P_N eps ~ N(0, s_k^2), s_k = ||P_N (w_y - w_k)||, so
    alpha = min_k (m_k - gamma)_+^2 / (2 s_k^2 log(1/delta))   over k with s_k > 0
(the top-K margins are untouched by construction; alpha = 0 when a margin is already below gamma).

For the ridge head the expectation folds into the solve: E[(g + P eps)(g + P eps)^T] = g g^T + alpha P,
an anisotropic ridge penalty sum_i a_i alpha_i P_i; no sampling needed. The sampled version (m noisy
copies per image, weights a_i / m) converges to it and serves the cross-entropy head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from carrot.errors import CarrotError, check_is_fitted
from carrot.ridge.head import RidgeHead, as_head, frozen_clone
from carrot.ridge.core import CentredMoments, RidgeFactor
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, encode_labels


@dataclass(frozen=True)
class AugmentConfig:
    topk: int = 3
    delta: float = 0.05
    gamma: float = 0.0
    alpha_max: float | None = None  # cap on the noise variance (None: no cap)
    level: str = "sample"  # sample: P_i, alpha_i per image; class: one P_c, alpha_c per class

    def __post_init__(self) -> None:
        if not isinstance(self.topk, int) or self.topk < 1:
            raise CarrotError(f"augment.topk: expected a positive integer, got {self.topk!r}")
        if not 0 < self.delta < 1:
            raise CarrotError(f"augment.delta: expected a probability in (0, 1), got {self.delta!r}")
        if self.level not in ("sample", "class"):
            raise CarrotError(f"augment.level: expected 'sample' or 'class', got {self.level!r}")


@dataclass
class NuisancePlan:
    """Per image: orthonormal discriminative basis Q_i (D, r) and noise variance alpha_i."""

    bases: list[torch.Tensor]
    alpha: torch.Tensor  # (n,)

    def penalty(self, a: torch.Tensor) -> torch.Tensor:
        """sum_i a_i alpha_i P_i with P_i = I - Q_i Q_i^T: (D, D)."""
        d = self.bases[0].shape[0]
        R = torch.eye(d, dtype=torch.float64) * float((a * self.alpha).sum())
        for q, w in zip(self.bases, a * self.alpha):
            if w > 0:
                R -= w * (q @ q.T)
        return R

    def sample(self, G: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
        """m noisy copies of every row: (n * m, D), copies of row i at rows i*m .. i*m + m - 1."""
        out = G.repeat_interleave(m, 0).clone()
        for i, (q, al) in enumerate(zip(self.bases, self.alpha)):
            if al > 0:
                eps = torch.randn(m, G.shape[1], generator=generator, dtype=torch.float64)
                out[i * m : (i + 1) * m] += math.sqrt(float(al)) * (eps - (eps @ q) @ q.T)
        return out


def nuisance_plan(coef: torch.Tensor, intercept: torch.Tensor, G: ArrayLike, y_idx: np.ndarray,
                  cfg: AugmentConfig = AugmentConfig()) -> NuisancePlan:
    """Bases and chance-constrained noise scales from a fitted linear head f = W^T g + b (W: D x C)."""
    G = as_float64_matrix(G, "G")
    n, C = G.shape[0], coef.shape[1]
    if C < 2:
        raise CarrotError("augmentation needs at least 2 classes")
    F = G @ coef + intercept
    y = torch.as_tensor(np.asarray(y_idx), dtype=torch.long)
    k = min(cfg.topk, C - 1)
    log_term = math.log(1.0 / cfg.delta)
    groups = [[i] for i in range(n)] if cfg.level == "sample" else [torch.nonzero(y == c).flatten().tolist() for c in range(C)]
    bases: list[torch.Tensor | None] = [None] * n
    alpha = torch.zeros(n, dtype=torch.float64)
    for rows in groups:
        if not rows:
            continue
        c = int(y[rows[0]])
        score = F[rows].mean(0).clone()
        score[c] = -torch.inf
        confusing = torch.topk(score, k).indices
        diffs = coef[:, c].unsqueeze(1) - coef[:, confusing]  # (D, K)
        q, r = torch.linalg.qr(diffs, mode="reduced")
        q = q[:, torch.abs(torch.diagonal(r)) > 1e-10 * max(1.0, float(diffs.abs().max()))]
        others = torch.tensor([j for j in range(C) if j != c], dtype=torch.long)
        dw = coef[:, c].unsqueeze(1) - coef[:, others]  # (D, C-1)
        s2 = ((dw - q @ (q.T @ dw)) ** 2).sum(0)  # ||P_N (w_y - w_k)||^2
        for i in rows:
            margins = F[i, c] - F[i, others]
            slack = (margins - cfg.gamma).clamp_min(0)
            ok = s2 > 1e-24
            a_i = float((slack[ok] ** 2 / (2 * s2[ok] * log_term)).min()) if ok.any() else 0.0
            if cfg.alpha_max is not None:
                a_i = min(a_i, cfg.alpha_max)
            alpha[i] = a_i if math.isfinite(a_i) else 0.0
            bases[i] = q
    return NuisancePlan([b for b in bases], alpha)


def fit_augmented_ridge(G: ArrayLike, y: ArrayLike, head: RidgeHead | float, cfg: AugmentConfig = AugmentConfig(),
                        sample_weight: ArrayLike | None = None) -> tuple[RidgeHead, NuisancePlan]:
    """Ridge head under the expected augmentation: (Gc^T A Gc + lam I + sum a_i alpha_i P_i) W = Gc^T A Yc.

    ``head`` gives every setting (a fitted head: its chosen lam_; a number: RidgeHead(lam=number)).
    The plan (bases, alphas) comes from the plain ridge fit with the same settings; the penalty enters
    the ridge core's factorisation.
    """
    base = frozen_clone(as_head(head)).fit(G, y, sample_weight)
    Gt = as_float64_matrix(G, "G")
    n = Gt.shape[0]
    classes, y_idx = encode_labels(y, n)
    a = as_weights(sample_weight, n)
    plan = nuisance_plan(base.coef_, base.intercept_, Gt, y_idx, cfg)
    m = CentredMoments.accumulate(Gt, y_idx, a, n_classes=len(classes), fit_intercept=base.fit_intercept)
    factor = RidgeFactor.primal(m.M, base.lam_, penalty=plan.penalty(a))
    out = frozen_clone(base)
    out._set_solution(classes, factor.solve(m.B), m, factor, "augmented", Gt.shape[1], None if sample_weight is None else a)
    out.lam_, out.lam_path_ = base.lam_, None
    out.dual_coef_ = None  # the anisotropic penalty breaks the plain representer form
    return out, plan


def fit_sampled_ridge(G: ArrayLike, y: ArrayLike, head: RidgeHead | float, plan: NuisancePlan, m: int, seed: int = 0,
                      sample_weight: ArrayLike | None = None) -> RidgeHead:
    """Ridge head on m sampled nuisance-noise copies per image (weights a_i / m); tends to the analytic fit."""
    Gt = as_float64_matrix(G, "G")
    a = as_weights(sample_weight, Gt.shape[0])
    Ga = plan.sample(Gt, m, torch.Generator().manual_seed(seed))
    return frozen_clone(as_head(head)).fit(Ga, np.repeat(np.asarray(y), m), a.repeat_interleave(m) / m)


def augmented_softmax(G: ArrayLike, y: ArrayLike, lam: float, cfg: AugmentConfig = AugmentConfig(), m: int = 4,
                      seed: int = 0):
    """Cross-entropy head trained on sampled label-safe copies (plan from a plain CE fit)."""
    from carrot.ridge.baselines import SoftmaxHead

    base = SoftmaxHead(lam=lam).fit(G, y)
    check_is_fitted(base)
    Gt = as_float64_matrix(G, "G")
    _, y_idx = encode_labels(y, Gt.shape[0])
    W, b = base.coef_, base.intercept_ - base.feature_mean_ @ base.coef_  # f = W^T g + b on raw features
    plan = nuisance_plan(W, b, Gt, y_idx, cfg)
    Ga = plan.sample(Gt, m, torch.Generator().manual_seed(seed))
    return SoftmaxHead(lam=lam).fit(Ga, np.repeat(np.asarray(y), m)), plan
