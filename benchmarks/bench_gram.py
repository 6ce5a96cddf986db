"""Gram accumulation throughput on a device: the streamed G^T A G + G^T A Y of the ridge head, against
the same device's measured matmul peak (a large square matmul in the same dtype, same run).
Records device name, dtype and the achieved fraction. Run it with --device cuda on a GPU.

    python benchmarks/bench_gram.py --device cuda --dtype float64 float32 --n 200000 --d 768 --c 1000
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dev: torch.device, dtype: torch.dtype, size: int, reps: int = 5) -> float:
    """Best GFLOP/s of a size x size matmul (the device's practical peak for this dtype)."""
    A = torch.randn(size, size, device=dev, dtype=dtype)
    B = torch.randn(size, size, device=dev, dtype=dtype)
    A @ B
    sync(dev)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        A @ B
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def gram_rate(dev: torch.device, dtype: torch.dtype, n: int, d: int, c: int, chunk: int) -> tuple[float, float]:
    """(seconds, GFLOP/s) of accumulating G^T A G and G^T A Y over n rows in chunks, data already on device."""
    G = torch.randn(min(n, chunk), d, device=dev, dtype=dtype)
    Y = torch.nn.functional.one_hot(torch.randint(0, c, (G.shape[0],), device=dev), c).to(dtype)
    a = torch.rand(G.shape[0], device=dev, dtype=dtype)
    M = torch.zeros(d, d, device=dev, dtype=dtype)
    B = torch.zeros(d, c, device=dev, dtype=dtype)
    sync(dev)
    t = time.perf_counter()
    for _ in range(0, n, chunk):
        aG = G * a.unsqueeze(1)
        M += aG.T @ G
        B += aG.T @ Y
    sync(dev)
    s = time.perf_counter() - t
    return s, 2 * n * d * (d + c) / s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=["float64", "float32"])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--peak-size", type=int, default=4096)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    rows = []
    for dt in a.dtype:
        dtype = getattr(torch, dt)
        peak = matmul_peak(dev, dtype, a.peak_size if dev.type == "cuda" else min(a.peak_size, 2048))
        s, rate = gram_rate(dev, dtype, a.n, a.d, a.c, a.chunk)
        rows.append({"device": str(dev), "device_name": name, "dtype": dt, "n": a.n, "d": a.d, "c": a.c, "seconds": s,
                     "gram_gflops": rate, "matmul_peak_gflops": peak, "fraction_of_peak": rate / peak,
                     "torch": torch.__version__, "threads": torch.get_num_threads()})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"gram_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
