"""Backbone throughput of the token extraction as a user runs it (decode, timm's transform, the forward pass, the
float16 cache write), float32 against bfloat16 autocast (`backbone.precision`), measured in the same process on the
same ELPV images, alternating rounds so that drift hits both; with the tokens' relative error against float32.

    python benchmarks/bench_backbone.py --images 256 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch
    from common import device_name, write_results

    from carrot.config import RunConfig
    from carrot.data import load_splits
    from carrot.features.backbone import create_backbone
    from carrot.features.cache import extract

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["dinov2_vits14", "efficientnet_lite0"])
    ap.add_argument("--images", type=int, default=256, help="ELPV training images extracted per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating float32 / bfloat16 rounds")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "backbone_speed"))
    a = ap.parse_args()
    train, _ = load_splits(RunConfig())
    subset = train.subset(range(min(a.images, len(train))))
    rows = []
    for name in a.backbones:
        nets = {p: create_backbone(name, device="cpu", precision=p) for p in ("float32", "bfloat16")}
        seconds: dict[str, list[float]] = {p: [] for p in nets}
        tokens: dict[str, np.ndarray] = {}
        for net in nets.values():  # warm-up: the first batches of a process are slower
            with tempfile.TemporaryDirectory() as cache:
                extract(net, subset.subset(range(a.batch)), cache, batch_size=a.batch, progress=False)
        for _ in range(a.rounds):
            for p, net in nets.items():
                with tempfile.TemporaryDirectory() as cache:
                    t0 = time.perf_counter()
                    store = extract(net, subset, cache, batch_size=a.batch, progress=False)
                    seconds[p].append(time.perf_counter() - t0)
                    tokens[p] = np.asarray(store.tokens, dtype=np.float32)
        ref, bf = tokens["float32"], tokens["bfloat16"]
        rel = float(np.linalg.norm(bf - ref) / np.linalg.norm(ref))
        for p in nets:
            best = min(seconds[p])
            rows.append({"backbone": name, "precision": p, "images": len(subset), "seconds": best,
                         "images_per_second": len(subset) / best, "speedup": min(seconds["float32"]) / best,
                         "token_rel_error_vs_float32": 0.0 if p == "float32" else rel,
                         "rounds": seconds[p]})
            print(f"{name} {p}: {len(subset) / best:.2f} img/s ({min(seconds['float32']) / best:.2f}x), "
                  f"tokens rel. error {rows[-1]['token_rel_error_vs_float32']:.4f}", flush=True)
    print(write_results(a.out, rows, device=device_name("cpu"), threads=os.environ.get("OMP_NUM_THREADS", "all"),
                        torch=torch.__version__, batch=a.batch))


if __name__ == "__main__":
    main()
