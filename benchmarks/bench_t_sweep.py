"""Diffusion time t and graph bandwidths on the real embedded data (ELPV), both built-in backbones.

Bandwidths vary one at a time around the median heuristics (sigma_feat with sigma_space = median, then
sigma_space with sigma_feat = median). For every (backbone, bandwidths, t): test accuracy mean +- std over 3 stratified splits of all 2,624
images (lambda by exact LOO on each training split), attribution concentration (share of the total
|contribution| to the predicted logit held by the top-10 training images) and the region deletion AUC
(regions removed in order of their exact contribution, pooled over the images as sum(AUC - prior) /
sum(logit - prior); random order for reference). One eigendecomposition per image serves all t. Writes JSON + CSV and a plot.

    python benchmarks/bench_t_sweep.py --backbones dinov2_vits14 efficientnet_lite0
    python benchmarks/bench_t_sweep.py --data-kind fashion-mnist --max-per-class 150 --out benchmarks/results/t_sweep_fashion-mnist
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SharedTokens:
    """A frozen backbone whose tokens of each distinct input batch are computed once (keyed by the input's bytes)
    and kept in the cache dtype, which is lossless for the pipeline (it rounds tokens to that dtype), up to
    ``max_bytes``; every other attribute is the backbone's own."""

    def __init__(self, backbone, dtype: torch.dtype, max_bytes: float) -> None:
        self.inner, self.dtype, self.max_bytes = backbone, dtype, max_bytes
        self.store: dict[bytes, tuple[torch.Tensor, tuple[int, int]]] = {}
        self.bytes = self.hits = self.misses = 0

    def __call__(self, x: torch.Tensor):
        key = hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=20).digest()
        if key in self.store:
            self.hits += 1
            H, grid = self.store[key]
            return H, grid
        self.misses += 1
        H, grid = self.inner(x)
        H = H.to(self.dtype)
        if self.bytes + H.numel() * H.element_size() <= self.max_bytes:
            self.store[key] = (H, grid)
            self.bytes += H.numel() * H.element_size()
        return H, grid

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def main() -> None:
    from carrot.run import commands as orchestration
    from carrot.attribution.representer import centred_kernel, region_contributions
    from carrot.config import DiffusionConfig, GraphConfig, RunConfig
    from carrot.data import stratified_indices
    from carrot.embed.embedder import Embedder
    from carrot.ridge.head import RidgeHead
    from carrot.attribution.regions import deletion_insertion
    from carrot.features.regions import RegionSet
    from carrot.audit.sweep import embeddings_over_t
    from carrot.attribution.pixels import pooled
    from carrot.audit.protocols import pixel_columns, pixel_deletion
    from carrot.run.pipeline import Carrot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["dinov2_vits14", "efficientnet_lite0"])
    ap.add_argument("--t", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0])
    ap.add_argument("--sigma-feat", nargs="+", default=["median*0.5", "median", "median*2"])
    ap.add_argument("--sigma-space", nargs="+", default=["median*0.5", "median*2"],
                    help="spatial bandwidths tried with sigma_feat = median")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-region", type=int, default=12, help="test images for the deletion curves")
    ap.add_argument("--pixel-images", type=int, default=8, help="test images for the pixel protocol (0: none)")
    ap.add_argument("--pixel-grid", choices=["cross", "full"], default="cross",
                    help="the rows the pixel protocol runs for: cross = one factor at a time around the default "
                         "(every t at median bandwidths, every bandwidth at t = 1), full = every row")
    ap.add_argument("--pixel-backbones", nargs="+", default=None, help="the backbones the pixel protocol runs for (default: all)")
    ap.add_argument("--merge-into", default=None, help="replace the rows of --backbones in this earlier result file")
    ap.add_argument("--token-memory-gb", type=float, default=8.0, help="cap on the shared blurred-image tokens")
    ap.add_argument("--data-kind", default="elpv", help="a data set carrot reads without a root: elpv or fashion-mnist")
    ap.add_argument("--max-per-class", type=int, default=None, help="cap per class (fashion-mnist: in each split)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "t_sweep"))
    a = ap.parse_args()
    rows = []
    for name in a.backbones:
        cfg = RunConfig().merged({"backbone.name": name, "data.kind": a.data_kind, "data.max_per_class": a.max_per_class,
                                  "backbone.blocks": 1, "backbone.global_tokens": False})  # the graph and diffusion of the last block's tokens
        stores, train, test = orchestration.extract_splits(cfg, progress=True)
        tokens = np.concatenate([np.asarray(s.tokens) for s in stores])
        labels = np.concatenate([s.labels for s in stores])
        grid = stores[0].grid
        P = stores[0].positions.to(torch.float64)
        records = list(train.records) + list(test.records)  # the order of the stores' rows
        pixel_on = a.pixel_images > 0 and (a.pixel_backbones is None or name in a.pixel_backbones)
        if pixel_on:
            shared = SharedTokens(Carrot(cfg).backbone, torch.float16 if cfg.backbone.cache_dtype == "float16" else torch.float32,
                                  a.token_memory_gb * 2**30)

        class Joined:  # both cached splits seen as one store
            def __init__(self):
                self.tokens, self.labels, self.positions, self.grid = tokens, labels, stores[0].positions, grid

            def __len__(self):
                return len(labels)

        splits = [stratified_indices(labels, train.classes, 0.25, seed) for seed in a.seeds]
        for ss, sf in [("median", sf) for sf in a.sigma_feat] + [(ss, "median") for ss in a.sigma_space]:
            graph = GraphConfig(sigma_space=ss, sigma_feat=sf)
            t0 = time.perf_counter()
            G_all = embeddings_over_t(Joined(), a.t, graph)
            t_embed = time.perf_counter() - t0
            for ti, t in enumerate(a.t):
                accs, conc, lams, pix = [], [], [], {}
                for si, (itr, ite) in enumerate(splits):
                    head = RidgeHead(lam="auto").fit(G_all[ti][itr], labels[itr])
                    accs.append(float((head.predict(G_all[ti][ite]) == labels[ite]).mean()))
                    lams.append(head.lam_)
                    if si == 0:
                        K = centred_kernel(head, G_all[ti][itr], G_all[ti][ite[:200]])
                        pred = torch.as_tensor(head.decision_function(G_all[ti][ite[:200]]).argmax(1))
                        contrib = (K * head.dual_coef_.T[pred]).abs()
                        conc = (contrib.topk(10, dim=1).values.sum(1) / contrib.sum(1)).numpy()
                        dcfg = DiffusionConfig(t=t)
                        pipe = Embedder(graph, dcfg, "cpu")
                        del_auc, rnd_auc, spans = [], [], []
                        rng = np.random.default_rng(0)
                        for x in ite[: a.n_region]:
                            H = torch.from_numpy(tokens[x].astype(np.float64))
                            g = G_all[ti][x]
                            c = int(head.decision_function(g[None]).argmax())
                            wx = pipe.embed(RegionSet(H[None], P, grid))[1][0]
                            r = region_contributions(head, H, wx)[:, c].numpy()
                            full = float(head.decision_function(g[None])[0, c])
                            prior = float(head.prior_[c])
                            d1, _ = deletion_insertion(head, H, P, c, np.argsort(-r, kind="stable"), pipe, steps=8)
                            d2, _ = deletion_insertion(head, H, P, c, rng.permutation(len(r)), pipe, steps=8)
                            del_auc.append(d1.auc - prior)
                            rnd_auc.append(d2.auc - prior)
                            spans.append(full - prior)
                    on_cross = (ss, sf) == ("median", "median") or t == DiffusionConfig().t
                    if si == 0 and pixel_on and (a.pixel_grid == "full" or on_cross):
                        t1 = time.perf_counter()
                        at = Carrot(cfg.merged({"graph.sigma_space": ss, "graph.sigma_feat": sf, "diffusion.t": t}), backbone=shared)
                        at.head_ = head
                        at.test_records_ = [[records[j].path, records[j].label] for j in ite]
                        res = pixel_deletion(at, a.pixel_images, seed=0, maps=("shapley", "token"))
                        scores, per = res["scores"], res["per_image"]
                        pix = {"pixel_images": res["n"], "pixel_counted": scores[res["removal"]]["shapley"]["deletion"]["n"],
                               "seconds_pixel": time.perf_counter() - t1, **pixel_columns(res, sem=True)}
                        for r in scores:  # paired on the same images: token map minus Shapley map
                            tail = "" if r == res["removal"] else f"_{r}"
                            diff = pooled(np.subtract(per["auc"][r]["token"]["deletion"], per["auc"][r]["shapley"]["deletion"]),
                                          per["spans"][r])
                            pix[f"pixel_deletion_token_minus_shapley{tail}"] = diff["mean"]
                            pix[f"pixel_deletion_token_minus_shapley{tail}_sem"] = diff["sem"]
                row = {"backbone": name, "sigma_space": ss, "sigma_feat": sf, "t": t, "accuracy_mean": float(np.mean(accs)),
                       "accuracy_std": float(np.std(accs, ddof=1)), "lam_median": float(np.median(lams)),
                       "top10_concentration": float(np.mean(conc)),
                       # pooled: sum(AUC - prior) / sum(logit - prior), as carrot-run evaluate --what deletion
                       "deletion_auc_norm": float(np.sum(del_auc) / np.sum(spans)),
                       "deletion_auc_norm_random": float(np.sum(rnd_auc) / np.sum(spans)), "seconds_embed_all_t": t_embed,
                       "n_images": int(len(labels)), "grid": list(grid)}
                if pix:
                    row.update(pix)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args = vars(a)
    if a.merge_into:  # this run's backbones replace theirs in an earlier result file of the same protocol
        old = json.loads(Path(a.merge_into).read_text())
        for key in ("data_kind", "max_per_class", "t", "sigma_feat", "sigma_space", "seeds", "n_region"):
            if old["args"].get(key) != args[key]:
                raise SystemExit(f"{a.merge_into}: another protocol ({key} {old['args'].get(key)!r} != {args[key]!r})")
        rows = [r for r in old["rows"] if r["backbone"] not in a.backbones] + rows
        args = {**old["args"], **{k: v for k, v in args.items() if k.startswith("pixel") or k == "token_memory_gb"},
                "backbones": list(dict.fromkeys(r["backbone"] for r in rows)), "out": old["args"]["out"]}
        args["pixel_backbones"] = sorted({r["backbone"] for r in rows if "pixel_deletion_shapley" in r})  # what has them
        a.out, a.backbones = str(Path(a.merge_into).with_suffix("")), args["backbones"]
    out = write_results(a.out, rows, args=args)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.backbones), figsize=(5 * len(a.backbones), 3.6), squeeze=False)
    for ax, name in zip(axes[0], a.backbones):
        for key in dict.fromkeys((r["sigma_space"], r["sigma_feat"]) for r in rows if r["backbone"] == name):
            rs = [r for r in rows if r["backbone"] == name and (r["sigma_space"], r["sigma_feat"]) == key]
            ts = [max(r["t"], 0.05) for r in rs]
            ax.errorbar(ts, [r["accuracy_mean"] for r in rs], [r["accuracy_std"] for r in rs], marker="o", capsize=3,
                        label=f"sigma_space {key[0]}, sigma_feat {key[1]}")
        ax.set_xscale("log")
        ax.set_xlabel("diffusion time t (t = 0 drawn at 0.05)")
        ax.set_ylabel("test accuracy")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
