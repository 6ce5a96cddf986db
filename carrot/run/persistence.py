"""A run directory written from, and read back into, a fitted :class:`~carrot.run.pipeline.Carrot`: head, token map,
embeddings, weights, metrics and run.json (:class:`~carrot.run.rundir.RunDir`: versioned, hashed, staged and swapped in
whole), every file checked against run.json on the way back."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from carrot.config import RunConfig
from carrot.data import ImageRecord
from carrot.embed.tokenmap import TokenMap
from carrot.errors import CarrotError, check_is_fitted, first_line
from carrot.io import save_npy, write_json
from carrot.ridge.heads import load_head
from carrot.run.rundir import ANY, REFIT, RunDir

if TYPE_CHECKING:
    from carrot.run.pipeline import Carrot


def save_run(model: "Carrot", run_dir: str | Path, finish: Callable[[Path], None] | None = None,
             replace: str | None = ANY) -> None:
    """Write ``model`` as the run directory ``run_dir`` (see :meth:`carrot.run.pipeline.Carrot.save`)."""
    check_is_fitted(model, ("head_",))
    RunDir(run_dir).check_target(overwrite=True, flag="run_dir")  # never replaces a folder of other files
    with RunDir(run_dir).replacing(replace) as rd:
        model.head_.save(rd.head)
        if model.token_map_ is not None:
            model.token_map_.save(rd.token_map)
        save_npy(rd.train_embeddings, model.train_embeddings_)
        if model.sample_weight_ is not None:
            save_npy(rd.train_weights, model.sample_weight_)
        if getattr(model, "test_embeddings_", None) is not None:
            save_npy(rd.test_embeddings, model.test_embeddings_)
        write_json(rd.metrics, getattr(model, "metrics_", {}))
        rd.write_meta(model.meta_)
        if finish is not None:
            finish(rd.path)


def load_run(cls: type, run_dir: str | Path, backbone: Any = None) -> "Carrot":
    """A ``cls`` (:class:`~carrot.run.pipeline.Carrot`) read from ``run_dir`` (see its :meth:`load`)."""
    rd = RunDir(run_dir)
    meta = rd.read_meta()
    try:
        config = RunConfig.from_dict(meta["config"])
    except CarrotError as exc:
        raise CarrotError(f"run '{run_dir}': run.json config is invalid ({exc}); {REFIT}") from None
    # the arithmetic the run's tokens came from ('auto' resolved at fit; a run before it: float32), on any machine;
    # the embedding it was fitted with (runs before the keys: the last block alone, as then)
    saved = meta["config"].get("backbone", {}) if isinstance(meta["config"].get("backbone"), dict) else {}
    config = config.merged({"backbone.precision": meta["backbone"].get("precision", "float32"),
                            "backbone.blocks": saved.get("blocks", meta["backbone"].get("blocks", 1)),
                            "backbone.global_tokens": saved.get("global_tokens", False)})
    if config.backbone.blocks == "auto" or config.backbone.global_tokens == "auto":
        raise CarrotError(f"run '{run_dir}': run.json's embedding is still 'auto' (backbone.blocks / global_tokens are "
                          f"chosen when a run is fitted); {REFIT}")
    model = cls(config, backbone)
    model._backbone_info = meta["backbone"]
    model.run_identity_ = rd.loaded_identity  # what a command that writes into the run checks before it does
    model.head_ = load_head(rd.head)
    model.token_map_ = TokenMap.load(rd.token_map) if config.token_map.kind != "none" else None
    if model.token_map_ is not None and (model.token_map_.kind, model.token_map_.dim) != (config.token_map.kind, config.token_map.dim):
        raise CarrotError(f"run '{run_dir}': {rd.TOKEN_MAP} is a {model.token_map_.kind} map of dim "
                          f"{model.token_map_.dim}, run.json's config says {config.token_map.kind} of dim "
                          f"{config.token_map.dim}; {REFIT}")
    model.train_embeddings_ = _load_array(rd.train_embeddings, run_dir)
    model.train_records_ = [ImageRecord(r[0], int(r[1]), tuple(r[2]) if len(r) > 2 and r[2] else None)
                           for r in meta["train_records"]]
    model.classes_ = list(meta["classes"])
    if model.train_embeddings_.shape != (len(model.train_records_), model.head_.n_features_in_):
        raise CarrotError(f"run '{run_dir}': {rd.TRAIN_EMBEDDINGS} {model.train_embeddings_.shape} does not match "
                          f"the {len(model.train_records_)} training records of run.json and the head's "
                          f"{model.head_.n_features_in_} features; {REFIT}")
    if getattr(model.head_, "X_fit_", None) is not None and len(model.head_.X_fit_) != len(model.train_records_):
        raise CarrotError(f"run '{run_dir}': the head holds {len(model.head_.X_fit_)} training images, run.json "
                          f"{len(model.train_records_)}; {REFIT}")
    head_classes = np.asarray(model.head_.classes_)
    if head_classes.ndim != 1 or len(head_classes) != len(model.classes_) or not np.array_equal(head_classes, np.arange(len(model.classes_))):
        raise CarrotError(f"run '{run_dir}': run.json lists {len(model.classes_)} classes, the head has "
                          f"{len(head_classes)}; {REFIT}")
    model.sample_weight_ = None
    if meta.get("weighted"):
        if not rd.train_weights.is_file():
            raise CarrotError(f"run '{run_dir}': run.json says the head is weighted but {rd.TRAIN_WEIGHTS} is missing")
        model.sample_weight_ = _load_array(rd.train_weights, run_dir)
        if model.sample_weight_.shape != (len(model.train_records_),):
            raise CarrotError(f"run '{run_dir}': {rd.TRAIN_WEIGHTS} does not match the training records")
        try:  # a ridge head written before heads kept their weights takes the run's; any other must have them
            model.head_.restore_weights(model.sample_weight_)
        except CarrotError as exc:
            raise CarrotError(f"run '{run_dir}': {exc}; {REFIT}") from None
    model.metrics_ = meta.get("metrics", {})
    model.test_records_ = meta.get("test_records")
    model.derived_from_ = meta.get("derived_from")
    model.test_embeddings_ = _load_array(rd.test_embeddings, run_dir) if rd.test_embeddings.is_file() else None
    if model.test_embeddings_ is not None and (model.test_records_ is None or model.test_embeddings_.shape
                                              != (len(model.test_records_), model.head_.n_features_in_)):
        raise CarrotError(f"run '{run_dir}': {rd.TEST_EMBEDDINGS} does not match the test records of run.json; {REFIT}")
    return model



def _load_array(path: Path, run_dir: str | Path) -> np.ndarray:
    """A run's .npy file as a finite float64 array, or a one-line error saying how to recover."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CarrotError(f"run '{run_dir}': cannot read {path.name} ({first_line(exc)}); {REFIT}") from None
    if arr.dtype.kind != "f" or not np.isfinite(arr).all():
        raise CarrotError(f"run '{run_dir}': {path.name} holds {arr.dtype} values that are not all finite numbers; {REFIT}")
    return arr.astype(np.float64, copy=False)
