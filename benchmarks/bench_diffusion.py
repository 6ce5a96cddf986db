"""Diffusion cost vs number of regions N: exact batched eigh (all t from one decomposition) vs
Chebyshev (one recurrence per t, and one shared by all t) vs scipy expm_multiply (per image, per t;
the reference), with the error of each
against eigh and the peak memory of each (fresh subprocess per row). Writes JSON + CSV.

    python benchmarks/bench_diffusion.py --N 64 256 576 1024 2304 --batch 8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mb, write_results

ROOT = Path(__file__).resolve().parents[1]
TS = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0]


def child(method: str, n: int, batch: int, d: int, device: str = "cpu") -> None:
    import numpy as np
    import scipy.sparse.linalg
    import torch

    sys.path.insert(0, str(ROOT))
    from carrot.embed.diffusion import SpectralDiffusion, chebyshev_expm_multiply, diffusion_weights
    from carrot.embed.graph import affinity, normalized_laplacian

    base = peak_rss_mb()  # after imports, before any graph is built
    g = torch.Generator().manual_seed(0)
    side = int(round(n**0.5))
    P = torch.stack(torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, n // side), indexing="ij"), -1).reshape(-1, 2)
    H = torch.randn(batch, P.shape[0], d, generator=g, dtype=torch.float64)
    dev = torch.device(device if method != "scipy_expm_multiply" else "cpu")  # scipy runs on the CPU

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    H, P = H.to(dev), P.double().to(dev)
    if dev.type == "cuda":  # first use of the kernels outside the timing
        normalized_laplacian(affinity(H[:1], P))
        sync()
    tg = time.perf_counter()
    L = normalized_laplacian(affinity(H, P))
    sync()
    graph_seconds = time.perf_counter() - tg
    after_graph = peak_rss_mb()
    ones = torch.ones(batch, L.shape[1], 1, dtype=torch.float64, device=dev)

    def run():
        if method == "eigh":
            return SpectralDiffusion.from_laplacian(L).readout_weights(TS)
        if method == "chebyshev":
            return torch.stack([chebyshev_expm_multiply(L, ones, tt)[..., 0] for tt in TS]) / L.shape[1]
        if method == "chebyshev_all_t":
            return diffusion_weights(L, TS, "chebyshev")
        return torch.from_numpy(np.stack([np.stack([scipy.sparse.linalg.expm_multiply(-tt * L[b].numpy(), np.ones(L.shape[1]))
                                                    for b in range(batch)]) for tt in TS]) / L.shape[1])

    if dev.type == "cuda":
        run()
        sync()
    t = time.perf_counter()
    w = run()
    sync()
    seconds = time.perf_counter() - t
    w, L = w.cpu(), L.cpu()
    ref = SpectralDiffusion.from_laplacian(L).readout_weights(TS)
    err = float(((w - ref).abs().max() / ref.abs().max()))
    peak = peak_rss_mb()
    print(json.dumps({"method": method, "device": str(dev), "N": int(L.shape[1]), "batch": batch, "n_t": len(TS), "seconds": seconds,
                      "graph_seconds_per_image": graph_seconds / batch,
                      "seconds_per_image": seconds / batch, "max_rel_error_vs_eigh": err,
                      "peak_rss_mb": peak, "rss_after_imports_mb": base, "peak_rss_graph_only_mb": after_graph,
                      "method_extra_peak_mb": peak - after_graph}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, nargs="+", default=[64, 256, 576, 1024, 2304])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diffusion"))
    ap.add_argument("--device", default="cpu", help="where the graph and the torch methods run (scipy always on the CPU)")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), a.batch, a.d, a.device)
        return
    rows = []
    for n in a.N:
        for method in ("eigh", "chebyshev", "chebyshev_all_t", "scipy_expm_multiply"):
            r = subprocess.run([sys.executable, __file__, "--child", method, str(n), "--batch", str(a.batch), "--d", str(a.d),
                                "--device", a.device],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        ref = next(x for x in rows if x["N"] == r["N"] and x["method"] == "scipy_expm_multiply")
        r["speedup_vs_scipy"] = ref["seconds"] / r["seconds"]
    write_results(a.out, rows, t_values=TS, args=vars(a))


if __name__ == "__main__":
    main()
