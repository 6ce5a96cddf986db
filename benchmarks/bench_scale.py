"""Head fit at scale: synthetic features up to n = 1,000,000, D = 768, C = 1000, streamed from a
float32 memmap in chunks (float64 Gram accumulation). Each n runs in a fresh subprocess so its peak
RSS is its own. Writes JSON + CSV; the log-log slope of time vs n is reported (1 = linear).

    python benchmarks/bench_scale.py --n 125000 250000 500000 1000000
    python benchmarks/bench_scale.py --n 125000 250000 --lam auto --out benchmarks/results/scale_auto
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import device_name, peak_rss_mb, write_results

ROOT = Path(__file__).resolve().parents[1]


def make_memmap(path: Path, n: int, d: int, c: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    means = g.normal(size=(c, d)).astype(np.float32) * (4.0 / np.sqrt(d))
    y = g.integers(0, c, n)
    y[:c] = np.arange(c)
    G = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        G[s:e] = means[y[s:e]] + g.standard_normal((e - s, d), dtype=np.float32)
    G.flush()
    np.save(path.with_suffix(".y.npy"), y)
    return y


def child(path: str, lam: float | str, chunk: int, device: str) -> None:
    """Fit one problem and print a JSON row (run in a subprocess)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from carrot.ridge.head import RidgeHead

    base = peak_rss_mb() / 1024
    G = np.load(path, mmap_mode="r")
    y = np.load(Path(path).with_suffix(".y.npy"))
    t = time.perf_counter()
    head = RidgeHead(lam=lam, chunk_size=chunk, device=device).fit(G, y)
    seconds = time.perf_counter() - t
    acc = float((head.predict(np.asarray(G[:20000])) == y[:20000]).mean())
    peak = peak_rss_mb() / 1024
    print(json.dumps({"n": int(G.shape[0]), "d": int(G.shape[1]), "c": int(len(head.classes_)), "seconds_fit": seconds,
                      "peak_rss_gb": peak, "rss_after_imports_gb": base, "train_accuracy_first_20k": acc,
                      "dual_coef_gb": head.dual_coef_.numel() * 8 / 2**30, "torch_threads": torch.get_num_threads(),
                      "device": device, "device_name": device_name(device), "lam": head.lam_,
                      "lam_candidates": len(head.lam_path_["lambdas"]) if head.lam_path_ else 1}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[125_000, 250_000, 500_000, 1_000_000])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--lam", type=lambda v: v if v == "auto" else float(v), default=10.0,
                    help="ridge lambda, or 'auto' (streamed exact LOO over the default grid of 15 values)")
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="where the memmaps go (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.lam, a.chunk, a.device)
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        for n in a.n:
            path = Path(tmp) / f"G_{n}.npy"
            t = time.perf_counter()
            make_memmap(path, n, a.d, a.c)
            gen = time.perf_counter() - t
            r = subprocess.run([sys.executable, __file__, "--child", str(path), "--lam", str(a.lam), "--chunk", str(a.chunk),
                                "--device", a.device], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["seconds_generate"] = gen
            rows.append(row)
            path.unlink()
            print(json.dumps(row), flush=True)
    if len(rows) > 1:
        slope = float(np.polyfit(np.log([r["n"] for r in rows]), np.log([r["seconds_fit"] for r in rows]), 1)[0])
    else:
        slope = float("nan")
    write_results(a.out, rows, loglog_slope_time_vs_n=slope, args=vars(a))
    print(f"log-log slope of fit time vs n: {slope:.3f}")


if __name__ == "__main__":
    main()
