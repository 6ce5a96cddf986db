"""Attribution quality on a fitted run of real data (default: the ELPV demo run, built-in DINOv2): mislabel
detection with flipped labels (carrot exact scores vs TracIn self-influence vs plain loss), agreement
with exact LOO, LDS and faithfulness, over several seeds. Fits the demo run first if it is missing.

    python benchmarks/bench_elpv_attribution.py --run runs/demo --seeds 0 1 2
    python benchmarks/bench_elpv_attribution.py --run runs/fashion-mnist --out benchmarks/results/attribution_fashion-mnist.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA_NAMES = {"elpv": "ELPV (elpv-dataset)", "fashion-mnist": "Fashion-MNIST (Debian dataset-fashion-mnist)"}


def main() -> None:
    from carrot.run import commands as orchestration
    from carrot.config import RunConfig
    from carrot.audit.evaluate import evaluate_embeddings
    from carrot.run.operations import run_embeddings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--flip-fraction", type=float, default=0.1)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "elpv_attribution.json"))
    a = ap.parse_args()
    if not (Path(a.run) / "run.json").is_file():
        orchestration.fit(RunConfig(), a.run)
    model, G, y, G_test, _ = run_embeddings(a.run)
    per_seed = []
    for seed in a.seeds:
        t = time.perf_counter()
        res = evaluate_embeddings(G, y, G_test, model.head_.lam_, flip_fraction=a.flip_fraction, n_test=a.n_test,
                                  n_subsets=a.subsets, seed=seed, tracin={"seed": seed})
        res["seconds"] = time.perf_counter() - t
        per_seed.append(res)
        print(f"seed {seed}: {res['seconds']:.1f} s")

    def stat(get):
        v = np.array([get(r) for r in per_seed], dtype=float)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    names = list(per_seed[0]["mislabel"]["results"])
    est = list(per_seed[0]["lds"])
    summary = {
        "data": f"{DATA_NAMES.get(model.config.data.kind, model.config.data.kind)}, backbone {model.config.backbone.name}, "
                f"run {a.run}",
        "data_kind": model.config.data.kind,
        "n_train": per_seed[0]["n_train"], "lam": per_seed[0]["lam"], "seeds": a.seeds, "flip_fraction": a.flip_fraction,
        "mislabel_roc_auc": {k: stat(lambda r, k=k: r["mislabel"]["results"][k]["roc_auc"]) for k in names},
        "mislabel_found_in_top_10pct": {k: stat(lambda r, k=k: r["mislabel"]["results"][k]["found_in_top"]["0.1"]) for k in names},
        "lds": {k: stat(lambda r, k=k: r["lds"][k]) for k in est},
        "spearman_with_exact_loo": {k: stat(lambda r, k=k: r["agreement_with_exact_loo"][k]["spearman"])
                                    for k in per_seed[0]["agreement_with_exact_loo"]},
        "faithfulness_remove_top10_logit_drop": {k: stat(lambda r, k=k: r["faithfulness"][k]["10"]["remove_top"]["logit_drop"])
                                                 for k in per_seed[0]["faithfulness"]},
        "faithfulness_remove_random10_logit_drop": stat(lambda r: r["faithfulness"]["exact_loo"]["10"]["remove_random"]["logit_drop"]),
        "per_seed": per_seed,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_seed"}, indent=2))


if __name__ == "__main__":
    main()
