"""The run directory: one object owns its layout (TRAK's savers style); nothing else writes its file names.

Layout (format version 3)::

    run.json                 config, backbone, classes, records, metrics, provenance, the SHA-256 of every
                             array file; written last
    head.safetensors(.json)  the fitted head with its factorisation and weights
    token_map.safetensors    the fitted token feature map, runs with token_map.kind rff | nystroem only
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

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from carrot.audit.registry import AUDITS
from carrot.errors import CarrotError
from carrot.io import read_json, sha256_file, write_json

RUN_FORMAT = "carrot.run"
RUN_FORMAT_VERSION = 3  # 3: SHA-256 of the array files; 2: "version" key, weights kept in the head; 1: no version key
REFIT = "refit it with carrot-run fit --overwrite (the token cache makes that quick)"
ANY = "any"  # RunDir.replacing: the new run may replace whatever run is there
STALE_SECONDS = 24 * 3600  # staging folders left by a killed writer are removed by the next write after a day


class RunDir:
    """The files of one run directory. ``RunDir(path).head`` etc. are paths; :meth:`read_meta` validates run.json."""

    RUN_JSON = "run.json"
    HEAD = "head.safetensors"
    TOKEN_MAP = "token_map.safetensors"
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
    def token_map(self) -> Path:
        return self.path / self.TOKEN_MAP

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
        """NNNN_<stem>/ for the ``number``-th explained image, its stem made file-name safe and short (a long
        stem keeps 48 characters and a hash of the rest, so any file name gives a legal folder name)."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(image).stem).lstrip(".") or "image"
        if len(stem) > 64:
            stem = f"{stem[:48]}-{hashlib.sha256(os.fsencode(stem)).hexdigest()[:12]}"
        return Path(root) / f"{number:04d}_{stem}"

    def audit(self, name: str) -> Path:
        """The result file of the registered audit ``name``."""
        from carrot.audit.registry import get

        return self.path / get(name).file

    # -- run.json ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether a fitted run is here (run.json is written last, so it marks a complete run)."""
        return self.run_json.is_file()

    def identity(self) -> str | None:
        """The SHA-256 of run.json, which names the SHA-256 of every array file (one head, one identity); None when
        no run is here. A command that loaded a run publishes into it only while it still has this identity."""
        try:
            return hashlib.sha256(self.run_json.read_bytes()).hexdigest()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_meta(self) -> dict[str, Any]:
        """run.json, validated: a carrot run of a format version this carrot reads, every key of the type and
        size the rest of the run needs (records against classes), and (format 3) the array files unchanged
        since the fit (their SHA-256). ``self.loaded_identity`` is then the identity of the run.json read."""
        if not self.path.is_dir():
            raise CarrotError(f"run directory not found: '{self.path}'")
        self.loaded_identity = self.identity()
        meta = read_json(self.run_json, "run metadata")
        if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
            raise CarrotError(f"'{self.path}' is not a carrot run directory (run.json has no format {RUN_FORMAT!r})")
        version = meta.get("version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > RUN_FORMAT_VERSION:
            raise CarrotError(f"run '{self.path}': run.json format version {version} was written by a newer carrot "
                              f"(this one reads 1..{RUN_FORMAT_VERSION}); upgrade carrot to use it")
        if version not in range(1, RUN_FORMAT_VERSION + 1) or isinstance(version, bool):
            raise CarrotError(f"run '{self.path}': expected a run.json format version 1..{RUN_FORMAT_VERSION}, got {version!r}")
        self._check_meta(meta)
        if version >= 3:
            self.verify_files(meta["files"])
        if self.identity() != self.loaded_identity:
            raise CarrotError(f"run '{self.path}' was replaced by another process while it was being read; run the "
                              "command again")
        return meta

    def _check_meta(self, meta: dict[str, Any]) -> None:
        def bad(what: str) -> CarrotError:
            return CarrotError(f"run '{self.path}': run.json {what}; {REFIT}")

        required = {"config": dict, "classes": list, "train_records": list, "backbone": dict}
        if meta.get("version", 1) >= 3:
            required["files"] = dict
        for key, kind in required.items():
            if key not in meta:
                raise bad(f"lacks '{key}'")
            if not isinstance(meta[key], kind):
                raise bad(f"'{key}' is a {type(meta[key]).__name__}, expected a {kind.__name__}")
        classes = meta["classes"]
        if len(classes) < 2 or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise bad(f"'classes' must be at least 2 distinct names, got {len(classes)}")
        if not isinstance(meta["backbone"].get("weights_id"), str):
            raise bad("'backbone' has no weights_id")
        for key in ("train_records", "test_records"):
            records = meta.get(key)
            if records is None and key == "test_records":
                continue
            if not isinstance(records, list) or not records:
                raise bad(f"'{key}' must be a non-empty list")
            for i, r in enumerate(records):
                if (not isinstance(r, list) or len(r) < 2 or not isinstance(r[0], str) or isinstance(r[1], bool)
                        or not isinstance(r[1], int) or not 0 <= r[1] < len(classes)):
                    raise bad(f"'{key}' row {i} is {str(r)[:80]}; expected [path, label index < {len(classes)}, ...]")
        if not isinstance(meta.get("metrics", {}), dict):
            raise bad("'metrics' is not a mapping")

    def verify_files(self, files: dict[str, Any]) -> None:
        """Refuse a run whose array files differ from the SHA-256 recorded in run.json (edited, truncated,
        swapped for another run's)."""
        for name, digest in files.items():
            p = self.path / name
            if not isinstance(digest, str) or "/" in name or name.startswith("."):
                raise CarrotError(f"run '{self.path}': run.json 'files' entry {name!r} is malformed; {REFIT}")
            if not p.is_file():
                raise CarrotError(f"run '{self.path}': {name} is missing; {REFIT}")
            if sha256_file(p) != digest:
                raise CarrotError(f"run '{self.path}': {name} was changed or truncated since the fit (its SHA-256 "
                                  f"differs from run.json); {REFIT}")

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write run.json last, with the SHA-256 of every array file already in the folder."""
        names = [self.HEAD, self.HEAD + ".json", self.TOKEN_MAP, self.TRAIN_EMBEDDINGS, self.TRAIN_WEIGHTS,
                 self.TEST_EMBEDDINGS]
        files = {n: sha256_file(self.path / n) for n in names if (self.path / n).is_file()}
        write_json(self.run_json, {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **meta, "files": files})

    # -- lifecycle --------------------------------------------------------------------------------
    def derived(self) -> list[Path]:
        """What a model's outputs left here besides the fit itself (cleared by ``fit --overwrite``)."""
        names = [self.EXPLANATIONS, self.SHARDS, self.TRAIN_WEIGHTS, self.PREDICTIONS,
                 Path(self.PREDICTIONS).with_suffix(".csv").name, self.INDEX]
        for a in AUDITS.values():
            names += [a.file, *a.extra]
        return [self.path / n for n in dict.fromkeys(names)]

    def known(self) -> set[str]:
        """Every name carrot writes at the top of a run directory."""
        return {self.RUN_JSON, self.HEAD, self.HEAD + ".json", self.TOKEN_MAP, self.TRAIN_EMBEDDINGS,
                self.TEST_EMBEDDINGS, self.METRICS, *(p.name for p in self.derived())}

    def check_target(self, overwrite: bool, flag: str = "--out", inside: dict[str, str | Path | None] | None = None) -> None:
        """Before any work: refuse a target that is a file, the current folder, a mount point, in a folder carrot
        cannot write, a folder holding anything carrot did not write, or (unless ``overwrite``) an existing run;
        and one that holds ``inside`` paths ({flag: path}, e.g. the data or the token cache), which the swap
        would delete. Nothing is removed here; :meth:`replacing` swaps the new run in when it is complete."""
        target = self.path.resolve()
        if target.exists() and not target.is_dir():
            raise CarrotError(f"{flag}: '{self.path}' is a file; expected a run directory to write")
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise CarrotError(f"{flag}: '{self.path}' is (or holds) the current folder; carrot replaces a run folder "
                              "whole, so choose a sub-folder")
        if target.is_dir() and os.path.ismount(target):
            raise CarrotError(f"{flag}: '{self.path}' is a mount point; carrot replaces a run folder whole by renaming "
                              "it, so choose a folder inside it")
        parent = next((p for p in target.parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK):
            raise CarrotError(f"{flag}: cannot write in '{parent}' (permission denied)")
        for name, path in (inside or {}).items():
            if path is not None:
                p = Path(path).resolve()
                if p == target or target in p.parents:
                    raise CarrotError(f"{flag}: '{self.path}' holds {name} '{path}', which replacing the run folder "
                                      "would delete; write the run elsewhere")
        if self.exists() and not overwrite:
            raise CarrotError(f"run directory '{self.path}' already holds a fitted run; pass --overwrite to replace it")
        if target.is_dir():
            other = sorted(p.name for p in target.iterdir() if p.name not in self.known())
            if other:
                what = "a fitted run and files carrot did not write" if self.exists() else "other files and no carrot run"
                raise CarrotError(f"{flag}: '{self.path}' holds {what} ({', '.join(other[:3])}); move them or choose "
                                  "another folder (carrot replaces a run folder whole)")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access to this run directory's name among processes: an ``flock`` on its parent folder (a run is
        replaced by renaming it, so the lock cannot live inside it), held while a writer swaps a run in and while a
        reader publishes pages or audits into it; waits while another process holds it. No lock file is left."""
        import fcntl

        parent = self.path.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextmanager
    def publishing(self, identity: str | None) -> Iterator[None]:
        """Under :meth:`locked`, check that this is still the run a command computed with (its ``identity`` when it
        was loaded) before the command writes into it: a run refitted meanwhile by another process is refused by
        name, so no page or audit of an old head lands in a new run."""
        with self.locked():
            if identity is not None and self.identity() != identity:
                raise CarrotError(f"run '{self.path}' was refitted or replaced by another process while this command ran; "
                                  "nothing was written into it; run the command again")
            yield

    @contextmanager
    def replacing(self, replace: str | None = ANY) -> Iterator["RunDir"]:
        """Write a whole run into a staging folder beside this one; when the block succeeds it replaces this
        folder (two renames on one file system, with interrupts held back between them and the old folder put
        back if the second fails), so a run directory is always the old run or the complete new one. On failure
        (disk full, interrupt) the staging folder is removed and the old run is untouched.

        The swap happens under :meth:`locked`, after a check of what is there now: ``replace`` is the identity of the
        run this write may replace (None: no run, as a fit without ``--overwrite`` found it; :data:`ANY`: whatever is
        there), so a second writer that started before the first published is refused then, not only at start-up.
        Staging folders that a killed writer left beside the target more than a day ago are removed first."""
        target = self.path.resolve()
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, target.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        try:
            yield RunDir(staging)
            with self.locked():
                self._swap(staging, replace)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _swap(self, staging: Path, replace: str | None) -> None:
        """Put the staged run in place of this folder (under the lock), unless a run other than ``replace`` is there."""
        target = self.path.resolve()
        now = self.identity()
        if replace != ANY and now is not None and now != replace:
            raise CarrotError(f"run directory '{self.path}' received a run from another process while this one was "
                              "working; nothing was replaced; pass --overwrite to replace it")
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}" if target.exists() else None
        with _no_interrupts():
            if old is not None:
                os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                if old is not None:
                    os.rename(old, target)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def read_audit(self, name: str) -> Any | None:
        p = self.audit(name)
        return read_json(p, p.name) if p.is_file() else None

    def write_audit(self, name: str, result: Any) -> Path:
        p = self.audit(name)
        write_json(p, result)
        return p


def _remove_stale(parent: Path, name: str) -> None:
    """Remove the staging and old folders of run ``name`` that a killed writer left in ``parent`` over a day ago."""
    import time

    from carrot.errors import warn

    import glob

    for p in parent.glob(f".{glob.escape(name)}.*"):
        if p.is_dir() and (p.name.endswith(".partial") or ".old-" in p.name):
            try:
                old = time.time() - p.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
            if old:
                shutil.rmtree(p, ignore_errors=True)
                warn(f"removed '{p}', a run folder that an interrupted writer left over a day ago")


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back for the duration (main thread, POSIX); they are delivered afterwards."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
