"""Faithfulness against seconds for the Shapley pixel map's settings: how a cell is removed in the game the map is
built on (blur, mean colour, inpainting, or for ViTs dropping its tokens), the number of sampled orders K and the size of the
players (blocks of b x b cells). Every map is scored by the pixel protocol under every removal the backbone allows
(cells removed (deletion) or kept with the rest removed (insertion) in map order over 16 steps), on the same test
images of a run, paired against the default until the removals came (blur:b1k4), so no map is judged only on its own
ground.

The cost of a setting is K (P - 1) + 2 runs of the whole model for P = ceil(gh / b) ceil(gw / b) players (a run that
drops tokens runs on the kept ones only); its seconds are wall time on this machine. Numbers per scoring removal: the
raw area under the logit's deletion curve (mean over every image, nothing left out; lower is better), the scaled AUC
(1 at the image, 0 with every cell removed, pooled over the images weighted by that span; images where removing
everything does not lower the logit left out), and each map's per-image raw deletion difference from the
reference with its s.e. and the images on which it is lower.

    python benchmarks/bench_pixel_curve.py --run runs/demo --images 8 --settings blur:b1k4 drop:b1k4 drop:b2k4
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

REFERENCE = "blur:b1k4"  # explain's default until now: blur, every cell a player, 4 orders


def parse(setting: str, flag: str = "--settings") -> tuple[str, int, int]:
    """A Shapley setting <removal>:b<block>k<orders> as (removal, block, orders)."""
    m = re.fullmatch(r"(blur|mean|inpaint|drop):b(\d+)k(\d+)", setting)
    if not m:
        raise SystemExit(f"{flag}: expected <removal>:b<block>k<orders> such as drop:b2k4, got {setting!r}")
    return m.group(1), int(m.group(2)), int(m.group(3))


def main() -> None:
    from common import device_name, write_results

    from carrot.attribution.pixels import shapley_map
    from carrot.audit.protocols import CURVE_KEYS, curve_summary, image_regions, paired, removals_of, score_orders
    from carrot.progress import set_quiet
    from carrot.run.pipeline import Carrot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--images", type=int, default=8, help="test images scored (seeded random, none left out)")
    ap.add_argument("--settings", nargs="+", default=["blur:b1k4", "drop:b1k4", "drop:b2k4", "drop:b2k2", "blur:b2k4"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: results/pixel_curve_<data>_<backbone>")
    a = ap.parse_args()
    set_quiet(True)
    model = Carrot.load(a.run)
    scorers = removals_of(model)
    settings = [s for s in dict.fromkeys([REFERENCE, *a.settings]) if parse(s)[0] in scorers]
    rng = np.random.default_rng(a.seed)
    rows_used = np.sort(rng.permutation(len(model.test_records_))[: a.images]).tolist()
    names = [*settings, "random"]
    auc = {r: {s: {k: [] for k in CURVE_KEYS} for s in names} for r in scorers}
    spans: dict[str, list[float]] = {r: [] for r in scorers}
    secs: dict[str, list[float]] = {s: [] for s in settings}
    t_all = time.perf_counter()
    grid = None
    for n, i in enumerate(rows_used):
        x, H, w, grid, c = image_regions(model, model.test_records_[i][0])
        games = {r: model.cell_game(x, grid, r) for r in scorers}
        for r, g in games.items():
            full, removed = (e[c] for e in g.ends())
            spans[r].append(float(full - removed))
        orders = {"random": rng.permutation(grid[0] * grid[1])}
        for s in settings:
            removal, block, K = parse(s)
            t0 = time.perf_counter()
            phi, _ = shapley_map(model.cell_game(x, grid, removal), c, permutations=K, block=block, seed=a.seed)
            secs[s].append(time.perf_counter() - t0)
            orders[s] = np.argsort(-phi.ravel(), kind="stable")
        score_orders(games, c, orders, a.steps, auc)
        print(f"[{n + 1}/{len(rows_used)}] {time.perf_counter() - t_all:.0f} s: " + "; ".join(
            f"{s} {np.mean(secs[s]):.1f} s " + " ".join(f"{r} {np.mean(auc[r][s]['raw_deletion']):+.3f}" for r in scorers)
            for s in settings), flush=True)
    rows = []
    for s in names:
        removal, block, K = parse(s) if s != "random" else (None, None, None)
        row = {"setting": s, "removal": removal, "block": block, "orders": K, "images": len(rows_used),
               "players": None if block is None else int(-(-grid[0] // block) * -(-grid[1] // block)),
               "seconds_per_map": float(np.mean(secs[s])) if s in secs else 0.0}
        if row["players"] is not None:
            row["passes"] = K * (row["players"] - 1) + 2
        for r in scorers:
            for k, v in curve_summary(auc[r][s], spans[r]).items():
                row[f"{r}_{k}"], row[f"{r}_{k}_sem"] = v["mean"], v["sem"]
            if s != REFERENCE:
                d = paired({REFERENCE: auc[r][REFERENCE]["raw_deletion"], s: auc[r][s]["raw_deletion"]}, REFERENCE)[s]
                row[f"{r}_raw_deletion_minus_reference"], row[f"{r}_raw_deletion_minus_reference_sem"] = d["mean"], d["sem"]
                row[f"{r}_lower_than_reference"] = d["lower"]
            row[f"{r}_per_image_raw_deletion"] = auc[r][s]["raw_deletion"]
        rows.append(row)
    out = a.out or str(ROOT / "benchmarks" / "results" /
                       f"pixel_curve_{model.config.data.kind}_{model.config.backbone.name}")
    print(write_results(out, rows, run=str(a.run), data=model.config.data.kind, backbone=model.config.backbone.name,
                        embedding=model.metrics_.get("embedding"),
                        grid=list(grid), removals=list(scorers), reference=REFERENCE, spans=spans, test_rows=rows_used,
                        steps=a.steps, precision=model.backbone.precision, device=device_name("cpu"),
                        threads=os.environ.get("OMP_NUM_THREADS", "all"), seconds_total=time.perf_counter() - t_all))


if __name__ == "__main__":
    main()
