"""Run-directory level work: cached embeddings of a fitted run, its summary, its index page, and the commands that
read a run and write an audit or a derived run (predict, compare, reweight, debug, tracin, bench)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from carrot.distributed import world
from carrot.embed.choice import embedding_line
from carrot.attribution.representer import class_summary
from carrot.audit.registry import AUDITS
from carrot.errors import CarrotError
from carrot.io import atomic_path, read_json, write_csv, write_json
from carrot.ridge.heads import HEADS, kind_of, require
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
                n_review: int = 8, inputs: Any = None) -> dict[str, Any]:
    """Accuracy, per-class table, confusion matrix, the most harmful / helpful training images by the exact
    leave-one-out change of the test loss, and the label-review list: the training labels the rest of the
    data disagrees with most (exact LOO cross-entropy, temperature calibrated on the training labels). ``inputs``:
    G_test prepared by the run's training system (:meth:`TrainingSystem.counterfactuals`), when the caller has it."""
    head = model.head_
    pred = head.decision_function(G_test).argmax(1)
    C = len(model.classes_)
    matrices = C <= MATRIX_CLASSES  # C x C tables only where a person can read them (and memory allows)
    n_test = np.bincount(y_test, minlength=C)
    hits = np.bincount(y_test[pred == y_test], minlength=C)
    confused = {}
    for t, p_ in zip(y_test[pred != y_test].tolist(), pred[pred != y_test].tolist()):
        confused[(t, p_)] = confused.get((t, p_), 0) + 1
    system = model.training_system()  # the head's own factor, shared with explain and certificates
    total = -system.loo_loss_change(G_test, index_labels(head.classes_, y_test, "y_test"),  # > 0: removal helps
                                    inputs=inputs).numpy()

    def rows(order, scores):
        return [{"index": int(i), "path": model.train_records_[i].path,
                 "label": model.classes_[model.train_records_[i].label], "score": float(scores[i])} for i in order]

    k = min(n_review, len(total))
    loo = system.loo_logits()
    review, temperature = system.loo_cross_entropy(loo)
    review = np.where(system.a.numpy() > 0, review.numpy(), -np.inf)  # images outside the model are not reviewed
    loo_pred = loo.argmax(1).numpy()
    flow = class_summary(system, G_test, flow=matrices) if len(y_test) else None
    carry = flow["total_contribution"] if flow is not None else np.zeros(len(y))
    return {
        "classes": model.classes_, "confusion": _confusion(confused, hits) if matrices else None,
        "confused_pairs": [[model.classes_[t], model.classes_[p_], k] for (t, p_), k in
                           sorted(confused.items(), key=lambda kv: (-kv[1], kv[0]))[:MOST_CONFUSED]],
        "test_accuracy": float((pred == y_test).mean()) if len(y_test) else float("nan"),
        "per_class": {c: {"n_test": int(n_test[i]), "accuracy": float(hits[i] / max(1, n_test[i]))}
                      for i, c in enumerate(model.classes_)},
        "harmful": rows(np.argsort(-total, kind="stable")[:k], total),
        "helpful": rows(np.argsort(total, kind="stable")[:k], total),
        "carriers": rows(np.argsort(-carry, kind="stable")[:k], carry) if flow is not None else [],
        "label_review": [{**r, "loo_predicted": model.classes_[int(head.classes_[loo_pred[r["index"]]])]}
                         for r in rows(np.argsort(-review, kind="stable")[:k], review)],
        "label_review_temperature": temperature,
        "class_flow": flow["class_flow"].tolist() if flow is not None and flow["class_flow"] is not None else None,
        "n_train": int(len(y)), "n_test": int(len(y_test)), "lam": float(head.lam_),
        "t": model.config.diffusion.t, "backbone": model.config.backbone.name,
        "embedding": embedding_line((model.metrics_ or {}).get("embedding_choice"), model.config),
        "head": head_line(head, (getattr(head, "head_choice_", None) or (model.metrics_ or {}).get("head_choice"))
                          if model.config.head.kind == "auto" else None),
    }


MATRIX_CLASSES = 40  # up to this many classes the index shows the confusion matrix and the class flow (C x C)
MOST_CONFUSED = 30  # the (true, predicted) pairs the index lists, most frequent first


def _confusion(confused: dict[tuple[int, int], int], hits: np.ndarray) -> list[list[int]]:
    """The confusion matrix (rows true class, columns predicted) from the wrong pairs' counts and each class's hits."""
    cm = np.diag(hits).astype(int)
    for (t, p), k in confused.items():
        cm[t, p] = k
    return cm.tolist()


def head_line(head: Any, choice: dict[str, Any] | None = None) -> str:
    """Which head the run kept, its settings, and (head.kind auto: ``choice``, the fit's record) every candidate's
    exact LOO accuracy."""
    line = head.describe()
    if choice:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in choice.items() if k in HEADS and v is not None)
        skipped = "; ".join(f"the {k[: -len('_skipped')]} head was not fitted: {v}" for k, v in choice.items()
                            if k.endswith("_skipped") and v)
        searched = "; ".join(f"the {k[: -len('_search')]} head searched {v}" for k, v in choice.items()
                             if k.endswith("_search") and v)
        notes = "; ".join(v for v in (skipped, searched) if v)
        line += f", kept by head.kind auto (exact LOO accuracy: {scores}" + (f"; {notes})" if notes else ")")
    return line


def publish(run_dir: str | Path, model: Carrot, write: Callable[[RunDir], Any] | None = None, index: bool = True) -> None:
    """Write into a fitted run (``write(rd)``, then its index page) only while it is still the run ``model`` was
    loaded from, under the run's lock (:meth:`RunDir.publishing`): a run refitted meanwhile is refused by name."""
    rd = RunDir(run_dir)
    with rd.publishing(getattr(model, "run_identity_", None)):
        if write is not None:
            write(rd)
        if index:
            write_index(run_dir, model=model)


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
    thumbs = {r["index"]: geo(model.training_image(r["index"]))
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
    header = ["image", "predicted", "score", "runner_up", "margin", *model.classes_]
    table = [[r["image"], r["predicted"], r["score"], r["runner_up"], r["margin"], *r["scores"].values()] for r in rows]

    def write(path: Path) -> None:  # the CSV first: a JSON beside it means both are complete
        write_csv(path.with_suffix(".csv"), header, table)
        write_json(path, rows)

    if out:
        write(Path(out))
    else:
        publish(run_dir, model, lambda rd: write(rd.predictions), index=False)
    return rows


def compare(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Two runs on the same test images (e.g. a run and its reweighted / debugged child, or two backbones):
    accuracies, per-class change, McNemar's exact test, and the test images whose prediction changed."""
    from carrot.audit.compare import compare_predictions

    (ma, _, _, Ga, y), (mb, _, _, Gb, yb) = run_embeddings(run_a), run_embeddings(run_b)
    paths_a, paths_b = [p for p, _ in ma.test_records_], [p for p, _ in mb.test_records_]
    if paths_a != paths_b or not np.array_equal(y, yb) or ma.classes_ != mb.classes_:
        raise CarrotError(f"compare: runs '{run_a}' and '{run_b}' have different test images, labels or classes")
    pa, pb = ma.head_.predict(Ga), mb.head_.predict(Gb)
    res = compare_predictions(pa, pb, y, ma.classes_)
    res["runs"] = {"a": str(run_a), "b": str(run_b)}
    res["changed"] = [{"image": paths_a[i], "label": ma.classes_[y[i]], "a": ma.classes_[pa[i]], "b": ma.classes_[pb[i]]}
                      for i in np.flatnonzero(pa != pb)]
    write_json(out, res) if out else publish(run_b, mb, lambda rd: rd.write_audit("compare", res))
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
    write_json(out, summary) if out else publish(run_dir, model, lambda rd: rd.write_audit("reweight", summary))
    if apply is not None:
        _apply_weights(model, run_dir, apply, weights, y, G_test, y_test,
                       {"by": "reweight", **{k: v for k, v in summary.items() if k not in ("weights", "history")}})
    return summary


def _apply_weights(model: Carrot, run_dir: str | Path, out: str | Path, weights: np.ndarray, y: np.ndarray,
                   G_test: np.ndarray, y_test: np.ndarray, how: dict[str, Any]) -> None:
    """A new run in ``out``: the parent's data, config and lambda, its head refitted with example ``weights`` on the
    labels ``y`` (class indices; the parent's, or edited)."""
    from carrot.audit.evaluate import per_class_accuracy

    # the parent's fitted choices pinned in the config, never a new 'auto' choice
    derived = Carrot(model.config.merged({"head.kind": kind_of(model.head_).name, **model.head_.pinned()}),
                     backbone=model.backbone)
    derived.token_map_ = model.token_map_  # the embeddings are the parent's
    # every setting held (a kernel parent's feature map too), as RRO and debug's loops hold it: the run is the model
    # they scored
    held = model.head_.refit(model.train_embeddings_, y, weights)
    # the records carry the labels the head was fitted with (a relabelling edit changes them)
    records = [r if r.label == int(lab) else dataclasses.replace(r, label=int(lab)) for r, lab in zip(model.train_records_, y)]
    derived.fit(model.train_embeddings_, y, records, model.classes_, sample_weight=weights, head=held)
    pred = derived.head_.predict(G_test)
    metrics = {**model.metrics_, "lam": derived.head_.lam_, "lam_path": None, "head_choice": None,
               "train_accuracy": derived.score(model.train_embeddings_, y), "test_accuracy": float((pred == y_test).mean()),
               "per_class_test_accuracy": dict(zip(model.classes_, per_class_accuracy(pred, y_test, len(model.classes_))))}
    derived.record_test(G_test, model.test_records_, metrics, {"run": str(Path(run_dir).resolve()), **how})
    derived.save(out, finish=lambda staging: write_index(staging, model=derived, name=Path(out).resolve().name),
                 replace=None)  # a new run: refused at publish if another process wrote one there meanwhile


def bench(run_dir: str | Path, ts: Sequence[float], out: str | Path | None = None,
          pixel_images: int = 0) -> list[dict[str, Any]]:
    """Diffusion-time sweep on a fitted run's token caches; writes t_sweep.json and .csv. With ``pixel_images``
    > 0, each t's model is also measured by the pixel protocol on that many test images (its pixel and token
    maps' deletion / insertion AUC): does diffusion make the maps more or less faithful to the pixels?"""
    from carrot.audit.protocols import pixel_columns, pixel_deletion
    from carrot.audit.sweep import t_sweep

    model = Carrot.load(run_dir)
    train, test = _token_stores(run_dir, model, (0, 1))

    def pixels_at(t: float, head) -> dict[str, float]:
        at_t = Carrot(model.config.merged({"diffusion.t": t}), backbone=model.backbone)
        at_t.head_, at_t.test_records_, at_t.token_map_ = head, model.test_records_, model.token_map_
        res = pixel_deletion(at_t, pixel_images, seed=model.config.seed, maps=("shapley", "token"))
        return pixel_columns(res)

    rows = t_sweep(train, test, ts, model.embedder, model.head_, model.sample_weight_,
                   on_fit=pixels_at if pixel_images > 0 else None)
    fields = sorted({k for r in rows for k in r})

    def write(path: Path) -> None:
        write_csv(path.with_suffix(".csv"), fields, ([r.get(k) for k in fields] for r in rows))
        write_json(path, rows)

    write(Path(out)) if out else publish(run_dir, model, lambda rd: write(rd.audit("t_sweep")))
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
    def write(rd: RunDir) -> None:
        summary = rd.write_audit("tracin", rep["summary"])
        for name, part in rep.items():  # the per-image parts beside the summary
            write_json(summary.parent / f"{name}.json", part)

    publish(run_dir, model, write)
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
    publish(run_dir, model, lambda rd: rd.write_audit("debug", res))
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
    return [open_store(caches[s], verify=True, blocks=model.config.backbone.blocks) for s in splits]


def cached_test_split(run_dir: str | Path, model: Carrot):
    """The run's test token cache (see :func:`_token_stores`)."""
    return _token_stores(run_dir, model, (1,))[0]
