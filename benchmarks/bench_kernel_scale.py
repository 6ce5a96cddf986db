"""The kernel head as n grows: the exact dual (n x n) against the Nystroem kernel head (n x m), by fit time, peak
memory, and how close the approximate model comes to the exact one (test accuracy, agreement of predictions).

Embeddings are a seeded class-structured mixture in D = 384 (DINOv2 ViT-S/14's width): C classes, each a union of
three Gaussian clusters, so a kernel head beats a linear one. Each (solve, n) fit runs in a fresh process (spawn), so
its peak resident memory is its own; gamma is fixed at the median heuristic and lambda chosen by exact LOO over the
default grid: one kernel parameter (head.gamma 'auto' searches five, five times this time). The same run reports
the memory the head's own estimate plans for (carrot.ridge.kernel.DUAL_ARRAYS / LOW_RANK_ARRAYS).

    python benchmarks/bench_kernel_scale.py --n 1000 2000 4000 8000 --nystroem-n 16000 32000
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import queue
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D, CLASSES, TEST = 384, 50, 2000


def mixture(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000)  # the same class structure for every n and seed
    centres = rng.normal(size=(CLASSES, 3, D)) * 0.35
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    sub = rng.integers(0, 3, n)
    return centres[y, sub] + rng.normal(size=(n, D)) * 1.0, y


def fit_one(solve: str, n: int, m: int, seed: int, device: str, queue: "mp.Queue") -> None:
    import torch
    from common import peak_rss_mb

    from carrot.ridge.gram import KERNELS
    from carrot.ridge.kernel import KernelRidgeHead

    torch.manual_seed(0)
    G, y = mixture(n + TEST, seed)
    Gt, yt, G, y = G[n:], y[n:], G[:n], y[:n]
    Z = (G - G.mean(0)) / G.std(0)  # the head's preprocessing (standardised, L2-normalised), for the median heuristic
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    gamma = KERNELS["rbf"].median(torch.as_tensor(Z))
    head = KernelRidgeHead(kernel="rbf", gamma=gamma, lam="auto", approx=solve, n_landmarks=m or 1, device=device)  # m: ignored by exact
    t0 = time.perf_counter()
    head.fit(G, y)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = head.decision_function(Gt)
    predict_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loo = head.system().loo_logits()
    loo_s = time.perf_counter() - t0
    queue.put({"solve": solve, "n": n, "m": m if solve == "nystroem" else None, "seed": seed, "gamma": gamma,
               "lam": head.lam_, "fit_seconds": fit_s, "predict_seconds_2000": predict_s, "loo_seconds": loo_s,
               "test_accuracy": float((logits.argmax(1) == yt).mean()),
               "loo_accuracy": float((loo.argmax(1).numpy() == y).mean()),
               "peak_rss_gib": peak_rss_mb() / 1024,
               "predictions": logits.argmax(1).tolist()})


def run(solve: str, n: int, m: int, seed: int, device: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fit_one, args=(solve, n, m, seed, device, q))
    p.start()
    while True:  # a child that dies (an error, out of memory) ends the benchmark instead of hanging it
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                sys.exit(f"{solve} n={n} m={m}: the fit process died (exit code {p.exitcode})")
    p.join()
    return out


def main() -> None:
    from common import device_name, write_results

    from carrot.ridge.kernel import DUAL_ARRAYS, LOW_RANK_ARRAYS, NYSTROEM_ABOVE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 4000, 8000], help="exact and Nystroem")
    ap.add_argument("--nystroem-n", type=int, nargs="*", default=[16000, 32000], help="Nystroem only")
    ap.add_argument("--landmarks", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="the head's device for the n x n (n x m) work: cpu, cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_scale"))
    args = ap.parse_args()
    rows = []
    for n in args.n + args.nystroem_n:
        exact = run("exact", n, 0, args.seed, args.device) if n in args.n else None
        reference = None if exact is None else np.asarray(exact["predictions"])
        for r in ([exact] if exact else []) + [run("nystroem", n, m, args.seed, args.device) for m in args.landmarks if m < n]:
            if reference is not None:
                r["agreement_with_exact"] = float(np.mean(np.asarray(r["predictions"]) == reference))
            r["planned_gib"] = (DUAL_ARRAYS * 8 * n * n if r["solve"] == "exact" else LOW_RANK_ARRAYS * 8 * n * r["m"]) / 2**30
            r.pop("predictions")
            rows.append(r)
            print(f"n {n} {r['solve']}{'' if r['m'] is None else ' m=' + str(r['m'])}: fit {r['fit_seconds']:.1f} s, "
                  f"test {r['test_accuracy']:.4f}, LOO {r['loo_accuracy']:.4f}, "
                  f"agreement {r.get('agreement_with_exact', float('nan')):.4f}, peak {r['peak_rss_gib']:.2f} GiB", flush=True)
    import torch

    print(write_results(args.out, rows, benchmark="kernel_scale", dim=D, classes=CLASSES, n_test=TEST,
                        nystroem_above=NYSTROEM_ABOVE, device=device_name(args.device), threads=torch.get_num_threads(),
                        python=platform.python_version(), torch=torch.__version__))


if __name__ == "__main__":
    main()
