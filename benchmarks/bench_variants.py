"""The seeds' CARROT variants on the real embedded data (ELPV, built-in DINOv2), mean +- std over
3 stratified splits of all 2,624 images: label-safe augmentation (ridge analytic per-sample and
per-class, CE sampled) vs none; RRO with and without the attribution-consistency term; the dataset
debugging loop (drop the K images most harmful to validation vs K random); TracIn vs exact LOO.

    python benchmarks/bench_variants.py --seeds 0 1 2
    python benchmarks/bench_variants.py --data-kind fashion-mnist --max-per-class 150 --backbone efficientnet_lite0 \
        --out benchmarks/results/variants_fashion-mnist.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from carrot.run import commands as orchestration
    from carrot.ridge.augment import AugmentConfig, augmented_softmax, fit_augmented_ridge
    from carrot.ridge.baselines import SoftmaxHead
    from carrot.config import RunConfig
    from carrot.data import stratified_indices
    from carrot.audit.debugging import debug_loop
    from carrot.ridge.head import RidgeHead
    from carrot.run.pipeline import Carrot
    from carrot.audit.reweight import RROConfig, rro
    from carrot.audit.tracin import tracin_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ce-lam", type=float, default=1e-3)
    ap.add_argument("--data-kind", default="elpv", help="a data set carrot reads without a root: elpv or fashion-mnist")
    ap.add_argument("--max-per-class", type=int, default=None, help="cap per class (fashion-mnist: in each split)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "variants.json"))
    a = ap.parse_args()
    cfg = RunConfig().merged({"backbone.name": a.backbone, "data.kind": a.data_kind, "data.max_per_class": a.max_per_class,
                              "backbone.blocks": 1, "backbone.global_tokens": False})  # the last block's tokens
    stores, train, _ = orchestration.extract_splits(cfg, progress=True)
    model = Carrot(cfg)
    G_all = np.concatenate([model.embed_store(s) for s in stores])
    y_all = np.concatenate([s.labels for s in stores])
    res: dict[str, list[float]] = {}

    def add(key, v):
        res.setdefault(key, []).append(float(v))

    for seed in a.seeds:
        itr, ite = stratified_indices(y_all, train.classes, 0.25, seed)
        fit_pos, val_pos = stratified_indices(y_all[itr], train.classes, 0.2, seed)
        ifit, ival = itr[fit_pos], itr[val_pos]
        G, y, Gt, yt = G_all[itr], y_all[itr], G_all[ite], y_all[ite]
        plain = RidgeHead(lam="auto").fit(G, y)
        lam = plain.lam_
        add("ridge_accuracy", (plain.predict(Gt) == yt).mean())
        for level in ("sample", "class"):
            aug, plan = fit_augmented_ridge(G, y, lam, AugmentConfig(level=level))
            add(f"ridge_augmented_{level}_accuracy", (aug.predict(Gt) == yt).mean())
            add(f"ridge_augmented_{level}_mean_alpha", float(plan.alpha.mean()))
        ce = SoftmaxHead(lam=a.ce_lam).fit(G, y)
        add("ce_accuracy", (ce.predict(Gt) == yt).mean())
        ce_aug, _ = augmented_softmax(G, y, a.ce_lam, AugmentConfig(), m=4, seed=seed)
        add("ce_augmented_accuracy", (ce_aug.predict(Gt) == yt).mean())
        for name, cons in (("rro", 0.0), ("rro_consistency", 5.0)):
            r = rro(G_all[ifit], y_all[ifit], G_all[ival], y_all[ival], lam, RROConfig(consistency=cons, seed=seed), Gt, yt)
            add(f"{name}_uniform_test_accuracy", r.history[0]["test_accuracy"])
            add(f"{name}_test_accuracy", r.history[r.best_step]["test_accuracy"])
            last = [h["consistency"] for h in r.history if h["consistency"] is not None]
            add(f"{name}_consistency_start", last[0])
            add(f"{name}_consistency_end", last[-1])
        dbg = debug_loop(G_all[ifit], y_all[ifit], G_all[ival], y_all[ival], Gt, yt, lam, ks=(20, 50), seed=seed)
        add("debug_baseline_test_accuracy", dbg["baseline"]["test_accuracy"])
        for row in dbg["rows"]:
            add(f"debug_drop{row['k']}_test_accuracy", row["test_accuracy"])
            add(f"debug_drop{row['k']}_random_test_accuracy", row["random_test_accuracy_mean"])
        rep = tracin_report(G, y, [str(i) for i in itr], train.classes, Gt, yt, [str(i) for i in ite], lam, n_test=5,
                            tracin={"seed": seed})
        add("tracin_spearman_with_exact_loo_loss", rep["summary"]["comparison_with_carrot"]["spearman_self_influence_vs_exact_loo_loss"])
        add("tracin_flag_overlap_with_exact_loo", rep["summary"]["comparison_with_carrot"]["flag_overlap_with_exact_loo"])
        print(json.dumps({k: v[-1] for k, v in res.items()}), flush=True)
    summary = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
               for k, v in res.items()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backbone": a.backbone, "data_kind": a.data_kind, "seeds": a.seeds, "n_images": int(len(y_all)),
                               "results": summary}, indent=2))
    print(json.dumps({k: (round(v["mean"], 4), round(v["std"], 4)) for k, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
