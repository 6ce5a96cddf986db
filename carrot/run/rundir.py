"""The run directory: one object owns its layout (TRAK's savers style); nothing else writes its file names.

Layout (format version 2)::

    run.json                 config, backbone, classes, records, metrics, provenance; written last
    head.safetensors(.json)  the fitted head with its factorisation and weights
    train_embeddings.npy     (n, D) float64
    train_weights.npy        (n,) example weights, weighted runs only
    test_embeddings.npy      (m, D) float64
    metrics.json             the fit's metrics (also inside run.json)
    index.html               the run's overview page
    explanations/            explanations.json and one NNNN_<stem>/ folder per explained image
    predictions.json / .csv  carrot-run predict
    <audit files>            from the registry in :mod:`carrot.audit.registry`
    .shards/                 per-rank embedding shards while a torchrun fit gathers them
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from carrot.audit.registry import AUDITS
from carrot.errors import CarrotError
from carrot.io import read_json, write_json

RUN_FORMAT = "carrot.run"
RUN_FORMAT_VERSION = 2  # 2: "version" key, weights kept in the head; 1: no version key


class RunDir:
    """The files of one run directory. ``RunDir(path).head`` etc. are paths; :meth:`read_meta` validates run.json."""

    RUN_JSON = "run.json"
    HEAD = "head.safetensors"
    TRAIN_EMBEDDINGS = "train_embeddings.npy"
    TRAIN_WEIGHTS = "train_weights.npy"
    TEST_EMBEDDINGS = "test_embeddings.npy"
    METRICS = "metrics.json"
    INDEX = "index.html"
    EXPLANATIONS = "explanations"
    EXPLANATIONS_LIST = "explanations.json"
    PREDICTIONS = "predictions.json"
    SHARDS = ".shards"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- paths ----------------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.path / self.RUN_JSON

    @property
    def head(self) -> Path:
        return self.path / self.HEAD

    @property
    def train_embeddings(self) -> Path:
        return self.path / self.TRAIN_EMBEDDINGS

    @property
    def train_weights(self) -> Path:
        return self.path / self.TRAIN_WEIGHTS

    @property
    def test_embeddings(self) -> Path:
        return self.path / self.TEST_EMBEDDINGS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def index(self) -> Path:
        return self.path / self.INDEX

    @property
    def explanations(self) -> Path:
        return self.path / self.EXPLANATIONS

    @property
    def predictions(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def shards(self) -> Path:
        return self.path / self.SHARDS

    def shard(self, name: str, rank: int) -> Path:
        return self.shards / f"{name}_{rank}.npy"

    @staticmethod
    def explanations_list(root: str | Path) -> Path:
        """The list of explained images in an explanations folder (the run's or an --out one)."""
        return Path(root) / RunDir.EXPLANATIONS_LIST

    @staticmethod
    def explanation_dir(root: str | Path, number: int, image: str | Path) -> Path:
        """NNNN_<stem>/ for the ``number``-th explained image, its stem made file-name safe."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(image).stem)
        return Path(root) / f"{number:04d}_{stem}"

    def audit(self, name: str) -> Path:
        """The result file of the registered audit ``name``."""
        from carrot.audit.registry import get

        return self.path / get(name).file

    # -- run.json ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether a fitted run is here (run.json is written last, so it marks a complete run)."""
        return self.run_json.is_file()

    def read_meta(self) -> dict[str, Any]:
        """run.json, validated: a carrot run of a format version this carrot reads."""
        if not self.path.is_dir():
            raise CarrotError(f"run directory not found: '{self.path}'")
        meta = read_json(self.run_json, "run metadata")
        if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
            raise CarrotError(f"'{self.path}' is not a carrot run directory (run.json has no format {RUN_FORMAT!r})")
        version = meta.get("version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > RUN_FORMAT_VERSION:
            raise CarrotError(f"run '{self.path}': run.json format version {version} was written by a newer carrot "
                              f"(this one reads 1..{RUN_FORMAT_VERSION}); upgrade carrot to use it")
        if version not in range(1, RUN_FORMAT_VERSION + 1) or isinstance(version, bool):
            raise CarrotError(f"run '{self.path}': expected a run.json format version 1..{RUN_FORMAT_VERSION}, got {version!r}")
        missing = [k for k in ("config", "classes", "train_records") if k not in meta]
        if missing:
            raise CarrotError(f"run '{self.path}': run.json lacks {', '.join(missing)}; refit the run")
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.run_json, {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **meta})

    # -- lifecycle --------------------------------------------------------------------------------
    def derived(self) -> list[Path]:
        """What a model's outputs left here besides the fit itself (cleared by ``fit --overwrite``)."""
        names = [self.EXPLANATIONS, self.SHARDS, self.TRAIN_WEIGHTS, self.PREDICTIONS,
                 Path(self.PREDICTIONS).with_suffix(".csv").name, self.INDEX]
        for a in AUDITS.values():
            names += [a.file, *a.extra]
        return [self.path / n for n in dict.fromkeys(names)]

    def clear(self, overwrite: bool) -> None:
        """Refuse to fit over an existing run unless ``overwrite``; then drop what the old model produced."""
        if not self.exists():
            return
        if not overwrite:
            raise CarrotError(f"run directory '{self.path}' already holds a fitted run; pass --overwrite to replace it")
        for p in self.derived():
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)

    def read_audit(self, name: str) -> Any | None:
        p = self.audit(name)
        return read_json(p, p.name) if p.is_file() else None

    def write_audit(self, name: str, result: Any) -> Path:
        p = self.audit(name)
        write_json(p, result)
        return p
