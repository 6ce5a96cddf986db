"""Cost of carrot's exact engine against reference implementations, measured in one run.

Rows (per n, D, C): head fit vs sklearn RidgeClassifier / LogisticRegression (time, accuracy);
all-pairs attribution (test x train) vs TracIn on the same features; exact LOO for all n vs
brute-force refits (measured for up to --max-refits refits, extrapolated linearly beyond, and
labelled so); Woodbury removal of 1% of n vs a refit. Each (n, D, C) runs in a fresh process whose
peak RSS is recorded. Writes JSON + CSV under benchmarks/results/.

    python benchmarks/bench_engine.py --n 1000 4000 16000 --d 128 384 768 --c 8 200
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, peak_rss_mb, write_results


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def synthetic(n: int, d: int, c: int, seed: int = 0):
    g = np.random.default_rng(seed)
    means = g.normal(size=(c, d)) * (3.0 / np.sqrt(d))
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    yt = g.integers(0, c, 500)
    return means[y] + g.normal(size=(n, d)), y, means[yt] + g.normal(size=(500, d)), yt


def bench(n: int, d: int, c: int, lam: float, max_refits: int, seed: int, device: str = "cpu") -> list[dict]:
    from sklearn.linear_model import LogisticRegression, RidgeClassifier

    from carrot.attribution.representer import centred_kernel
    from carrot.ridge.baselines import TracInHead
    from carrot.ridge.head import RidgeHead
    from carrot.ridge.primal import PrimalSystem

    G, y, Gt, yt = synthetic(n, d, c, seed)
    rows = []

    def row(task, impl, seconds, **extra):
        rows.append({"task": task, "impl": impl, "n": n, "d": d, "c": c, "seconds": seconds, **extra})

    t, head = timed(lambda: RidgeHead(lam=lam, device=device).fit(G, y), 3)
    row("fit", f"carrot RidgeHead ({device})", t, accuracy=float((head.predict(Gt) == yt).mean()))
    t, rc = timed(lambda: RidgeClassifier(alpha=lam, solver="cholesky").fit(G, y), 3)
    row("fit", "sklearn RidgeClassifier", t, accuracy=float(rc.score(Gt, yt)))
    t, lr = timed(lambda: LogisticRegression(max_iter=300).fit(G, y))
    row("fit", "sklearn LogisticRegression", t, accuracy=float(lr.score(Gt, yt)))

    t, _ = timed(lambda: centred_kernel(head, G, Gt).unsqueeze(-1) * head.dual_coef_.unsqueeze(0) if c <= 16
                 else centred_kernel(head, G, Gt) * head.dual_coef_[:, 0], 3)
    row("all-pairs attribution (500 test x n)", "carrot representer" + (" (all C classes)" if c <= 16 else " (one class)"), t)
    th = TracInHead.fit(G, y, epochs=5, n_checkpoints=5)
    t, _ = timed(lambda: th.influence(G, y, Gt, yt), 3)
    row("all-pairs attribution (500 test x n)", "TracInCP (5 checkpoints)", t)

    system = head.system(G, y)
    t, loo = timed(system.loo_logits, 3)
    row("exact LOO, all n", "carrot hat diagonal", t)
    r = min(n, max_refits)
    keep = np.ones(n, dtype=bool)

    def refits():
        out = []
        for i in range(r):
            keep[i] = False
            sub = PrimalSystem.fit(G[keep], system.Y[keep], None, lam)  # fixed class columns, fresh Cholesky
            out.append(sub.decision(G[i : i + 1])[0].numpy())
            keep[i] = True
        return np.array(out)

    t_ref, ref = timed(refits)
    err = float(np.abs(ref - loo[:r].numpy()).max())
    row("exact LOO, all n", "brute-force refits", t_ref * n / r, refits_measured=r, extrapolated=r < n, max_abs_diff=err)

    k = max(1, n // 100)
    idx = np.random.default_rng(seed).choice(n, k, replace=False)
    t, theta = timed(lambda: system.updated_theta(idx), 3)
    row("remove 1% of n", "carrot Woodbury", t, k=k)
    mask = np.ones(n, dtype=bool)
    mask[idx] = False
    t, s2 = timed(lambda: PrimalSystem.fit(G[mask], system.Y[mask], None, lam), 3)
    row("remove 1% of n", "refit", t, k=k,
        max_abs_diff=float(np.abs(system.decision(Gt, theta).numpy() - s2.decision(Gt).numpy()).max()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--d", type=int, nargs="+", default=[384])
    ap.add_argument("--c", type=int, nargs="+", default=[8, 200])
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--max-refits", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device of the carrot head fit (cuda on a GPU machine)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine"))
    ap.add_argument("--child", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # one configuration in a fresh process, so its peak memory is its own
        n, d, c = a.child
        base = peak_rss_mb()
        rows = bench(n, d, c, a.lam, a.max_refits, a.seed, a.device)
        for r in rows:
            r["config_peak_rss_mb"], r["rss_after_imports_mb"] = peak_rss_mb(), base
        print(json.dumps(rows))
        return
    rows = []
    for n in a.n:
        for d in a.d:
            for c in a.c:
                r = subprocess.run([sys.executable, __file__, "--child", str(n), str(d), str(c), "--lam", str(a.lam),
                                    "--max-refits", str(a.max_refits), "--seed", str(a.seed), "--device", a.device],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(r.stderr)
                rows += json.loads(r.stdout.strip().splitlines()[-1])
                print(json.dumps(rows[-1]), flush=True)
    # ratios against the reference measured in the same run
    for r in rows:
        ref = {"fit": "sklearn RidgeClassifier", "exact LOO, all n": "brute-force refits", "remove 1% of n": "refit",
               "all-pairs attribution (500 test x n)": "TracInCP (5 checkpoints)"}[r["task"]]
        base = next(x for x in rows if x["task"] == r["task"] and x["impl"] == ref and (x["n"], x["d"], x["c"]) == (r["n"], r["d"], r["c"]))
        r["speedup_vs_reference"] = base["seconds"] / r["seconds"]
    meta = {"machine": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device_name": device_name(a.device), "args": vars(a)}
    print(f"wrote {write_results(a.out, rows, meta=meta)} and .csv")


if __name__ == "__main__":
    main()
