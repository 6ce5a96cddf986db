"""Run-directory level work: cached embeddings of a fitted run, its summary, its index page."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from carrot.data import load_image
from carrot.distributed import world
from carrot.attribution.representer import class_summary
from carrot.audit.registry import AUDITS
from carrot.errors import CarrotError
from carrot.io import atomic_path, read_json, write_csv, write_json
from carrot.ridge.heads import HEADS, keeps, kind_of, require
from carrot.validation import index_labels
from carrot.run.pipeline import Carrot
from carrot.report.pages import index_html
from carrot.run.rundir import RunDir


def run_embeddings(run_dir: str | Path, model: Carrot | None = None) -> tuple[Carrot, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(model, G_train, y_train, G_test, y_test) of a fitted run, from its saved embeddings
    (``model``: the run already loaded, to reuse its backbone)."""
    model = model or Carrot.load(run_dir)
    if getattr(model, "test_embeddings_", None) is None or model.test_records_ is None:
        raise CarrotError(f"run '{run_dir}' has no {RunDir.TEST_EMBEDDINGS}; refit it with carrot-run fit")
    y_test = np.array([lab for _, lab in model.test_records_])
    y_train = np.array([r.label for r in model.train_records_])
    return model, model.train_embeddings_, y_train, model.test_embeddings_, y_test


def run_summary(model: Carrot, G: np.ndarray, y: np.ndarray, G_test: np.ndarray, y_test: np.ndarray,
                n_review: int = 8) -> dict[str, Any]:
    """Accuracy, per-class table, confusion matrix, the most harmful / helpful training images by the exact
    leave-one-out change of the test loss, and the label-review list: the training labels the rest of the
    data disagrees with most (exact LOO cross-entropy, temperature calibrated on the training labels)."""
    head = model.head_
    pred = head.decision_function(G_test).argmax(1)
    C = len(model.classes_)
    cm = np.zeros((C, C), dtype=int)
    np.add.at(cm, (y_test, pred), 1)
    system = model.training_system()  # the head's own factor, shared with explain and certificates
    total = -system.loo_loss_change(G_test, index_labels(head.classes_, y_test, "y_test")).numpy()  # > 0: removal helps

    def rows(order, scores):
        return [{"index": int(i), "path": model.train_records_[i].path,
                 "label": model.classes_[model.train_records_[i].label], "score": float(scores[i])} for i in order]

    k = min(n_review, len(total))
    loo = system.loo_logits()
    review, temperature = system.loo_cross_entropy(loo)
    review = np.where(system.a.numpy() > 0, review.numpy(), -np.inf)  # images outside the model are not reviewed
    loo_pred = loo.argmax(1).numpy()
    flow = class_summary(system, G_test) if len(y_test) else None
    carry = flow["total_contribution"] if flow is not None else np.zeros(len(y))
    return {
        "classes": model.classes_, "confusion": cm.tolist(),
        "test_accuracy": float((pred == y_test).mean()) if len(y_test) else float("nan"),
        "per_class": {c: {"n_test": int(cm[i].sum()), "accuracy": float(cm[i, i] / max(1, cm[i].sum()))}
                      for i, c in enumerate(model.classes_)},
        "harmful": rows(np.argsort(-total, kind="stable")[:k], total),
        "helpful": rows(np.argsort(total, kind="stable")[:k], total),
        "carriers": rows(np.argsort(-carry, kind="stable")[:k], carry) if flow is not None else [],
        "label_review": [{**r, "loo_predicted": model.classes_[int(head.classes_[loo_pred[r["index"]]])]}
                         for r in rows(np.argsort(-review, kind="stable")[:k], review)],
        "label_review_temperature": temperature,
        "class_flow": flow["class_flow"].tolist() if flow is not None else None,
        "n_train": int(len(y)), "n_test": int(len(y_test)), "lam": float(head.lam_),
        "t": model.config.diffusion.t, "backbone": model.config.backbone.name,
        "head": head_line(head, (getattr(head, "head_choice_", None) or (model.metrics_ or {}).get("head_choice"))
                          if model.config.head.kind == "auto" else None),
    }


def head_line(head: Any, choice: dict[str, Any] | None = None) -> str:
    """Which head the run kept, its settings, and (head.kind auto: ``choice``, the fit's record) every candidate's
    exact LOO accuracy."""
    line = head.describe()
    if choice:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in choice.items() if k in HEADS and v is not None)
        skipped = "; ".join(f"the {k[: -len('_skipped')]} head was not fitted: {v}" for k, v in choice.items()
                            if k.endswith("_skipped") and v)
        line += f", kept by head.kind auto (exact LOO accuracy: {scores}" + (f"; {skipped})" if skipped else ")")
    return line


def write_index(run_dir: str | Path, explained: Sequence[dict[str, Any]] = (), model: Carrot | None = None,
                name: str | None = None) -> Path:
    """(Re)write RUN_DIR/index.html, linking the explanation pages listed in RUN_DIR/explanations (``name``: the
    run's name on the page, when RUN_DIR is the staging folder of a run being written)."""
    rd = RunDir(run_dir)
    model, G, y, G_test, y_test = run_embeddings(run_dir, model)
    summary = run_summary(model, G, y, G_test, y_test)
    summary["name"] = name or rd.path.resolve().name
    listed = RunDir.explanations_list(rd.explanations)
    pages = list(explained) or (read_json(listed, "explanations list") if listed.is_file() else [])
    geo = model.backbone.display_transform() if summary["harmful"] else None
    thumbs = {r["index"]: geo(load_image(model.train_records_[r["index"]]))
              for r in summary["harmful"] + summary["helpful"] + summary["carriers"] + summary["label_review"]}
    links = [{"href": os.path.relpath(p["page"], rd.path), "image": p["image"], "predicted": p["predicted"]}
             for p in pages if "page" in p]
    summary["audits"] = {name: rd.read_audit(name) for name in AUDITS}
    with atomic_path(rd.index) as tmp:
        tmp.write_text(index_html(summary, thumbs, links))
    return rd.index


def predict(run_dir: str | Path, inputs: Sequence[str], out: str | Path | None = None, batch: int = 32,
            device: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Classify image files / folders with a fitted run (no explanations): RUN/predictions.csv and .json,
    one row per image with the predicted class, its score, the runner-up, the margin and every class score."""
    from tqdm.auto import tqdm

    from carrot.data import collect_images

    model = Carrot.load(run_dir)
    if device:
        model.config = model.config.merged({"device": device})
    check_outside_data(model.config, out, "--out")
    model.check_backbone()
    paths = collect_images(inputs)
    rows: list[dict[str, Any]] = []
    for s in tqdm(range(0, len(paths), batch), desc="predict", unit="batch", disable=not progress):
        G = model.embed_images(paths[s : s + batch])[0]
        for path, scores in zip(paths[s : s + batch], model.head_.decision_function(G)):
            first, second = (np.argsort(-scores, kind="stable").tolist() + [None])[:2]
            rows.append({"image": path, "predicted": model.classes_[first], "score": float(scores[first]),
                         "runner_up": model.classes_[second] if second is not None else None,
                         "margin": float(scores[first] - scores[second]) if second is not None else None,
                         "scores": {c: float(v) for c, v in zip(model.classes_, scores)}})
    out = Path(out) if out else RunDir(run_dir).predictions
    write_json(out, rows)
    write_csv(out.with_suffix(".csv"), ["image", "predicted", "score", "runner_up", "margin", *model.classes_],
              ([r["image"], r["predicted"], r["score"], r["runner_up"], r["margin"], *r["scores"].values()] for r in rows))
    return rows


def compare(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Two runs on the same test images (e.g. a run and its reweighted / debugged child, or two backbones):
    accuracies, per-class change, McNemar's exact test, and the test images whose prediction changed."""
    from carrot.audit.evaluate import compare_predictions

    (ma, _, _, Ga, y), (mb, _, _, Gb, yb) = run_embeddings(run_a), run_embeddings(run_b)
    paths_a, paths_b = [p for p, _ in ma.test_records_], [p for p, _ in mb.test_records_]
    if paths_a != paths_b or not np.array_equal(y, yb) or ma.classes_ != mb.classes_:
        raise CarrotError(f"compare: runs '{run_a}' and '{run_b}' have different test images, labels or classes")
    pa, pb = ma.head_.predict(Ga), mb.head_.predict(Gb)
    res = compare_predictions(pa, pb, y, ma.classes_)
    res["runs"] = {"a": str(run_a), "b": str(run_b)}
    res["changed"] = [{"image": paths_a[i], "label": ma.classes_[y[i]], "a": ma.classes_[pa[i]], "b": ma.classes_[pb[i]]}
                      for i in np.flatnonzero(pa != pb)]
    write_json(out, res) if out else RunDir(run_b).write_audit("compare", res)
    if out is None:
        write_index(run_b, model=mb)
    return res


def reweight(run_dir: str | Path, val_fraction: float = 0.2, out: str | Path | None = None, apply: str | Path | None = None,
             **rro_kwargs: Any) -> dict[str, Any]:
    """RRO on a fitted run: split train into fit/validation, reweight, compare test accuracy with uniform;
    ``apply``: also write a run there whose head is fitted with the learned weights (validation rows weigh 0)."""
    from carrot.audit.reweight import RROConfig, rro

    model, G, y, G_test, y_test = run_embeddings(run_dir)
    require(model.head_, "reweight", "reweight")
    a0 = _run_weights(model)
    if apply is not None:
        check_outside_data(model.config, apply, "--apply")
        clear_run(apply, overwrite=False, flag="--apply", config=model.config)
    cfg = RROConfig(**{k: v for k, v in rro_kwargs.items() if v is not None}, seed=model.config.seed)
    f_rows, v_rows = _fit_val_split(model, y, val_fraction)
    res = rro(G[f_rows], y[f_rows], G[v_rows], y[v_rows], model.head_, cfg, G_test, y_test, sample_weight=a0[f_rows])
    weights = np.zeros(len(y))
    weights[f_rows] = res.alpha
    summary = {"config": cfg.to_dict(), "val_fraction": val_fraction, "best_step": res.best_step,
               "uniform_test_accuracy": res.history[0]["test_accuracy"],
               "reweighted_test_accuracy": res.history[res.best_step]["test_accuracy"],
               "ess_per_class": {model.classes_[int(c)]: v for c, v in res.ess.items()}, "history": res.history,
               "weights": weights.tolist()}
    write_json(out, summary) if out else RunDir(run_dir).write_audit("reweight", summary)
    if out is None:
        write_index(run_dir, model=model)
    if apply is not None:
        _apply_weights(model, run_dir, apply, weights, y, G_test, y_test,
                       {"by": "reweight", **{k: v for k, v in summary.items() if k not in ("weights", "history")}})
    return summary


def _apply_weights(model: Carrot, run_dir: str | Path, out: str | Path, weights: np.ndarray, y: np.ndarray,
                   G_test: np.ndarray, y_test: np.ndarray, how: dict[str, Any]) -> None:
    """A new run in ``out``: the parent's data, config and lambda, its head refitted with example ``weights``."""
    from carrot.audit.evaluate import per_class_accuracy

    # the parent's fitted choices pinned in the config, never a new 'auto' choice
    derived = Carrot(model.config.merged({"head.kind": kind_of(model.head_).name, **model.head_.pinned()}),
                     backbone=model.backbone)
    derived.token_map_ = model.token_map_  # the embeddings are the parent's
    # every setting held (a kernel parent's feature map too), as RRO and debug's loops hold it: the run is the model
    # they scored
    held = model.head_.refit(model.train_embeddings_, y, weights)
    derived.fit(model.train_embeddings_, y, model.train_records_, model.classes_, sample_weight=weights, head=held)
    pred = derived.head_.predict(G_test)
    metrics = {**model.metrics_, "lam": derived.head_.lam_, "lam_path": None, "head_choice": None,
               "train_accuracy": derived.score(model.train_embeddings_, y), "test_accuracy": float((pred == y_test).mean()),
               "per_class_test_accuracy": dict(zip(model.classes_, per_class_accuracy(pred, y_test, len(model.classes_))))}
    derived.record_test(G_test, model.test_records_, metrics, {"run": str(Path(run_dir).resolve()), **how})
    derived.save(out, finish=lambda staging: write_index(staging, model=derived, name=Path(out).resolve().name))


def bench(run_dir: str | Path, ts: Sequence[float], out: str | Path | None = None,
          pixel_images: int = 0) -> list[dict[str, Any]]:
    """Diffusion-time sweep on a fitted run's token caches; writes t_sweep.json and .csv. With ``pixel_images``
    > 0, each t's model is also measured by the pixel protocol on that many test images (its pixel and token
    maps' deletion / insertion AUC): does diffusion make the maps more or less faithful to the pixels?"""
    from carrot.audit.sweep import t_sweep

    model = Carrot.load(run_dir)
    train, test = _token_stores(run_dir, model, (0, 1))

    def pixels_at(t: float, head) -> dict[str, float]:
        at_t = Carrot(model.config.merged({"diffusion.t": t}), backbone=model.backbone)
        at_t.head_, at_t.test_records_, at_t.token_map_ = head, model.test_records_, model.token_map_
        res = pixel_deletion(at_t, pixel_images, seed=model.config.seed, maps=("shapley", "token"))
        return {f"pixel_{kind}_{m}": v[kind]["mean"] for m, v in res["maps"].items() for kind in ("deletion", "insertion")}

    rows = t_sweep(train, test, ts, model.embedder, model.head_, model.sample_weight_,
                   on_fit=pixels_at if pixel_images > 0 else None)
    out = Path(out) if out else RunDir(run_dir).audit("t_sweep")
    write_json(out, rows)
    fields = sorted({k for r in rows for k in r})
    write_csv(out.with_suffix(".csv"), fields, ([r.get(k) for k in fields] for r in rows))
    if out == RunDir(run_dir).audit("t_sweep"):
        write_index(run_dir, model=model)
    return rows


def _run_weights(model: Carrot) -> np.ndarray:
    """The run's example weights (n,): ones for an unweighted run."""
    n = len(model.train_records_)
    return np.ones(n) if model.sample_weight_ is None else np.asarray(model.sample_weight_, dtype=np.float64)


def _fit_val_split(model: Carrot, y: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit rows, validation rows) of the training set, seeded by the run's seed."""
    from carrot.data import stratified_indices

    return stratified_indices(y, model.classes_, val_fraction, model.config.seed, "train")


def tracin(run_dir: str | Path, n_test: int = 20, flag_fraction: float = 0.02, **tracin_kwargs: Any) -> dict[str, Any]:
    """TracIn analysis of a run: RUN/tracin/{summary,self_influence,influence}.json; index.html shows it."""
    from carrot.audit.tracin import tracin_report

    model, G, y, G_test, y_test = run_embeddings(run_dir)
    require(model.head_, "linear_coef", "tracin")
    rep = tracin_report(G, y, [r.path for r in model.train_records_], model.classes_, G_test, y_test,
                        [p for p, _ in model.test_records_], model.head_, n_test, flag_fraction,
                        {**{k: v for k, v in tracin_kwargs.items() if v is not None}, "seed": model.config.seed})
    summary = RunDir(run_dir).write_audit("tracin", rep["summary"])
    for name, part in rep.items():  # the per-image parts beside the summary
        write_json(summary.parent / f"{name}.json", part)
    write_index(run_dir, model=model)
    return rep["summary"]


def debug(run_dir: str | Path, ks: Sequence[int], val_fraction: float = 0.2, downweight: float = 0.0,
          apply: str | Path | None = None) -> dict[str, Any]:
    """Dataset debugging loop on a run: drop / downweight the images most harmful to a validation split;
    ``apply``: also write a run there with the K of best validation accuracy applied (validation rows weigh 0,
    as in the loop's numbers)."""
    from carrot.audit.debugging import debug_loop

    model, G, y, G_test, y_test = run_embeddings(run_dir)
    if downweight:
        require(model.head_, "weight_update", "debug --downweight")
    a0 = _run_weights(model)
    if apply is not None:
        check_outside_data(model.config, apply, "--apply")
        clear_run(apply, overwrite=False, flag="--apply", config=model.config)
    f_rows, v_rows = _fit_val_split(model, y, val_fraction)
    res = debug_loop(G[f_rows], y[f_rows], G[v_rows], y[v_rows], G_test, y_test, model.head_, ks, downweight,
                     seed=model.config.seed, sample_weight=a0[f_rows])
    for r in res["rows"]:
        r["dropped"] = [{"index": int(f_rows[i]), "path": model.train_records_[f_rows[i]].path,
                         "label": model.classes_[int(y[f_rows[i]])]} for i in r["dropped"]]
    res.pop("harm_scores")
    res["val_fraction"] = val_fraction
    RunDir(run_dir).write_audit("debug", res)
    write_index(run_dir, model=model)
    if apply is not None:
        best = max(res["rows"], key=lambda r: (r["val_accuracy"], -r["k"]))
        weights = np.zeros(len(y))
        weights[f_rows] = a0[f_rows]
        dropped = [d["index"] for d in best["dropped"]]
        weights[dropped] = downweight * a0[dropped]
        _apply_weights(model, run_dir, apply, weights, y, G_test, y_test,
                       {"by": "debug", "k": best["k"], "downweight": downweight, "val_fraction": val_fraction,
                        "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"]})
    return res


def check_outside_data(config: Any, out: str | Path | None, flag: str) -> None:
    """Refuse an output folder inside the data folder: the next fit would read its pages and heatmaps as images."""
    if out is None or not config.data.root:
        return
    data, target = Path(config.data.root).resolve(), Path(out).resolve()
    if target == data or data in target.parents:
        raise CarrotError(f"{flag}: '{out}' is inside the data folder '{config.data.root}'; the next fit would read "
                          "its files as training images; write it outside the data folder")


def clear_run(run_dir: str | Path, overwrite: bool, flag: str = "--out", config: Any = None) -> None:
    """Before any work: refuse to write a run over an existing one unless ``overwrite``, or into a file or a
    folder of other things, or around the data or the token cache (rank 0 only). The old run stays until the
    new one replaces it whole."""
    if world()[0] == 0:
        inside = {"the data folder": config.data.root, "the token cache": config.cache_dir} if config is not None else None
        RunDir(run_dir).check_target(overwrite, flag, inside)


def _token_stores(run_dir: str | Path, model: Carrot, splits: Sequence[int]) -> list:
    """The run's token caches of ``splits`` (0 train, 1 test), or a named error saying why they are not there."""
    from carrot.features.cache import open_store

    caches = model.metrics_.get("token_caches", [])
    if len(caches) != 2 or not all(Path(caches[s]).is_dir() for s in splits):
        raise CarrotError(f"run '{run_dir}': no token caches ({caches or 'fitted with --no-cache-tokens or under torchrun'}"
                          f"{'; gone' if caches else ''}); run carrot-run fit with the token cache to (re)build them")
    return [open_store(caches[s], verify=True) for s in splits]


def _test_store(run_dir: str | Path, model: Carrot):
    """The run's test token cache (see :func:`_token_stores`)."""
    return _token_stores(run_dir, model, (1,))[0]


def _predicted_regions(model: Carrot, store, rows: Sequence[int], batch: int = 64):
    """For each cached test row: (row, tokens H (N, D) float64, predicted class c, logit of c, exact region
    contributions to it (N,), global tokens (G, D') or None), embedding ``batch`` rows at a time."""
    import torch

    from carrot.attribution.representer import region_contributions
    from carrot.features.backbone import patch_centres
    from carrot.features.regions import RegionSet

    P = patch_centres(store.grid, torch.float64)
    for s in range(0, len(rows), batch):
        idx = list(rows[s : s + batch])
        H = torch.from_numpy(np.asarray(store.tokens[idx], dtype=np.float64))
        C = (torch.from_numpy(np.asarray(store.globals[idx], dtype=np.float64)) if model.config.backbone.global_tokens
             else None)
        G, w = model.embed_regions(RegionSet(H, P, store.grid, C))
        logits = model.head_.decision_function(G.numpy())
        for j, i in enumerate(idx):
            c = int(logits[j].argmax())
            Cj = None if C is None else C[j]
            r = region_contributions(model.head_, model.embedder.features(H[j]), w[j], Cj)[: H.shape[1], c]
            yield i, H[j], c, float(logits[j, c]), r.numpy(), Cj


def region_deletion(run_dir: str | Path, n_test: int = 20, steps: int = 8, seed: int = 0,
                    model: Carrot | None = None) -> dict[str, Any]:
    """Deletion / insertion curves of the predicted logit on ``n_test`` random test images (cached tokens):
    regions removed (inserted) in the order of their exact contribution vs a random order. Each AUC is
    pooled over the images, sum(AUC - prior) / sum(full logit - prior): 1 = the full logit throughout,
    0 = the prior (pooling keeps images whose logit barely exceeds the prior from dominating)."""
    import torch

    from carrot.features.backbone import patch_centres
    from carrot.attribution.regions import deletion_insertion

    model = model or Carrot.load(run_dir)
    store = _test_store(run_dir, model)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), min(n_test, len(store)), replace=False))
    P = patch_centres(store.grid, torch.float64)
    emb = model.embedder
    out: dict[str, list[float]] = {k: [] for k in ("deletion", "deletion_random", "insertion", "insertion_random")}
    spans = []
    for _, H, c, logit, r, C in _predicted_regions(model, store, rows.tolist()):
        prior = float(model.head_.prior_[c])
        spans.append(logit - prior)
        for name, order in (("", np.argsort(-r, kind="stable")), ("_random", rng.permutation(len(r)))):
            dele, ins = deletion_insertion(model.head_, H, P, c, order, emb, steps=steps, globals=C)
            out["deletion" + name].append(dele.auc - prior)
            out["insertion" + name].append(ins.auc - prior)
    return {"n": int(len(rows)), "steps": steps, "mean_logit_above_prior": float(np.mean(spans)),
            **{k: float(np.sum(v) / np.sum(spans)) for k, v in out.items()}}


REGION_MAPS = ("shapley", "split", "occlusion", "token", "random")  # the maps of one image that region_scores computes


def image_regions(model: Carrot, path: str) -> tuple[Any, Any, Any, tuple[int, int], int]:
    """One image as the region maps need it: model input x (3, H, W), its RegionSet (tokens (1, N, D) rounded as
    the cache rounds them, and the global tokens when the embedding reads them), readout weights w (1, N), the grid,
    and the predicted class c."""
    import torch

    x = model.inputs([path])[0]
    with torch.no_grad():
        regions, grid = model._regions(x[None], "a test image")
    G, w = model.embed_regions(regions)
    return x, regions, w, grid, int(model.head_.decision_function(G.numpy())[0].argmax())


def region_scores(model: Carrot, name: str, x: Any, regions: Any, w: Any, c: int, grid: tuple[int, int],
                  rng: np.random.Generator) -> np.ndarray:
    """Scores (N,) of one of carrot's :data:`REGION_MAPS` for class c of an image (:func:`image_regions`: x, its
    RegionSet, w): the Shapley map (explain's default), the pixel split, exact cell occlusion, the token split, or a
    random order."""
    from carrot.attribution.representer import region_contributions

    H, C = regions.H, None if regions.globals is None else regions.globals[0]
    if name in ("shapley", "split", "occlusion"):
        return model.pixel_map(x, c, grid, name)[0].ravel()
    if name == "token":
        if not keeps(model.head_, "region_split"):  # each token's exact removal from the graph
            import torch

            from carrot.attribution.regions import node_removal
            from carrot.features.backbone import patch_centres

            drops = node_removal(model.head_, H[0], patch_centres(grid, torch.float64), c, model.embedder, globals=C)
            return np.array([drops[j] for j in range(len(drops))])
        return region_contributions(model.head_, model.embedder.features(H[0]), w[0], C)[: H.shape[1], c].numpy()
    if name == "random":
        return rng.permutation(grid[0] * grid[1]).astype(float)
    raise CarrotError(f"maps: expected one of {', '.join(REGION_MAPS)}, got {name!r}")


def pixel_deletion(model: Carrot, n_test: int = 20, steps: int = 16, seed: int = 0,
                   maps: Sequence[str] = REGION_MAPS) -> dict[str, Any]:
    """The pixel protocol on ``n_test`` random test images of a run (:mod:`carrot.attribution.pixels`): cells
    blurred (revealed onto the blurred image) in the order of each map for the predicted class, the whole model
    re-run at each of ``steps`` steps; per map the deletion and insertion AUC (image = 1, blurred image = 0),
    mean and s.e.m. over images, and the seconds each map costs per image."""
    import time

    from carrot.attribution.pixels import blur_ends, deletable, pixel_curves, pooled

    if not maps or set(maps) - set(REGION_MAPS):
        raise CarrotError(f"maps: expected some of {', '.join(REGION_MAPS)}, got {list(maps)}")
    if not model.test_records_:
        raise CarrotError("pixel-deletion: the run has no test images")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(model.test_records_), min(n_test, len(model.test_records_)), replace=False))
    auc: dict[str, dict[str, list[float]]] = {m: {"deletion": [], "insertion": []} for m in maps}
    seconds: dict[str, list[float]] = {m: [] for m in maps}
    spans: list[float] = []
    grid = None
    for i in rows.tolist():
        x, H, w, grid, c = image_regions(model, model.test_records_[i][0])
        full, blurred = blur_ends(model.pixel_logits, x, c, grid)
        spans.append(full - blurred)
        if not deletable(full, blurred):  # nothing to delete: left out of every pooled number, so no map is drawn
            for m in maps:
                auc[m]["deletion"].append(float("nan"))
                auc[m]["insertion"].append(float("nan"))
            continue
        for m in maps:
            t0 = time.perf_counter()
            scores = region_scores(model, m, x, H, w, c, grid, rng)
            seconds[m].append(time.perf_counter() - t0)
            curves = pixel_curves(model.pixel_logits, x, c, grid, np.argsort(-scores, kind="stable"), steps)
            auc[m]["deletion"].append(curves.auc("deletion"))
            auc[m]["insertion"].append(curves.auc("insertion"))
    return {"n": int(len(rows)), "steps": steps, "grid": list(grid) if grid else None,
            "per_image": {"rows": rows.tolist(), "spans": spans, "auc": auc},  # for paired comparisons of the maps
            "maps": {m: {"deletion": pooled(auc[m]["deletion"], spans, seed),
                         "insertion": pooled(auc[m]["insertion"], spans, seed),
                         "seconds_per_image": float(np.mean(seconds[m])) if seconds[m] else float("nan")} for m in maps}}


def pointing(run_dir: str | Path, model: Carrot | None = None, n_pixel: int = 0, seed: int = 0) -> dict[str, Any]:
    """Pointing game on a run's test split where part locations are known (CUB parts, parts.json):
    does the most positive region of the predicted class sit on a part? The token map on every such image
    (cached tokens); with ``n_pixel`` > 0 also the pixel map (explain's default, Shapley) on that many of them."""
    from PIL import Image

    from carrot.data import load_splits
    from carrot.attribution.regions import pointing_game, to_input_coords

    model = model or Carrot.load(run_dir)
    store = _test_store(run_dir, model)
    _, test = load_splits(model.config)
    if len(test) != len(store):
        raise CarrotError(f"run '{run_dir}': the data set no longer matches the run's test split")
    rows = [i for i, rec in enumerate(test.records) if rec.parts]
    if not rows:
        raise CarrotError("pointing game: no part locations known for this data set (CUB parts/part_locs.txt or parts.json)")
    geo, size = model.backbone.display_transform(), model.backbone.data_config["input_size"][1:]
    hits, chance, part_boxes = [], [], {}
    for i, _, _, _, r, _ in _predicted_regions(model, store, rows):
        rec = test.records[i]
        if rec.bbox:
            wh = (rec.bbox[2], rec.bbox[3])
        else:
            with Image.open(rec.path) as im:
                wh = im.size
        boxes = [to_input_coords(np.array([[x0, y0], [x1, y1]]), wh, geo).ravel() for x0, y0, x1, y1 in rec.parts]
        r = r.reshape(store.grid)
        hits.append(any(pointing_game(r, tuple(b), size) for b in boxes))
        cells = np.eye(r.size).reshape(r.size, *r.shape)
        chance.append(np.mean([any(pointing_game(c, tuple(b), size) for b in boxes) for c in cells]))
        part_boxes[i] = boxes
    out = {"n": len(hits), "hit_rate": float(np.mean(hits)), "random_region_hit_rate": float(np.mean(chance))}
    if n_pixel > 0:
        chosen = np.random.default_rng(seed).permutation(rows)[:n_pixel]
        pix, tok = [], []
        for i in sorted(chosen.tolist()):
            x = model.inputs([test.records[i].path])[0]
            c = int(model.pixel_logits(x[None])[0].argmax())
            values = model.pixel_map(x, c, store.grid)[0]
            pix.append(any(pointing_game(values, tuple(b), size) for b in part_boxes[i]))
            tok.append(hits[rows.index(i)])
        out.update({"n_pixel": len(pix), "pixel_hit_rate": float(np.mean(pix)),
                    "token_hit_rate_same_images": float(np.mean(tok))})
    return out


def certificates(model: Carrot, n_test: int = 50, limit: int = 50, seed: int = 0, n_show: int = 10) -> dict[str, Any]:
    """Counterfactual certificates of ``n_test`` random test predictions (all when n_test >= m): for each, the
    fewest training images found (greedy on exact effects, checked by a refit) whose removal changes it.

    Returns
    -------
    dict: ``sizes`` (per image, None when no set of up to ``limit`` changes it), ``histogram``, the ``smallest``
    sets (the predictions most exposed to a few possibly wrong labels) and the cost per image.
    """
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1:
        raise CarrotError(f"n_test: expected a positive integer, got {n_test!r}")
    _, _, _, G_test, y_test = run_embeddings(None, model)
    system = model.training_system()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(G_test), min(n_test, len(G_test)), replace=False))
    found, seconds = [], []
    for i in rows.tolist():
        c = system.certificate(G_test[i], limit)
        seconds.append(c.seconds)
        found.append((i, c))
    sizes = [len(c.indices) if c.found else None for _, c in found]
    edges = [1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]
    edges = [e for e in edges if e <= limit] + [limit + 1]
    hist = [[f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo), sum(1 for s in sizes if s is not None and lo <= s < hi)]
            for lo, hi in zip(edges[:-1], edges[1:])]  # [bin, count] pairs: JSON keeps their order
    hist.append([f"none up to {limit}", sum(1 for s in sizes if s is None)])
    pred = model.head_.decision_function(G_test[rows]).argmax(1)
    order = sorted((j for j, s in enumerate(sizes) if s is not None), key=lambda j: sizes[j])[:n_show]
    smallest = [{"image": model.test_records_[rows[j]][0], "label": model.classes_[int(y_test[rows[j]])],
                 "predicted": model.classes_[int(pred[j])], "size": sizes[j],
                 "new_class": model.classes_[int(model.head_.classes_[found[j][1].new_class])],
                 "margin": found[j][1].margin,
                 "training_images": [{"index": t, "path": model.train_records_[t].path,
                                      "label": model.classes_[model.train_records_[t].label]} for t in found[j][1].indices]}
                for j in order]
    known = [s for s in sizes if s is not None]
    return {"n": int(len(rows)), "limit": limit, "found": len(known), "median_size": float(np.median(known)) if known else None,
            "sizes": sizes, "histogram": hist, "smallest": smallest,
            "seconds_per_image_median": float(np.median(seconds)), "seconds_per_image_max": float(np.max(seconds))}
