"""What the studio knows about one fitted run and every answer it gives, independent of the web layer.

:class:`Studio` loads and validates a run once, prepares the exact what-if of training-set edits over the test set
(:class:`~carrot.ridge.edits.WhatIf`), and answers in plain dicts (JSON-ready). Slow work (a test image's full
explanation with its pixel map, every test image's certificate) runs as :class:`Jobs` on one worker thread, with
the tqdm bars of that work readable as progress. The studio writes only into its own work folder and into new runs
(:meth:`Studio.apply`), never into the run it opened.
"""
from __future__ import annotations

import csv
import io
import re
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.progress import note, watched
from carrot.ridge.edits import Edits, WhatIf
from carrot.ridge.heads import require
from carrot.text import for_csv

REVIEW_N = 20  # label-review rows a what-if answer lists
TOP_K = 8  # training images for and against, and test images supported / inhibited, per page
CERTIFICATE_LIMIT = 50  # the most training images a certificate removes before answering "none found"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Unknown(CarrotError):
    """An id the run does not have (the web layer answers 404)."""


@dataclass
class Job:
    """One slow computation: its progress (the tqdm bars it opened, the last note), then its result or error."""

    id: str
    key: str
    bars: list = field(default_factory=list)
    status: str = "queued"  # queued, running, done, failed
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        bars = [{"desc": getattr(b, "desc", ""), "n": int(getattr(b, "n", 0)),
                 "total": None if getattr(b, "total", None) is None else int(b.total),
                 "postfix": getattr(b, "postfix", None) or ""} for b in list(self.bars)]
        return {"id": self.id, "key": self.key, "status": self.status, "bars": bars, "error": self.error,
                "result": self.result if self.status == "done" else None,
                "seconds": round(time.time() - self.started, 1)}


class Jobs:
    """Slow computations on one worker thread (never two torch jobs at once), each started once per key."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, str] = {}
        self._lock = threading.Lock()
        # what a person waits for (one image's explanation or certificate) never queues behind a batch (every
        # certificate): one worker each
        self._pools = {kind: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"carrot-studio-{kind}")
                       for kind in ("interactive", "batch")}
        self.stopping = threading.Event()

    def start(self, key: str, work: Callable[[], Any], pool: str = "interactive") -> Job:
        """The job for ``key``: the running or finished one if there is one (a failed one is started again)."""
        with self._lock:
            old = self._jobs.get(self._by_key.get(key, ""))
            if old is not None and old.status != "failed":
                return old
            job = Job(uuid.uuid4().hex[:12], key)
            self._jobs[job.id], self._by_key[key] = job, job.id

        def run() -> None:
            job.status, job.started = "running", time.time()
            try:
                with watched(job.bars):
                    job.result = work()
                job.status = "done"
            except Exception as exc:  # the job's page shows the one-line error
                job.error = str(exc) if isinstance(exc, CarrotError) else f"{type(exc).__name__}: {exc}"
                job.status = "failed"

        self._pools[pool].submit(run)
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise Unknown(f"job: no job {job_id!r}")
        return job

    def shutdown(self) -> None:
        """Queued jobs are dropped, a batch stops at its next image, a running explanation finishes; then return."""
        self.stopping.set()
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


class Studio:
    """One fitted run opened for exploration: summary, test and training images, exact what-if, apply, export,
    similar images. ``work_dir``: where explanation pages go (default a new temporary folder, removed by
    :meth:`close`)."""

    def __init__(self, run_dir: str | Path, work_dir: str | Path | None = None) -> None:
        from carrot.run.operations import run_embeddings, run_summary
        from carrot.validation import index_labels

        self.run_dir = Path(run_dir).resolve()
        model, G, y, G_test, y_test = run_embeddings(self.run_dir)
        require(model.head_, "weight_update", "carrot-run studio")
        require(model.head_, "loo", "carrot-run studio")
        if not len(y_test):
            raise CarrotError(f"run '{run_dir}': no test images; the studio shows a run's test predictions")
        self.model, self.G, self.G_test = model, G, G_test
        self.y = index_labels(model.head_.classes_, y, "y")
        self.y_test = index_labels(model.head_.classes_, y_test, "y_test")
        self.classes = list(model.classes_)
        self.system = model.training_system()
        note(f"studio: preparing the exact what-if over {len(y_test)} test images and {len(y)} training images")
        self.what_if = WhatIf(self.system, G_test)
        self.pred = self.what_if.logits.argmax(1).numpy()
        self.margins = _margins(self.what_if.logits)
        self.runner = torch.topk(self.what_if.logits, min(2, len(self.classes)), dim=1).indices[:, -1].numpy()
        note("studio: the run's summary (exact LOO influence, label review)")
        self.summary_ = run_summary(model, G, y, G_test, y_test, n_review=REVIEW_N, inputs=self.what_if.inputs)
        self.review, self.temperature = self.system.loo_cross_entropy()
        self.loo = self.system.loo_logits()
        self._certificates: dict[int, dict[str, Any]] = {}
        self._certificates_lock = threading.Lock()
        self.jobs = Jobs()
        self._own_work = work_dir is None
        self.work_dir = self._work_folder(work_dir)
        self._index = None
        self._index_lock = threading.Lock()

    def _work_folder(self, work_dir: str | Path | None) -> Path:
        """A new folder of the studio's own (a temporary one, or one inside ``work_dir``), never inside the run or
        the data."""
        if work_dir is None:
            return Path(tempfile.mkdtemp(prefix="carrot-studio-")).resolve()
        parent = Path(work_dir).resolve()
        for name, folder in (("the run", self.run_dir), ("the data folder", self.model.config.data.root)):
            if folder and (parent == Path(folder).resolve() or Path(folder).resolve() in parent.parents):
                raise CarrotError(f"--work: '{work_dir}' is inside {name}; the studio never writes there")
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="carrot-studio-", dir=parent)).resolve()

    def close(self) -> None:
        self.jobs.shutdown()
        if self._own_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- names -------------------------------------------------------------------------------------
    def _train_row(self, i: int, **extra: Any) -> dict[str, Any]:
        r = self.model.train_records_[i]
        return {"index": int(i), "name": Path(r.path).name, "label": self.classes[int(self.y[i])],
                "label_index": int(self.y[i]), "weight": float(self.system.a[i]), **extra}

    def _test_row(self, j: int, **extra: Any) -> dict[str, Any]:
        return {"index": int(j), "name": Path(self.model.test_records_[j][0]).name,
                "label": self.classes[int(self.y_test[j])], "predicted": self.classes[int(self.pred[j])],
                "correct": bool(self.pred[j] == self.y_test[j]), "margin": float(self.margins[j]), **extra}

    def check_index(self, split: str, i: Any) -> int:
        n = len(self.y) if split == "train" else len(self.y_test)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise Unknown(f"{split} index: expected 0..{n - 1}, got {i!r}")
        return i

    def image_path(self, split: str, i: int) -> str:
        i = self.check_index(split, i)
        return self.model.train_records_[i].path if split == "train" else self.model.test_records_[i][0]

    # -- pages ---------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        s = self.summary_
        keep = ("classes", "confusion", "confused_pairs", "test_accuracy", "per_class", "harmful", "helpful",
                "label_review", "label_review_temperature", "n_train", "n_test", "head", "embedding", "backbone", "t")
        out = {k: s[k] for k in keep}
        for key in ("harmful", "helpful", "label_review"):  # the studio's own rows: name, label column, weight
            out[key] = [self._train_row(r["index"], score=r["score"],
                                        **({"loo_predicted": r["loo_predicted"]} if "loo_predicted" in r else {}))
                        for r in s[key]]
        out["run"] = self.run_dir.name
        out["derived_from"] = self.model.derived_from_
        out["exact_for"] = self.exact_for()
        out["similarity"] = self.model.head_.similarity_words
        return out

    def exact_for(self) -> str:
        head = self.model.head_
        return (f"exact for a refit of this {head.describe()} on the edited training set{head.refit_note} (Woodbury / "
                "linearity in the labels, no refit)")

    def test_list(self) -> list[dict[str, Any]]:
        """Every test image; ``certificate``: null (not computed yet), its size, or "none" (no set within the limit)."""
        with self._certificates_lock:
            known = dict(self._certificates)
        return [self._test_row(j, certificate=None if j not in known else
                               (len(known[j]["indices"]) if known[j]["found"] else "none")) for j in range(len(self.y_test))]

    def certificate(self, j: int) -> dict[str, Any]:
        """Test image j's certificate (:meth:`TrainingSystem.certificate`, checked by one refit), computed once."""
        j = self.check_index("test", j)
        with self._certificates_lock:
            if j in self._certificates:
                return self._certificates[j]
        cert = self.system.certificate(self.G_test[j], limit=CERTIFICATE_LIMIT)
        out = {"found": cert.found, "indices": [int(i) for i in cert.indices], "limit": cert.limit,
               "new_class": None if cert.new_class is None else self.classes[int(cert.new_class)],
               "margin_after": cert.margin, "refit_error": cert.refit_max_abs_diff, "seconds": cert.seconds,
               "images": [self._train_row(int(i)) for i in cert.indices]}
        with self._certificates_lock:
            self._certificates[j] = out
        return out

    def certificate_job(self, j: int) -> Job:
        j = self.check_index("test", j)
        return self.jobs.start(f"certificate:{j}", lambda: self.certificate(j))

    def test_detail(self, j: int) -> dict[str, Any]:
        j = self.check_index("test", j)
        c = int(self.pred[j])
        logits = self.what_if.logits[j]
        k = int(self.runner[j])
        lj = self.system.equivalent_kernel(self.G_test[j : j + 1])[0]
        eff = -lj.unsqueeze(1) * self.system.loo_residuals()  # (n, C): f_-i(x) - f(x), exact
        margin_eff = (eff[:, c] - eff[:, k]).numpy()
        order = np.argsort(margin_eff, kind="stable")
        with self._certificates_lock:
            cert = self._certificates.get(j)
        return {**self._test_row(j), "runner_up": self.classes[k],
                "scores": {self.classes[i]: float(v) for i, v in enumerate(logits.tolist())},
                "for": [self._train_row(int(i), margin_effect=float(margin_eff[i])) for i in order[:TOP_K]
                        if margin_eff[i] < 0],
                "against": [self._train_row(int(i), margin_effect=float(margin_eff[i])) for i in order[::-1][:TOP_K]
                            if margin_eff[i] > 0],
                "certificate": cert,  # None until computed (:meth:`certificate_job`)
                "effect_meaning": "the change of this prediction's margin (predicted minus runner-up logit) when the "
                                  "training image is removed; exact (a refit without it gives the same)"}

    def train_detail(self, i: int) -> dict[str, Any]:
        i = self.check_index("train", i)
        _, Li = self.what_if.columns(np.asarray([i]))
        eff = -Li[:, 0].unsqueeze(1) * self.system.loo_residuals()[i]  # (m, C) effect of removing i on each test image
        rows = np.arange(len(self.pred))
        margin_eff = (eff[rows, self.pred] - eff[rows, self.runner]).numpy()
        order = np.argsort(margin_eff, kind="stable")
        loo = self.loo[i]
        active = self.system.a > 0
        rank = int(((self.review > self.review[i]) & active).sum()) + 1
        return {**self._train_row(i), "path": self.model.train_records_[i].path,
                "loo_predicted": self.classes[int(loo.argmax())],
                "loo_scores": {self.classes[c]: float(v) for c, v in enumerate(loo.tolist())},
                "review_score": float(self.review[i]), "review_rank": rank if bool(active[i]) else None,
                "n_reviewed": int(active.sum()),
                "supports": [self._test_row(int(j), margin_effect=float(margin_eff[j])) for j in order[:TOP_K]
                             if margin_eff[j] < 0],
                "inhibits": [self._test_row(int(j), margin_effect=float(margin_eff[j])) for j in order[::-1][:TOP_K]
                             if margin_eff[j] > 0],
                "effect_meaning": "the change of each test prediction's margin if this training image were removed "
                                  "(negative: it supports the prediction), exact"}

    def review_list(self, n: int = 50) -> list[dict[str, Any]]:
        scores = np.where(self.system.a.numpy() > 0, self.review.numpy(), -np.inf)
        order = np.argsort(-scores, kind="stable")[:n]
        return [self._train_row(int(i), score=float(scores[i]), loo_predicted=self.classes[int(self.loo[i].argmax())])
                for i in order if np.isfinite(scores[i])]

    # -- what-if, verify, apply, export --------------------------------------------------------------------
    def edits(self, actions: Any) -> Edits:
        return Edits.of(self.system, actions)

    def answer(self, actions: Any, verify: bool = False) -> dict[str, Any]:
        """The whole test set and the label review after the edit ``actions`` (:meth:`Edits.of`), exactly; ``verify``:
        also refit on the edited data and report the largest difference."""
        t0 = time.perf_counter()
        edits = self.edits(actions)
        res = self.what_if(edits)
        pred = res.logits.argmax(1).numpy()
        loo = res.loo_logits()
        review, T = res.label_review(loo)
        seconds = time.perf_counter() - t0
        C = len(self.classes)
        n_test = np.bincount(self.y_test, minlength=C)
        hits0 = np.bincount(self.y_test[self.pred == self.y_test], minlength=C)
        hits1 = np.bincount(self.y_test[pred == self.y_test], minlength=C)
        margins = _margins(res.logits)
        changed = np.flatnonzero(pred != self.pred)
        scores = np.where(res.a.numpy() > 0, review.numpy(), -np.inf)
        order = np.argsort(-scores, kind="stable")[:REVIEW_N]
        out = {
            "n_edits": len(edits), "seconds": seconds,
            "accuracy_before": float((self.pred == self.y_test).mean()), "accuracy_after": float((pred == self.y_test).mean()),
            "per_class": [{"class": self.classes[c], "n_test": int(n_test[c]), "before": float(hits0[c] / max(1, n_test[c])),
                           "after": float(hits1[c] / max(1, n_test[c]))} for c in range(C)],
            "changed": [{**self._test_row(int(j)), "after": self.classes[int(pred[j])], "margin_after": float(margins[j]),
                         "correct_after": bool(pred[j] == self.y_test[j])} for j in changed],
            "label_review": [{**self._train_row(int(i)), "label": self.classes[int(res.Y[i].argmax())],
                              "weight": float(res.a[i]), "score": float(scores[i]),
                              "loo_predicted": self.classes[int(loo[i].argmax())]} for i in order if np.isfinite(scores[i])],
            "label_review_temperature": T, "exact_for": self.exact_for(),
        }
        if verify:
            out["verify"] = self.verify(edits, res)
        return out

    def verify(self, edits: Edits, res: Any) -> dict[str, Any]:
        """A refit on the edited data (the head's settings and choices held): the largest difference of the test
        logits and of the live rows' LOO logits from the what-if's."""
        t0 = time.perf_counter()
        a, y_col = edits.applied(self.system)
        head = self.model.head_
        ref = head.refit(self.G, head.classes_[y_col], a)
        cols = torch.as_tensor(np.searchsorted(head.classes_, ref.classes_))
        F = torch.as_tensor(ref.decision_function(self.G_test))
        loo = ref.system(self.G, head.classes_[y_col], a).loo_logits()
        live = torch.as_tensor(a > 0)
        dl = float((F - res.logits[:, cols]).abs().max())
        dloo = float((loo[live] - res.loo_logits()[live][:, cols]).abs().max())
        empty = [c for c in range(len(head.classes_)) if c not in set(cols.tolist())]
        if empty:  # a class relabelled away: its logit is 0 in the what-if, absent from the refit
            dl = max(dl, float(res.logits[:, empty].abs().max()))
        return {"max_abs_logit_diff": dl, "max_abs_loo_diff": dloo, "refit_seconds": time.perf_counter() - t0,
                "scale": float(res.logits.abs().max())}

    def describe_edits(self, edits: Edits) -> list[dict[str, Any]]:
        a = self.system.a.numpy()
        out = []
        for i, w, c, action in zip(edits.rows.tolist(), edits.weights.tolist(), edits.labels.tolist(), edits.actions):
            r = self.model.train_records_[i]
            out.append({"index": i, "path": r.path, "label": self.classes[int(self.y[i])], "action": action,
                        "new_label": self.classes[c], "old_weight": float(a[i]), "new_weight": w})
        return out

    def export(self, actions: Any, fmt: str) -> tuple[str, str]:
        """(text, media type) of the edits as CSV or JSON, with each image's path: to apply to the data set itself."""
        rows = self.describe_edits(self.edits(actions))
        if fmt == "json":
            import json

            return json.dumps({"run": str(self.run_dir), "edits": rows}, indent=2), "application/json"
        if fmt != "csv":
            raise CarrotError(f"format: expected 'csv' or 'json', got {fmt!r}")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["index", "path", "label", "action", "new_label", "old_weight", "new_weight"])
        w.writeheader()
        w.writerows([{k: for_csv(v) for k, v in r.items()} for r in rows])  # no cell read as a formula
        return buf.getvalue(), "text/csv"

    def apply(self, actions: Any, name: Any) -> dict[str, Any]:
        """Write a new run named ``name`` beside the opened one (never over it or any other): the parent's data,
        embeddings and fitted choices, its head refitted on the edited labels and weights; it records its parent and
        the edits. Returns its path and test accuracy."""
        from carrot.run.operations import _apply_weights, check_outside_data, clear_run

        if not isinstance(name, str) or not RUN_NAME.match(name) or name in (".", ".."):
            raise CarrotError(f"name: expected a new run's folder name (letters, digits, '.', '_', '-'; not starting "
                              f"with '.' or '-'), got {name!r}")
        edits = self.edits(actions)
        if not len(edits):
            raise CarrotError("edits: expected at least one edit to apply")
        a, y_col = edits.applied(self.system)
        out = self.run_dir.parent / name
        if out.exists() or out.is_symlink():
            raise CarrotError(f"name: '{out}' already exists; choose a new name (the studio never writes over anything)")
        check_outside_data(self.model.config, out, "name")
        clear_run(out, overwrite=False, flag="name", config=self.model.config)
        how = {"by": "studio", "edits": self.describe_edits(edits)}
        y_test = np.asarray([lab for _, lab in self.model.test_records_])
        _apply_weights(self.model, self.run_dir, out, a, self.model.head_.classes_[y_col], self.G_test, y_test, how)
        from carrot.run.pipeline import Carrot

        child = Carrot.load(out)
        return {"run": str(out), "name": name, "test_accuracy": child.metrics_["test_accuracy"],
                "command": f"carrot-run studio {out}"}

    # -- slow work -----------------------------------------------------------------------------------
    def explain_job(self, j: int) -> Job:
        """A test image's full explanation page (pixel map included), written into the work folder."""
        from carrot.report.pages import write_explanation

        j = self.check_index("test", j)

        def work() -> dict[str, Any]:
            target = self.work_dir / "explanations" / f"{j:05d}"
            exp = next(iter(self.model.explain_iter([self.model.test_records_[j][0]], TOP_K)))
            if target.exists():
                shutil.rmtree(target)
            write_explanation(exp, target)
            return {"page": f"explanations/{j:05d}/explanation.html"}

        return self.jobs.start(f"explain:{j}", work)

    def certificates_job(self) -> Job:
        """Every test image's certificate size (the fewest training images found whose removal flips it)."""
        from carrot.progress import bar

        def work() -> dict[str, Any]:
            for j in bar(range(len(self.y_test)), desc="certificates", unit="img"):
                if self.jobs.stopping.is_set():
                    break
                self.certificate(j)
            with self._certificates_lock:
                return {"sizes": {str(j): len(c["indices"]) if c["found"] else "none"
                                  for j, c in self._certificates.items()}}

        return self.jobs.start("certificates", work, pool="batch")

    def similar(self, split: str, i: int, k: int = 12) -> dict[str, Any]:
        """The k training images most similar to image ``i`` of ``split`` by the head's own similarity."""
        from carrot.attribution.retrieval import SimilarIndex

        i = self.check_index(split, i)
        with self._index_lock:
            if self._index is None:
                self._index = SimilarIndex.build(self.model.head_, self.G)
        g = (self.G if split == "train" else self.G_test)[i : i + 1]
        kk = min(self.system.n, k + (split == "train"))
        idx, val = self._index.search(g, kk)
        rows = [(int(t), float(v)) for t, v in zip(idx[0], val[0])
                if np.isfinite(v) and not (split == "train" and int(t) == i)][:k]
        return {"similarity": self.model.head_.similarity_words, "index_kind": self._index.kind,
                "images": [self._train_row(t, similarity=v) for t, v in rows]}


def _margins(logits: torch.Tensor) -> np.ndarray:
    """Top logit minus the runner-up's, per row (m,)."""
    top2 = torch.topk(logits, min(2, logits.shape[1]), dim=1).values
    return (top2[:, 0] - top2[:, -1]).numpy()


def parse_actions(body: Any) -> Sequence[Any]:
    """The ``edits`` list of a request body, or a one-line error."""
    if not isinstance(body, dict) or "edits" not in body:
        raise CarrotError("body: expected a JSON object with an 'edits' list")
    return body["edits"]
