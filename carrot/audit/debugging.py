"""Dataset debugging loop (seed concept, experiment 4): find the training images most harmful to a
validation split by the exact leave-one-out change of the validation loss, drop or downweight them (the training
system's exact weight change, a k x k solve, no refit; either head), report the change in validation and test
accuracy, against dropping as many random images."""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np
import torch

from carrot.audit.registry import Audit, register
from carrot.errors import CarrotError
from carrot.progress import bar
from carrot.ridge.head import as_head
from carrot.validation import index_labels


def debug_loop(G: np.ndarray, y: np.ndarray, G_val: np.ndarray, y_val: np.ndarray, G_test: np.ndarray,
               y_test: np.ndarray, head: Any, ks: Sequence[int] = (5, 10, 20, 50), downweight: float = 0.0,
               n_random: int = 5, seed: int = 0, sample_weight: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy after removing (``downweight`` = 0) or downweighting the K most harmful images.

    ``head`` gives every setting of the fit on (G, y) (a fitted head: its chosen lambda); ``sample_weight``
    (n,): the run's weights of these rows (downweighting multiplies them).
    """
    if not 0 <= downweight < 1:
        raise CarrotError(f"downweight: expected a weight in [0, 1), got {downweight!r}")
    if not ks or min(ks) < 1 or max(ks) >= len(y):
        raise CarrotError(f"k: expected every K in 1..{len(y) - 1} (n = {len(y)}), got {list(ks)}")
    head = as_head(head).refit(G, y, sample_weight)  # every setting held (a kernel head: its feature map too)
    system = head.system(G, y)
    yv = index_labels(head.classes_, y_val, "y_val")
    yt = index_labels(head.classes_, y_test, "y_test")
    harm = -system.loo_loss_change(G_val, yv).numpy()  # > 0: removing it lowers the validation loss
    seen = {id(Gx): system.counterfactuals(Gx) for Gx in (G_val, G_test)}  # logits and l(x) once per input set

    def after(idx: np.ndarray | None) -> Callable[[np.ndarray], torch.Tensor]:  # logits once idx are down-weighted
        if idx is None:
            return lambda Gx: seen[id(Gx)].logits
        w = downweight * system.a[torch.as_tensor(idx)].numpy()
        return lambda Gx: seen[id(Gx)].reweighted(idx, w)
    order = np.argsort(-harm, kind="stable")
    rng = np.random.default_rng(seed)

    def acc(logits: Callable[[np.ndarray], torch.Tensor], Gx, yx) -> float:
        return float((logits(Gx).argmax(1).numpy() == yx).mean())

    full = after(None)
    base = {"val_accuracy": acc(full, G_val, yv), "test_accuracy": acc(full, G_test, yt)}
    rows = []
    for k in bar(ks, desc="debug: drops", unit="k"):
        top = after(order[:k])
        rnd = [after(idx) for idx in (rng.choice(len(y), k, replace=False) for _ in range(n_random))]
        rows.append({"k": int(k), "val_accuracy": acc(top, G_val, yv), "test_accuracy": acc(top, G_test, yt),
                     "random_test_accuracy_mean": float(np.mean([acc(t, G_test, yt) for t in rnd])),
                     "dropped": order[:k].tolist()})
    return {"lam": float(head.lam_), "downweight": downweight, "baseline": base, "rows": rows,
            "harm_scores": harm.tolist()}


def debug_lines(res: dict) -> list[str]:
    rows = [{k: v for k, v in r.items() if k != "dropped"} for r in res["rows"]]
    return [json.dumps({k: v for k, v in res.items() if k != "rows"} | {"rows": rows}, indent=2)]


register(Audit("debug", "debug.json", debug_lines, help="carrot-run debug"))
