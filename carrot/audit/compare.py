"""Two runs' predictions on the same test images compared (``carrot-run compare``): accuracies, the per-class
change and McNemar's exact test."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from carrot.audit.evaluate import per_class_accuracy
from carrot.audit.registry import Audit, register
from carrot.errors import CarrotError


def compare_predictions(pred_a: np.ndarray, pred_b: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict:
    """Two classifiers on the same test images: accuracies, per-class change, and McNemar's exact test on
    the discordant pairs (two-sided binomial, p = 0.5): is B's accuracy different from A's?"""
    from scipy.stats import binomtest

    pred_a, pred_b, y = np.asarray(pred_a), np.asarray(pred_b), np.asarray(y)
    if not (pred_a.shape == pred_b.shape == y.shape) or y.ndim != 1:
        raise CarrotError(f"predictions: expected equal 1-D shapes, got {pred_a.shape}, {pred_b.shape} and labels {y.shape}")
    ok_a, ok_b = pred_a == y, pred_b == y
    fixed, broken = int((~ok_a & ok_b).sum()), int((ok_a & ~ok_b).sum())
    p = binomtest(fixed, fixed + broken, 0.5).pvalue if fixed + broken else 1.0
    pa, pb = per_class_accuracy(pred_a, y, len(classes)), per_class_accuracy(pred_b, y, len(classes))
    return {"n": int(len(y)), "accuracy_a": float(ok_a.mean()), "accuracy_b": float(ok_b.mean()),
            "fixed_by_b": fixed, "broken_by_b": broken, "mcnemar_exact_p": float(p),
            "per_class": {c: {"a": a, "b": b, "change": None if a is None else b - a} for c, a, b in zip(classes, pa, pb)}}


def compare_lines(res: dict) -> list[str]:
    return [f"A {res['accuracy_a']:.4f}  B {res['accuracy_b']:.4f}  on {res['n']} test images; B fixes {res['fixed_by_b']}, "
            f"breaks {res['broken_by_b']} (McNemar exact p = {res['mcnemar_exact_p']:.3g})"]


register(Audit("compare", "compare.json", compare_lines, help="carrot-run compare (written into RUN_B)"))
