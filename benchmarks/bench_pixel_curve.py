"""Faithfulness against seconds for the Shapley pixel map's settings: the number of sampled orders K and the size of
the players (blocks of b x b cells), each scored by the pixel protocol (deletion / insertion AUC, cells blurred in
map order over 16 steps) on the same test images of a run, paired against today's default (b = 1, K = 4).

The cost of a setting is K (P - 1) + 2 forward passes of the whole model for P = ceil(gh / b) ceil(gw / b) players;
its seconds are wall time on this machine. Only images whose blurred version scores the class lower are used
(the others have nothing to delete). Lower deletion and higher insertion AUC are more faithful.

    python benchmarks/bench_pixel_curve.py --run runs/demo --images 8 --settings b1k4 b1k2 b2k4 b2k2 b4k8 b4k4
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = "b1k4"  # explain's default until now: every cell a player, 4 orders


def parse(setting: str) -> tuple[int, int]:
    m = re.fullmatch(r"b(\d+)k(\d+)", setting)
    if not m:
        raise SystemExit(f"--settings: expected b<block>k<orders> such as b2k4, got {setting!r}")
    return int(m.group(1)), int(m.group(2))


def main() -> None:
    from common import device_name, write_results

    from carrot.attribution.pixels import blur_ends, deletable, pixel_curves, pooled, shapley_map
    from carrot.audit.protocols import image_regions
    from carrot.progress import set_quiet
    from carrot.run.pipeline import Carrot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--images", type=int, default=8, help="deletable test images scored")
    ap.add_argument("--settings", nargs="+", default=["b1k4", "b1k2", "b2k4", "b2k2", "b4k8", "b4k4"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: results/pixel_curve_<data>_<backbone>")
    a = ap.parse_args()
    settings = list(dict.fromkeys([REFERENCE, *a.settings]))
    set_quiet(True)
    model = Carrot.load(a.run)
    rng = np.random.default_rng(a.seed)
    order = rng.permutation(len(model.test_records_))
    auc = {s: {"deletion": [], "insertion": []} for s in [*settings, "random"]}
    secs: dict[str, list[float]] = {s: [] for s in settings}
    spans, used = [], []
    t_all = time.perf_counter()
    for i in order.tolist():
        if len(used) == a.images:
            break
        x, H, w, grid, c = image_regions(model, model.test_records_[i][0])
        full, blurred = blur_ends(model.pixel_logits, x, c, grid)
        if not deletable(full, blurred):
            continue
        used.append(i)
        spans.append(full - blurred)
        for s in settings:
            block, K = parse(s)
            t0 = time.perf_counter()
            phi, _ = shapley_map(model.pixel_logits, x, c, grid, permutations=K, block=block, seed=a.seed)
            secs[s].append(time.perf_counter() - t0)
            cur = pixel_curves(model.pixel_logits, x, c, grid, np.argsort(-phi.ravel(), kind="stable"), a.steps)
            auc[s]["deletion"].append(cur.auc("deletion"))
            auc[s]["insertion"].append(cur.auc("insertion"))
        cur = pixel_curves(model.pixel_logits, x, c, grid, rng.permutation(grid[0] * grid[1]), a.steps)
        auc["random"]["deletion"].append(cur.auc("deletion"))
        auc["random"]["insertion"].append(cur.auc("insertion"))
        print(f"[{len(used)}/{a.images}] {time.perf_counter() - t_all:.0f} s: " + ", ".join(
            f"{s} {np.mean(secs[s]):.1f} s {pooled(auc[s]['deletion'], spans)['mean']:.3f}" for s in settings), flush=True)
    rows = []
    ref = np.asarray(auc[REFERENCE]["deletion"])
    for s in [*settings, "random"]:
        block, K = parse(s) if s != "random" else (None, None)
        d = np.asarray(auc[s]["deletion"]) - ref
        row = {"setting": s, "block": block, "orders": K, "images": len(used),
               "players": None if block is None else int(-(-grid[0] // block) * -(-grid[1] // block)),
               "seconds_per_map": float(np.mean(secs[s])) if s in secs else 0.0,
               "deletion": pooled(auc[s]["deletion"], spans)["mean"],
               "deletion_sem": pooled(auc[s]["deletion"], spans)["sem"],
               "insertion": pooled(auc[s]["insertion"], spans)["mean"],
               "insertion_sem": pooled(auc[s]["insertion"], spans)["sem"],
               "deletion_minus_reference": float(d.mean()),
               "deletion_minus_reference_sem": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
               "better_than_reference": int((d < 0).sum()), "per_image_deletion": auc[s]["deletion"]}
        if row["players"] is not None:
            row["passes"] = K * (row["players"] - 1) + 2
        rows.append(row)
    out = a.out or str(ROOT / "benchmarks" / "results" /
                       f"pixel_curve_{model.config.data.kind}_{model.config.backbone.name}")
    print(write_results(out, rows, run=str(a.run), data=model.config.data.kind, backbone=model.config.backbone.name,
                        grid=list(grid), spans=spans, test_rows=used, steps=a.steps,
                        precision=model.backbone.precision, device=device_name("cpu"),
                        threads=os.environ.get("OMP_NUM_THREADS", "all"), seconds_total=time.perf_counter() - t_all))


if __name__ == "__main__":
    main()
