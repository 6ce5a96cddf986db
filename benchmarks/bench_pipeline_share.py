"""Where the per-image time goes: backbone forward vs graph + diffusion + readout vs head prediction
and exact attribution, for both built-in backbones on real ELPV images. Writes JSON + CSV.

    python benchmarks/bench_pipeline_share.py --images 32 --batch 16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from carrot.attribution.representer import centred_kernel
    from carrot.features.backbone import patch_centres
    from carrot.config import RunConfig
    from carrot.data import load_elpv, load_image
    from carrot.ridge.head import RidgeHead
    from carrot.run.pipeline import Carrot
    from carrot.features.regions import RegionSet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["dinov2_vits14", "efficientnet_lite0"])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=2000, help="training-set size for the attribution step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_share"))
    a = ap.parse_args()
    train, _ = load_elpv()
    recs = train.records[: a.images]
    rows = []
    for name in a.backbones:
        model = Carrot(RunConfig().merged({"backbone.name": name, "device": "cpu", "backbone.blocks": 1, "backbone.global_tokens": False}))
        bb = model.backbone
        tf = bb.transform()
        t0 = time.perf_counter()
        x = torch.stack([tf(load_image(r)) for r in recs])
        t_load = time.perf_counter() - t0
        bb(x[:2])  # warm-up (allocator, kernels)
        t0 = time.perf_counter()
        Hs = [bb(x[s : s + a.batch])[0] for s in range(0, len(x), a.batch)]
        t_backbone = time.perf_counter() - t0
        H = torch.cat(Hs).to(torch.float64)
        grid = bb(x[:1])[1]
        model.embed_regions(RegionSet(H[:2], patch_centres(grid, torch.float64), grid))  # warm-up
        t0 = time.perf_counter()
        G = torch.cat([model.embed_regions(RegionSet(H[s : s + a.batch], patch_centres(grid, torch.float64), grid))[0]
                       for s in range(0, len(H), a.batch)])
        t_graph = time.perf_counter() - t0
        g = np.random.default_rng(0)
        Gtr = g.normal(size=(a.n_train, G.shape[1])) + G.mean(0).numpy()
        head = RidgeHead(lam=1.0).fit(Gtr, g.integers(0, 8, a.n_train))
        t0 = time.perf_counter()
        logits = head.decision_function(G.numpy())
        K = centred_kernel(head, Gtr, G.numpy())
        contrib = K.unsqueeze(-1) * head.dual_coef_.unsqueeze(0)
        t_head = time.perf_counter() - t0
        total = t_load + t_backbone + t_graph + t_head
        row = {"backbone": name, "N": int(H.shape[1]), "D": int(H.shape[2]), "images": len(recs),
               "ms_per_image_load_preprocess": 1e3 * t_load / len(recs), "ms_per_image_backbone": 1e3 * t_backbone / len(recs),
               "ms_per_image_graph_diffusion_readout": 1e3 * t_graph / len(recs),
               "ms_per_image_head_and_attribution": 1e3 * t_head / len(recs),
               "post_backbone_share": (t_graph + t_head) / total, "contrib_shape": list(contrib.shape), "logits": list(logits.shape)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(a.out, rows, threads=torch.get_num_threads(), args=vars(a))


if __name__ == "__main__":
    main()
