"""RRO: representer reweighting of training examples by the exact implicit gradient.

For the ridge head theta(a) = M(a)^-1 X^T A Y, the validation loss L(theta(a)) has the exact
gradient (implicit differentiation of the quadratic inner problem)
    dL/da_i = x_i^T V r_i,   V = M^-1 dL/dtheta,   r_i = y_i - theta^T x_i,
one Cholesky solve for all n training points. Weights are a = softplus(s), optionally
renormalised per class (each class keeps its total weight n_c), with a penalty keeping each
class's effective sample size ESS_c = (sum a)^2 / sum a^2 above a floor, and an optional entropy
bonus; s is optimised with Adam. Part of the validation set (``holdout``) is kept out of the
gradient and picks the step to return (early stopping), since n free weights overfit a small
validation set.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from carrot.audit.registry import Audit, json_lines, register
from carrot.errors import CarrotError
from carrot.progress import bar
from carrot.ridge.core import CentredMoments, RidgeFactor
from carrot.ridge.head import as_head
from carrot.ridge.heads import keeps, require
from carrot.ridge.primal import PrimalSystem
from carrot.ridge.system import TrainingSystem
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, index_labels, one_hot


register(Audit("reweight", "reweight.json", json_lines(("history", "weights")), help="carrot-run reweight"))


@dataclass(frozen=True)
class RROConfig:
    """Settings of the reweighting loop (all range-checked)."""

    steps: int = 60
    lr: float = 0.05
    loss: str = "mse"  # mse: squared error (the head's own loss); ce: softmax cross-entropy of logits / temperature
    temperature: float = 0.3
    classwise: bool = True
    ess_floor: float = 0.5  # minimum ESS_c / n_c
    ess_penalty: float = 10.0
    entropy: float = 0.0
    holdout: float = 0.5  # share of the validation set used only for early stopping (0: none)
    seed: int = 0
    consistency: float = 0.0  # weight of the attribution-consistency term (seed concept, RRO component 3)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise CarrotError(f"rro.steps: expected a positive integer, got {self.steps!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise CarrotError(f"rro.{name}: expected a number > 0, got {v!r}")
        if self.loss not in ("ce", "mse"):
            raise CarrotError(f"rro.loss: expected 'ce' or 'mse', got {self.loss!r}")
        if not 0 <= self.ess_floor <= 1:
            raise CarrotError(f"rro.ess_floor: expected a fraction in [0, 1], got {self.ess_floor!r}")
        if not 0 <= self.holdout < 1:
            raise CarrotError(f"rro.holdout: expected a fraction in [0, 1), got {self.holdout!r}")
        for name in ("ess_penalty", "entropy", "consistency"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise CarrotError(f"rro.{name}: expected a number >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RROResult:
    alpha: np.ndarray  # (n,) weights of the selected step
    best_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    ess: dict[str, float] = field(default_factory=dict)  # ESS_c / n_c per class


def loss_and_grad(F: torch.Tensor, y_idx: torch.Tensor, loss: str, temperature: float) -> tuple[float, torch.Tensor]:
    """Mean validation loss and its gradient with respect to the logits F (m, C)."""
    m, c = F.shape
    Y = one_hot(y_idx.numpy(), c)
    if loss == "mse":
        D = F - Y
        return float((D * D).sum() / m), 2 * D / m
    logp = torch.log_softmax(F / temperature, dim=1)
    return float(-(logp * Y).sum() / m), (logp.exp() - Y) / (temperature * m)


def weight_gradient(system: TrainingSystem, G_val: ArrayLike, y_val: np.ndarray, loss: str = "mse",
                    temperature: float = 0.1) -> tuple[float, torch.Tensor]:
    """(L_val, dL_val/da) with dL/da_i = x~_i^T M~^-1 (X~_val^T dL/dF) r_i (the system's exact implicit gradient);
    y_val are class indices of the system's columns."""
    L, dF = loss_and_grad(system.decision(G_val), torch.as_tensor(y_val), loss, temperature)
    return L, system.weight_gradient(G_val, dF)


def class_normalised(s: torch.Tensor, y_idx: torch.Tensor, n_classes: int, classwise: bool) -> torch.Tensor:
    """a = softplus(s), rescaled so each class's total weight equals its size (if classwise)."""
    a = torch.nn.functional.softplus(s)
    if not classwise:
        return a * (len(a) / a.sum())
    tot = torch.zeros(n_classes, dtype=a.dtype).index_add(0, y_idx, a)
    cnt = torch.bincount(y_idx, minlength=n_classes).to(a.dtype)
    return a * (cnt / tot)[y_idx]


def ess_fraction(a: torch.Tensor, y_idx: torch.Tensor, n_classes: int) -> torch.Tensor:
    """ESS_c / n_c = (sum a)^2 / (n_c sum a^2) per class, (C,)."""
    s1 = torch.zeros(n_classes, dtype=a.dtype).index_add(0, y_idx, a)
    s2 = torch.zeros(n_classes, dtype=a.dtype).index_add(0, y_idx, a * a)
    cnt = torch.bincount(y_idx, minlength=n_classes).to(a.dtype)
    return s1 * s1 / (s2 * cnt).clamp_min(1e-300)


def rro(
    G: ArrayLike,
    y: ArrayLike,
    G_val: ArrayLike,
    y_val: ArrayLike,
    head: Any,
    config: RROConfig | None = None,
    G_test: ArrayLike | None = None,
    y_test: ArrayLike | None = None,
    sample_weight: ArrayLike | None = None,
) -> RROResult:
    """Optimise training weights for validation loss; history records val (and test) loss/accuracy.

    Parameters
    ----------
    G, y : (n, D) training embeddings and (n,) labels; G_val, y_val : the validation split.
    head : the fitted head (or a bare lambda) whose model every step refits under the step's weights, every setting
        and fitted choice held (``head.refit``: lambda; the kernel head's feature map too). The consistency term
        needs a head that keeps ``support_profiles`` (the linear head).
    sample_weight : (n,) base weights of the run (a weighted run); the learned weights multiply them.
    G_test, y_test : optional test split, only reported.

    Returns
    -------
    RROResult whose ``alpha`` (n,) are the effective weights (base weights times the learned ones).
    """
    cfg = config or RROConfig()
    if cfg.consistency > 0:
        require(as_head(head), "support_profiles", "rro.consistency")
    y, y_val = np.asarray(y), np.asarray(y_val)
    classes, y_idx = np.unique(y, return_inverse=True)  # groups for the class-wise normalisation and the ESS
    G_val = np.asarray(G_val, dtype=np.float64)
    Gt = as_float64_matrix(G, "G")
    a0 = as_weights(sample_weight, len(y_idx))
    # the run's model on these rows, every setting held (the kernel head: its feature map too); each step refits it
    base = as_head(head).refit(Gt, y, a0)
    fitted = base.system(Gt, y).refit(weights=a0)  # a refit system keeps its Gram: every step reuses it
    yv_idx = index_labels(base.classes_, y_val, "y_val")  # the system's class columns
    yt_idx = None if y_test is None else index_labels(base.classes_, y_test, "y_test")
    fit_rows, hold_rows = _holdout_split(yv_idx, cfg.holdout, cfg.seed)
    Gv_fit, yv_fit = torch.as_tensor(G_val[fit_rows]), torch.as_tensor(yv_idx[fit_rows])
    C, yt = len(classes), torch.as_tensor(y_idx)
    track = keeps(base, "support_profiles")  # the consistency term's value is recorded where the head has it
    s = torch.full((len(y_idx),), math.log(math.e - 1), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=cfg.lr)
    history: list[dict[str, float]] = []
    best: tuple[float, int, torch.Tensor] | None = None
    steps = bar(range(cfg.steps + 1), desc="reweight (RRO)", unit="step")
    for step in steps:
        a = class_normalised(s, yt, C, cfg.classwise)
        profiles = track and (cfg.consistency > 0 or step == 0 or step == cfg.steps)
        system, cons = _step(fitted, Gt, a0 * a, Gv_fit, yv_fit, base.fit_intercept) if profiles else (
            fitted.refit(weights=(a0 * a).detach()), None)
        L, g_a = weight_gradient(system, G_val[fit_rows], yv_idx[fit_rows], cfg.loss, cfg.temperature)
        g_a = g_a * a0  # d/da of the effective weights a0 * a
        ess = ess_fraction(a, yt, C)
        penalty = cfg.ess_penalty * torch.relu(cfg.ess_floor - ess).pow(2).sum()
        if cfg.entropy > 0:
            ent = _class_entropy(a, yt, C)
            penalty = penalty - cfg.entropy * ent
        if cons is not None and cfg.consistency > 0:
            penalty = penalty + cfg.consistency * cons
        rec = _record(step, L, penalty, cons, ess, system, cfg, G_val, yv_idx, fit_rows, hold_rows)
        score = rec.get("holdout_loss", L)
        if best is None or score < best[0]:
            best = (score, step, a.detach().clone())
        if G_test is not None:
            rec["test_accuracy"] = _acc(system, G_test, yt_idx)
        history.append(rec)
        steps.set_postfix(val_loss=f"{L:.4g}", best_step=best[1])
        if step == cfg.steps:
            break
        opt.zero_grad()
        (a * g_a).sum().add(penalty).backward()  # d/ds of L_val through a, plus the regularisers
        opt.step()
    steps.close()
    _, best_step, a_best = best
    ess = ess_fraction(a_best * (a0 > 0), yt, C)  # rows outside the run (base weight 0) carry no weight
    return RROResult((a0 * a_best).numpy(), best_step, history, {str(c): float(e) for c, e in zip(classes, ess)})


def _record(step: int, L: float, penalty: torch.Tensor, cons: torch.Tensor | None, ess: torch.Tensor,
            system: TrainingSystem, cfg: RROConfig, G_val: np.ndarray, yv_idx: np.ndarray, fit_rows: np.ndarray,
            hold_rows: np.ndarray) -> dict[str, Any]:
    """One step's history row: the validation loss and accuracy, the regularisers, and the held-out split's numbers."""
    rec = {"step": step, "val_loss": L, "penalty": float(penalty.detach()),
           "consistency": None if cons is None else float(cons.detach()),
           "val_accuracy": _acc(system, G_val[fit_rows], yv_idx[fit_rows]), "min_ess": float(ess.detach().min())}
    if len(hold_rows):
        F = system.decision(G_val[hold_rows])
        rec["holdout_loss"] = loss_and_grad(F, torch.as_tensor(yv_idx[hold_rows]), cfg.loss, cfg.temperature)[0]
        rec["holdout_accuracy"] = _acc(system, G_val[hold_rows], yv_idx[hold_rows])
    return rec


def _holdout_split(y_idx: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of validation rows into (fit, holdout); every class keeps a fit row."""
    if share == 0:
        return np.arange(len(y_idx)), np.arange(0)
    rng = np.random.default_rng(seed)
    hold = []
    for c in np.unique(y_idx):
        rows = rng.permutation(np.flatnonzero(y_idx == c))
        hold += rows[: min(len(rows) - 1, int(round(len(rows) * share)))].tolist()
    mask = np.zeros(len(y_idx), dtype=bool)
    mask[hold] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _step(fitted: Any, G: torch.Tensor, a: torch.Tensor, G_val: torch.Tensor, yv_idx: torch.Tensor,
          fit_intercept: bool) -> tuple[PrimalSystem, torch.Tensor]:
    """One RRO step of a linear head (one that keeps ``support_profiles``) whose consistency term is needed: one
    factorisation, differentiable in the weights a, serves both the step's system (detached) and the term."""
    m = CentredMoments.from_rows(G, fitted.Y, a, fit_intercept)
    factor = RidgeFactor.primal(m.M, fitted.lam)
    W = factor.solve(m.B)
    system = PrimalSystem.from_solution(G, fitted.Y, a.detach(), fitted.lam, fit_intercept,
                                        RidgeFactor("primal", factor.chol.detach(), fitted.lam), m.mu.detach(),
                                        float(m.S.detach()), m.ybar.detach(), W.detach(), fitted.device, fitted.chunk_size)
    return system, consistency_loss(_profiles(G, fitted.Y, a, m, W, fitted.lam, G_val, yv_idx), yv_idx)


def support_profiles(G: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, lam: float, G_val: torch.Tensor,
                     yv_idx: torch.Tensor, fit_intercept: bool = True) -> torch.Tensor:
    """Exact contributions of every training image to each validation image's true-class logit, (m, n), for the
    linear head; differentiable in the weights a (the ridge core's moments and Cholesky are torch ops)."""
    m = CentredMoments.from_rows(G, Y, a, fit_intercept)
    return _profiles(G, Y, a, m, RidgeFactor.primal(m.M, lam).solve(m.B), lam, G_val, yv_idx)


def _profiles(G: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, m: CentredMoments, W: torch.Tensor, lam: float,
              G_val: torch.Tensor, yv_idx: torch.Tensor) -> torch.Tensor:
    Gc = G - m.mu
    beta = a.unsqueeze(1) * (Y - m.ybar - Gc @ W) / lam  # representer values at the optimum
    return ((G_val - m.mu) @ Gc.T) * beta.T[yv_idx]


def consistency_loss(profiles: torch.Tensor, yv_idx: torch.Tensor) -> torch.Tensor:
    """-(mean cosine of support profiles within a class - mean cosine across classes)."""
    P = profiles / profiles.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = P @ P.T
    same = yv_idx.unsqueeze(0) == yv_idx.unsqueeze(1)
    off = ~torch.eye(len(yv_idx), dtype=torch.bool)
    within, between = cos[same & off], cos[~same]
    w = within.mean() if within.numel() else cos.new_zeros(())
    b = between.mean() if between.numel() else cos.new_zeros(())
    return -(w - b)


def _class_entropy(a: torch.Tensor, y_idx: torch.Tensor, n_classes: int) -> torch.Tensor:
    tot = torch.zeros(n_classes, dtype=a.dtype).index_add(0, y_idx, a)
    p = a / tot[y_idx]
    cnt = torch.bincount(y_idx, minlength=n_classes).to(a.dtype)
    h = torch.zeros(n_classes, dtype=a.dtype).index_add(0, y_idx, -p * torch.log(p.clamp_min(1e-300)))
    return (h / torch.log(cnt.clamp_min(2))).sum()


def _acc(system: TrainingSystem, G: ArrayLike, y_idx: np.ndarray) -> float:
    return float((system.decision(G).argmax(1).numpy() == y_idx).mean())
