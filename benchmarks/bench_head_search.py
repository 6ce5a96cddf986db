"""The `auto` head's search with many training images and many classes: its wall time against the ridge head's fit
(the reference, measured in the same process), and what it chooses against the full search it replaces.

`head.kind: auto` compares the ridge and the kernel head by exact LOO accuracy. The kernel head's full search costs
about 5 gammas x (10 n^3 + 15 lambdas x 2 n^2 C) flops; above `carrot.ridge.heads.SEARCH_FLOPS` the heads are first
compared on a class-stratified subsample (`SUBSAMPLE` images), the loser is skipped with that reason, and the winner,
if it is the kernel head, is fitted on the whole with the subsample's gamma and three lambdas (one Cholesky each).
The reference "full" row is the kernel head's full search on the whole (what `auto` ran before). Every head runs in
this one process, one after the other, with `OMP_NUM_THREADS` threads.

Embeddings are seeded synthetic class mixtures in D = 384 (DINOv2 ViT-S/14's width): one problem with many classes and
three images each (n = 5,505, C = 1,835: the issue's "one class per object" case), one with 89 classes (n = 5,518).

    python benchmarks/bench_head_search.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D = 384
PROBLEMS = {"1835 classes x 3": (1835, 3, 1.2, 1.2), "89 classes": (89, 62, 0.3, 0.4)}  # classes, images, centres, spread


def mixture(classes: int, per: int, base: float, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
    """(G, y) training and (Gt, yt) test rows (one test image per class): each class a union of three clusters whose
    centres (scale ``base``, ``spread`` apart) live in 64 of the D dimensions, noise everywhere, so that a kernel head
    and a linear one differ."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((classes, 3, D))
    centres[:, :, :64] = rng.normal(size=(classes, 1, 64)) * base + rng.normal(size=(classes, 3, 64)) * spread
    scale = np.r_[np.full(64, 0.5), np.full(D - 64, 2.0)]
    y = np.repeat(np.arange(classes), per + 1)
    G = centres[y, rng.integers(0, 3, len(y))] + rng.normal(size=(len(y), D)) * scale
    test = np.arange(len(y)) % (per + 1) == per
    return G[~test], y[~test], G[test], y[test]


def timed(fit) -> tuple[object, float]:
    t0 = time.perf_counter()
    head = fit()
    return head, time.perf_counter() - t0


def one_problem(name: str, classes: int, per: int, base: float, spread: float, seed: int, full: bool) -> list[dict]:
    import carrot.ridge.heads as heads
    from carrot.config import RunConfig
    from carrot.ridge.heads import fit_head, loo_accuracy

    G, y, Gt, yt = mixture(classes, per, base, spread, seed)
    cfg = {kind: RunConfig.from_dict({"head": {"kind": kind}, "device": "cpu", "seed": seed}) for kind in ("ridge", "auto")}
    rows = []

    def row(what: str, head, seconds: float, reference: float) -> dict:
        choice = getattr(head, "head_choice_", None) or {}
        return {"problem": name, "n": len(y), "classes": classes, "what": what, "seconds": seconds,
                "ratio_to_ridge": seconds / reference, "head": type(head).__name__,
                "gamma": getattr(head, "gamma_", None), "lam": head.lam_,
                "loo_accuracy": choice.get("kernel" if "Kernel" in type(head).__name__ else "ridge") or loo_accuracy(head, G, y),
                "test_accuracy": float((head.predict(Gt) == yt).mean()),
                "search": choice.get("kernel_search", ""), "skipped": choice.get("kernel_skipped", "")}

    ridge, s_ridge = timed(lambda: fit_head(cfg["ridge"], G, y))
    auto, s_auto = timed(lambda: fit_head(cfg["auto"], G, y))
    ridge2, s_ridge2 = timed(lambda: fit_head(cfg["ridge"], G, y))  # the reference again, after: drift shows here
    reference = (s_ridge + s_ridge2) / 2
    rows += [row("ridge head (reference)", ridge, reference, reference), row("auto (new)", auto, s_auto, reference)]
    if full:  # 'auto' as it was: every head searched in full, whatever it costs
        budget, heads.SEARCH_FLOPS = heads.SEARCH_FLOPS, {"cpu": float("inf"), "other": float("inf")}
        try:
            before, s_before = timed(lambda: fit_head(cfg["auto"], G, y))
        finally:
            heads.SEARCH_FLOPS = budget
        rows.append(row("auto before (full search)", before, s_before, reference))
    for r in rows:
        print(f"{name}: {r['what']}: {r['seconds']:.1f} s ({r['ratio_to_ridge']:.1f}x ridge), {r['head']} gamma "
              f"{r['gamma']} lambda {r['lam']:.4g}, LOO {r['loo_accuracy']:.4f}, test {r['test_accuracy']:.4f}", flush=True)
    return rows


def main() -> None:
    from common import device_name, write_results

    from carrot.progress import set_quiet
    from carrot.ridge.heads import SEARCH_FLOPS, SUBSAMPLE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-full", action="store_true", help="skip the full kernel search (minutes per problem)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "head_search"))
    args = ap.parse_args()
    set_quiet(True)
    rows = [r for p in args.problems for r in one_problem(p, *PROBLEMS[p], args.seed, not args.no_full)]
    print(write_results(args.out, rows, device=device_name("cpu"), threads=os.environ.get("OMP_NUM_THREADS", "all"),
                        search_flops=SEARCH_FLOPS["cpu"], subsample=SUBSAMPLE, seed=args.seed))


if __name__ == "__main__":
    main()
