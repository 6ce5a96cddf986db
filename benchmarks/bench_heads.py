"""Heads on the same embeddings: carrot's linear ridge and kernel ridge heads against scikit-learn's
LogisticRegression (C chosen by 5-fold cross-validation) and kNN, by test accuracy and fit time.

A fitted run's embeddings (training and test images) are pooled and split again, stratified, for each seed with the
run's test fraction: an image's embedding depends only on the image (frozen backbone, per-image graph and
diffusion), so a new split needs no new extraction. Every head sees the same split. carrot's heads choose their
settings by exact leave-one-out on the training part (lambda; kernel: (gamma, lambda) with one eigendecomposition
per gamma); the peers by cross-validation (scikit-learn's own ``LogisticRegressionCV`` and ``GridSearchCV``).

    python benchmarks/bench_heads.py --run runs/demo --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from common import device_name, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carrot.ridge.head import RidgeHead  # noqa: E402
from carrot.ridge.kernel import KernelRidgeHead  # noqa: E402
from carrot.run.pipeline import Carrot  # noqa: E402

def keeps() -> dict[str, dict[str, str]]:
    """Which exact properties each head keeps: carrot's from the head registry, the peers' as they stand."""
    from carrot.ridge.heads import HEADS, PROPERTIES

    out = {f"carrot {k.name}": {p: "exact" if p in k.keeps else "no" for p in PROPERTIES} for k in HEADS.values()}
    out["LogisticRegression"] = {p: "refits only" for p in PROPERTIES}
    out["LogisticRegression"].update(region_split="exact (linear logit)", linear_coef="exact")
    out["kNN"] = {p: "no" for p in PROPERTIES}
    out["kNN"].update(training_terms="the neighbours", loo="exact (drop the point)", woodbury="exact (drop the points)")
    return out


def heads(n_jobs: int):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "carrot_linear": lambda: RidgeHead(lam="auto", device="cpu"),
        "carrot_kernel_rbf": lambda: KernelRidgeHead(kernel="rbf"),
        "carrot_kernel_laplacian": lambda: KernelRidgeHead(kernel="laplacian"),
        "carrot_kernel_poly": lambda: KernelRidgeHead(kernel="poly"),
        "carrot_kernel_rbf_nystroem_256": lambda: KernelRidgeHead(kernel="rbf", approx="nystroem", n_landmarks=256),
        "carrot_kernel_rbf_nystroem_1024": lambda: KernelRidgeHead(kernel="rbf", approx="nystroem", n_landmarks=1024),
        "sklearn_logreg_cv": lambda: make_pipeline(StandardScaler(), LogisticRegressionCV(
            Cs=[0.001, 0.01, 0.1, 1.0, 10.0], cv=5, max_iter=3000, n_jobs=n_jobs)),
        "sklearn_knn_1": lambda: KNeighborsClassifier(n_neighbors=1, metric="cosine"),
        "sklearn_knn_cv": lambda: GridSearchCV(KNeighborsClassifier(metric="cosine", weights="distance"),
                                               {"n_neighbors": [1, 5, 10, 20]}, cv=5, n_jobs=n_jobs),
    }


def chosen(name: str, est) -> tuple[str, float | None]:
    """The settings a head chose and, for carrot's heads, the exact LOO accuracy it chose them by."""
    if name == "carrot_linear":
        p = est.lam_path_
        return f"lambda={est.lam_:.3g}", max(p["loo_accuracy"]) if p else None
    if name.startswith("carrot_kernel"):
        best = max(max(p["loo_accuracy"]) for p in est.loo_path_)
        return f"gamma={est.gamma_:.3g}, lambda={est.lam_:.3g}", best
    if name == "sklearn_logreg_cv":
        return f"C={float(est[-1].C_[0]):.3g}", None
    if name == "sklearn_knn_cv":
        return f"k={est.best_params_['n_neighbors']}", None
    return "k=1", None


def token_map_rows(model: Carrot, run: str, specs: list[str], splits: list[tuple[int, np.ndarray, np.ndarray]],
                   y: np.ndarray) -> list[dict]:
    """Rows for carrot's linear ridge head on token-mapped embeddings g = sum_j w_j phi(h_j) (item 2 of issue 13).

    The readout weights w depend on the tokens only, not on phi: they are computed once per image (the run's graph
    and t). For each split the map is fitted on the seeded token sample of that split's training images alone, then
    every image is embedded through it and the ridge head fitted with lambda by exact LOO."""
    from carrot.embed.readout import weighted_readout
    from carrot.embed.tokenmap import TokenMap, sample_tokens
    from carrot.features.cache import open_store

    caches = model.metrics_["token_caches"]
    stores = [open_store(c) for c in caches[:2]]
    n_tr = len(stores[0])

    def tokens(rows: np.ndarray) -> np.ndarray:  # pooled rows: the run's train images, then its test images
        rows = np.asarray(rows)
        out = np.empty((len(rows), *stores[0].tokens.shape[1:]), dtype=np.float32)
        a = rows < n_tr
        out[a] = stores[0].tokens[rows[a]]
        out[~a] = stores[1].tokens[rows[~a] - n_tr]
        return out

    emb = model.embedder
    P = stores[0].positions.to(torch.float64)
    t0 = time.perf_counter()
    W = np.concatenate([emb.weights(torch.from_numpy(tokens(np.arange(s, min(s + 64, len(y))))).double(), P)[0].numpy()
                        for s in range(0, len(y), 64)])
    print(f"readout weights of {len(y)} images: {time.perf_counter() - t0:.0f} s", flush=True)
    rows_out = []
    for seed, tr, te in splits:
        for spec in specs:
            kind, dim = spec.split(":")
            t0 = time.perf_counter()
            tm = TokenMap(kind, int(dim), seed=seed).fit(sample_tokens(tokens(np.sort(tr)), seed=seed))
            t_map = time.perf_counter() - t0
            G = np.empty((len(y), int(dim)))
            t0 = time.perf_counter()
            for s in range(0, len(y), 32):
                F = tm(torch.from_numpy(tokens(np.arange(s, min(s + 32, len(y))))))
                G[s : s + 32] = weighted_readout(F, torch.from_numpy(W[s : s + 32])).numpy()
            t_embed = time.perf_counter() - t0
            t0 = time.perf_counter()
            head = RidgeHead(lam="auto", device="cpu").fit(G[tr], y[tr])
            t_fit = time.perf_counter() - t0
            acc = float((head.predict(G[te]) == y[te]).mean())
            name = f"carrot_tokenmap_{kind}_{dim}"
            rows_out.append({"seed": seed, "head": name, "test_accuracy": acc, "loo_accuracy": max(head.lam_path_["loo_accuracy"]),
                             "fit_seconds": t_map + t_fit, "map_seconds_all_images": t_embed,
                             "chosen": f"gamma={tm.gamma_:.3g}, lambda={head.lam_:.3g}", "n_train": int(len(tr)),
                             "n_test": int(len(te))})
            print(f"seed {seed} {name}: test {acc:.4f} (LOO {rows_out[-1]['loo_accuracy']:.4f}), map fit {t_map:.1f} s, "
                  f"embed {t_embed:.0f} s, ridge {t_fit:.1f} s", flush=True)
    return rows_out


def auto_embedding_rows(model: Carrot, splits: list[tuple[int, np.ndarray, np.ndarray]],
                        y: np.ndarray) -> tuple[list[dict], int]:
    """Rows for ``backbone.blocks`` / ``global_tokens`` auto (issue 29), from the run's token caches of the last K
    blocks: every candidate embedding of every image in one pass (carrot.embed.choice.embed_store); per split, the
    ``auto`` head on each candidate (``carrot_auto@<candidate>``) and the embedding auto keeps by the exact LOO accuracy
    of the training part (``carrot_auto_embedding``, carrot's own :func:`~carrot.embed.choice.choose`)."""
    from carrot.embed.choice import candidates, choose, embed_store, embedders
    from carrot.features.cache import open_store
    from carrot.ridge.heads import fit_head, kind_of, loo_accuracy

    stores = [open_store(c) for c in model.metrics_["token_caches"][:2]]
    cfg = model.config.merged({"backbone.blocks": "auto", "backbone.global_tokens": "auto", "head.kind": "auto"})
    bb = model.backbone
    bb.blocks = stores[0].blocks
    cands, line = candidates(cfg, bb)
    print(f"candidates ({line}): embedding {len(y)} images", flush=True)
    t0 = time.perf_counter()
    parts = [embed_store(s, embedders(cfg, cands), progress=True) for s in stores]
    G = {c: np.vstack([p[c] for p in parts]) for c in cands}
    print(f"embedded in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for seed, tr, te in splits:
        for c in cands:
            t0 = time.perf_counter()
            head = fit_head(cfg, G[c][tr], y[tr])
            fit_s = time.perf_counter() - t0
            acc = float((head.predict(G[c][te]) == y[te]).mean())
            rows.append({"seed": seed, "head": f"carrot_auto@{c.name}", "test_accuracy": acc,
                         "loo_accuracy": loo_accuracy(head, G[c][tr], y[tr]), "fit_seconds": fit_s,
                         "chosen": head.describe(), "n_train": int(len(tr)), "n_test": int(len(te))})
            print(f"seed {seed} auto head on {c.name}: test {acc:.4f} (LOO {rows[-1]['loo_accuracy']:.4f}), {fit_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        picked = choose(cfg, {c: G[c][tr] for c in cands}, y[tr], line)
        fit_s = time.perf_counter() - t0
        acc = float((picked.head.predict(G[picked.candidate][te]) == y[te]).mean())
        rows.append({"seed": seed, "head": "carrot_auto_embedding", "test_accuracy": acc,
                     "loo_accuracy": loo_accuracy(picked.head, G[picked.candidate][tr], y[tr]), "fit_seconds": fit_s,
                     "chosen": f"{picked.candidate.name}, {kind_of(picked.head).name}", "n_train": int(len(tr)),
                     "n_test": int(len(te))})
        print(f"seed {seed} auto embedding: {rows[-1]['chosen']}: test {acc:.4f}, {fit_s:.1f} s", flush=True)
    return rows, max(g.shape[1] for g in G.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a fitted run directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heads", nargs="*", default=None, help="default: all; none with --heads alone")
    ap.add_argument("--out", default=None, help="default: results/heads_<data>_<backbone>")
    ap.add_argument("--token-maps", nargs="*", default=[], metavar="KIND:DIM",
                    help="token maps before the readout, e.g. nystroem:1024 rff:1024 (needs the run's token caches)")
    ap.add_argument("--tag", default=None, help="suffix of the default result name (runs of other embeddings)")
    ap.add_argument("--auto-embedding", action="store_true",
                    help="the embedding backbone.blocks / global_tokens auto keeps, against each candidate (needs a run "
                         "fitted with them auto: its token caches hold the last 4 blocks); writes heads_<data>_<backbone>_auto")
    ap.add_argument("--merge-into", default=None, help="add the rows to this earlier result file (same run and seeds)")
    args = ap.parse_args()
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = Carrot.load(args.run)
    G = np.vstack([np.asarray(model.train_embeddings_), np.asarray(model.test_embeddings_)])
    y = np.array([r.label for r in model.train_records_] + [r[1] for r in model.test_records_])
    frac = len(model.test_records_) / len(y)
    made = heads(n_jobs=1)
    names = list(made) if args.heads is None else args.heads
    rows = []
    splits = [(seed, *train_test_split(np.arange(len(y)), test_size=frac, stratify=y, random_state=seed)) for seed in args.seeds]
    for seed, tr, te in splits:
        for name in names:
            est = made[name]()
            t0 = time.perf_counter()
            est.fit(G[tr], y[tr])
            fit_s = time.perf_counter() - t0
            acc = float((est.predict(G[te]) == y[te]).mean())
            setting, loo = chosen(name, est)
            rows.append({"seed": seed, "head": name, "test_accuracy": acc, "loo_accuracy": loo, "fit_seconds": fit_s,
                         "chosen": setting, "n_train": int(len(tr)), "n_test": int(len(te))})
            print(f"seed {seed} {name}: test {acc:.4f}" + (f" (LOO {loo:.4f})" if loo is not None else "")
                  + f", {fit_s:.1f} s, {setting}", flush=True)
        pair = {r["head"]: r for r in rows if r["seed"] == seed and r["head"] in ("carrot_linear", "carrot_kernel_rbf")}
        if len(pair) == 2:  # head.kind auto: the higher exact LOO accuracy of the two (ties: linear), no extra fit
            lin, ker = pair["carrot_linear"], pair["carrot_kernel_rbf"]
            best = ker if ker["loo_accuracy"] > lin["loo_accuracy"] else lin
            rows.append({**best, "head": "carrot_auto", "fit_seconds": lin["fit_seconds"] + ker["fit_seconds"],
                         "chosen": best["head"]})
    rows += token_map_rows(model, args.run, args.token_maps, splits, y) if args.token_maps else []
    meta = json.loads((Path(args.run) / "run.json").read_text())
    embedding = {k: meta["config"]["backbone"].get(k, d) for k, d in (("blocks", 1), ("global_tokens", False))}
    dim = int(G.shape[1])
    if args.auto_embedding:
        auto_rows, dim = auto_embedding_rows(model, splits, y)
        rows += auto_rows
        embedding = {"blocks": "auto", "global_tokens": "auto"}
        args.tag = args.tag or "auto"
    data, backbone = meta["config"]["data"]["kind"], meta["config"]["backbone"]["name"]
    out = args.out or Path(__file__).parent / "results" / f"heads_{data}_{backbone}{'_' + args.tag if args.tag else ''}"
    if args.merge_into:
        old = json.loads(Path(args.merge_into).read_text())
        if old["seeds"] != args.seeds or old["run"] != str(args.run):
            sys.exit(f"--merge-into: {args.merge_into} has seeds {old['seeds']} of run {old['run']}, not {args.seeds} of {args.run}")
        new = {r["head"] for r in rows}
        rows = [r for r in old["rows"] if r["head"] not in new] + rows
        out = Path(args.merge_into).with_suffix("")
    print(write_results(out, rows, benchmark="heads", run=str(args.run), data=data, backbone=backbone,
                        classes=len(model.classes_), dim=dim, n=int(len(y)), test_fraction=frac,
                        seeds=args.seeds, device=device_name("cpu"), python=platform.python_version(),
                        torch=torch.__version__, sklearn=sklearn.__version__, keeps=keeps(), embedding=embedding))


if __name__ == "__main__":
    main()
