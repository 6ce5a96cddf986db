"""Dataset debugging loop (seed concept, experiment 4): find the training images most harmful to a
validation split by the exact leave-one-out change of the validation loss, drop or downweight them (Woodbury, no refit;
the kernel head: exact removal in the dual, or its dual solved again under the new weights), report the change in
validation and test accuracy, against dropping as many random images."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.ridge.head import RidgeHead, as_head, frozen_clone
from carrot.ridge.kernel import KernelRidgeHead, WeightedDual
from carrot.ridge.removal import RidgeSystem, loo_loss_change
from carrot.validation import index_labels


def debug_loop(G: np.ndarray, y: np.ndarray, G_val: np.ndarray, y_val: np.ndarray, G_test: np.ndarray,
               y_test: np.ndarray, head: RidgeHead | float, ks: Sequence[int] = (5, 10, 20, 50), downweight: float = 0.0,
               n_random: int = 5, seed: int = 0, sample_weight: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy after removing (``downweight`` = 0) or downweighting the K most harmful images.

    ``head`` gives every setting of the fit on (G, y) (a fitted head: its chosen lambda); ``sample_weight``
    (n,): the run's weights of these rows (downweighting multiplies them).
    """
    if not 0 <= downweight < 1:
        raise CarrotError(f"downweight: expected a weight in [0, 1), got {downweight!r}")
    if not ks or min(ks) < 1 or max(ks) >= len(y):
        raise CarrotError(f"k: expected every K in 1..{len(y) - 1} (n = {len(y)}), got {list(ks)}")
    if isinstance(head, KernelRidgeHead):  # the run's feature map held: --apply then writes exactly this model
        head = head.refit_fixed(G, y, sample_weight)
    else:
        head = frozen_clone(as_head(head)).fit(G, y, sample_weight)
    yv = index_labels(head.classes_, y_val, "y_val")
    yt = index_labels(head.classes_, y_test, "y_test")
    if isinstance(head, RidgeHead):
        system = RidgeSystem.from_head(head, G, y)
        harm = -loo_loss_change(system, G_val, yv).numpy()  # > 0: removing it lowers the validation loss

        def after(idx: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:  # logits once idx are down-weighted
            theta = system.theta if idx is None else system.updated_theta(idx, np.full(len(idx), downweight) * system.a[idx].numpy())
            return lambda Gx: system.decision(Gx, theta)
    elif downweight:  # the kernel head under changed weights: its dual solved again, the feature map held
        harm = -head.loo_loss_change(G_val, yv).numpy()
        K = head.train_gram()

        def after(idx: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
            a = head._a.clone()
            if idx is not None:
                a[torch.as_tensor(idx)] *= downweight
            system = WeightedDual(head, head.X_fit_, head.train_targets_, a, K)
            return system.decision
    else:  # the kernel head: exact removal of a set in the dual (l_R(x)^T (I - H_RR)^-1 e_R)
        harm = -head.loo_loss_change(G_val, yv).numpy()
        seen = {id(Gx): (torch.as_tensor(head.decision_function(Gx)), head.equivalent_kernel(Gx)) for Gx in (G_val, G_test)}

        def after(idx: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:  # logits and l(x) computed once per set
            return lambda Gx: seen[id(Gx)][0] - (0 if idx is None else head.removal_from(seen[id(Gx)][1], idx))
    order = np.argsort(-harm, kind="stable")
    rng = np.random.default_rng(seed)

    def acc(logits: Callable[[np.ndarray], torch.Tensor], Gx, yx) -> float:
        return float((logits(Gx).argmax(1).numpy() == yx).mean())

    full = after(None)
    base = {"val_accuracy": acc(full, G_val, yv), "test_accuracy": acc(full, G_test, yt)}
    rows = []
    for k in ks:
        top = after(order[:k])
        rnd = [after(idx) for idx in (rng.choice(len(y), k, replace=False) for _ in range(n_random))]
        rows.append({"k": int(k), "val_accuracy": acc(top, G_val, yv), "test_accuracy": acc(top, G_test, yt),
                     "random_test_accuracy_mean": float(np.mean([acc(t, G_test, yt) for t in rnd])),
                     "dropped": order[:k].tolist()})
    return {"lam": float(head.lam_), "downweight": downweight, "baseline": base, "rows": rows,
            "harm_scores": harm.tolist()}
