"""Seconds per image of the pixel maps (``explain --pixel-map``) on a device: the Shapley map (the default, K orders,
its removal and blocks), the path-integrated split and exact cell occlusion, for the built-in backbones at their input
size, under the removals asked for (``auto``: explain's default for the backbone).

The cost of a map is the whole model's runs (and, for the split, backward passes): K (P - 1) + 2 runs for the
Shapley map of P players, N + 1 for occlusion, ``nodes`` forward + backward passes for the split (N cells); a run
that drops tokens runs on the kept ones only. It does not depend on
the weights, so the backbones are built without pretrained weights (no download: the GPU machine is offline) and the
head is a ridge head fitted on random embeddings of the right width. ``bench_pixels.py`` measures what the maps are
worth (deletion / insertion AUC) on real runs; this script measures what they cost, on the CPU or a GPU.

    python benchmarks/bench_pixel_cost.py --device cuda --backbones dinov2_vits14 efficientnet_lite0 --images 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import device_name, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from carrot.attribution.pixels import auto_block, cell_blocks, occlusion_map, path_split, shapley_map
    from carrot.config import RunConfig
    from carrot.ridge.head import RidgeHead
    from carrot.run.pipeline import Carrot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbones", nargs="+", default=["dinov2_vits14", "efficientnet_lite0"])
    ap.add_argument("--img-size", type=int, default=None, help="input side (default: each backbone's own)")
    ap.add_argument("--images", type=int, default=2, help="images timed per map (after one warm-up image)")
    ap.add_argument("--maps", nargs="+", default=["shapley", "split", "occlusion"], choices=["shapley", "split", "occlusion"])
    ap.add_argument("--permutations", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None, help="runs per forward pass (default: the removal's own)")
    ap.add_argument("--removal", nargs="+", default=["auto"], help="removals timed (auto: explain's default)")
    ap.add_argument("--block", default="auto", help="the Shapley map's block side (auto: explain's default)")
    ap.add_argument("--precision", nargs="+", default=["float32", "auto"], choices=["auto", "float32", "bfloat16"],
                    help="backbone.precision values timed (auto: bfloat16 where the CPU multiplies it natively)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pixel_cost"))
    a = ap.parse_args()
    rows = []
    for name, precision, removal in ((n, p, r) for n in a.backbones for p in a.precision for r in a.removal):
        cfg = RunConfig().merged({"backbone.name": name, "backbone.pretrained": False, "backbone.img_size": a.img_size,
                                  "device": a.device, "head.kind": "ridge", "backbone.precision": precision,
                                  "backbone.blocks": 1, "backbone.global_tokens": False})  # the last block's embedding (the maps' cost is the backbone's)
        model = Carrot(cfg)
        size = model.backbone.data_config["input_size"]
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(a.images + 1, *size, generator=g).to(model.backbone.device)
        with torch.no_grad():
            H, grid = model.backbone(xs[:1])
        D, C = H.shape[-1], 5
        rng = np.random.default_rng(0)
        model.head_ = RidgeHead(lam=1.0).fit(rng.normal(size=(4 * D, D)), np.arange(4 * D) % C)
        removal = model.pixel_removal(removal)
        block = auto_block(grid) if a.block == "auto" else int(a.block)
        runs = {"shapley": lambda x: shapley_map(model.cell_game(x, grid, removal), 0, a.permutations, batch=a.batch,
                                                 block=block),
                "split": lambda x: path_split(model.torch_logits, x, 0, grid),
                "occlusion": lambda x: occlusion_map(model.cell_game(x, grid, removal), 0, batch=a.batch)}
        for m in a.maps:
            runs[m](xs[0])  # warm-up: kernels, allocator
            secs = []
            for x in xs[1:]:
                if model.backbone.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                runs[m](x)
                if model.backbone.device.type == "cuda":
                    torch.cuda.synchronize()
                secs.append(time.perf_counter() - t0)
            n = grid[0] * grid[1]
            players = int(cell_blocks(grid, block).max()) + 1
            passes = {"shapley": a.permutations * (players - 1) + 2, "occlusion": n + 1, "split": 32}[m]
            row = {"backbone": name, "precision": model.backbone.precision, "input": list(size), "grid": list(grid),
                   "map": m, "removal": "blur" if m == "split" else removal, "block": block if m == "shapley" else None,
                   "device": a.device,
                   "device_name": device_name(a.device), "seconds_per_image": float(np.mean(secs)),
                   "seconds_per_image_std": float(np.std(secs, ddof=1)) if len(secs) > 1 else None,
                   "passes": passes, "images": len(secs), "permutations": a.permutations if m == "shapley" else None}
            rows.append(row)
            print(row, flush=True)
    write_results(a.out, rows, args=vars(a))


if __name__ == "__main__":
    main()
