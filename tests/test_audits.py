"""Every audit command audits the model the run fitted: on a ``head.fit_intercept: false`` run and on a
weighted run, each refit carries every setting of the run's head (its chosen lambda, intercept, solver,
device, chunk size) and the run's weights, and the exact numbers match an independent refit."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from carrot.ridge.head import RidgeHead, frozen_clone
from carrot.ridge.primal import PrimalSystem
from carrot.run.pipeline import Carrot
from carrot.cli import cli

AUDITS = [
    ["evaluate", "--what", "accuracy,mislabel,faithfulness,lds,agreement,deletion", "--k", "1,2", "--n-test", "3",
     "--subsets", "4", "--flip-fraction", "0.25"],
    ["reweight", "--steps", "2", "--val-fraction", "0.34"],
    ["debug", "--drop", "1,2", "--val-fraction", "0.34"],
    ["tracin", "--n-test", "2", "--epochs", "2", "--checkpoints", "2", "--flag-fraction", "0.25"],
    ["bench", "--t", "0,1"],
]


def run(*args: str):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fit_tiny) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit-runs")
    fit_tiny(root / "no_intercept", head={"fit_intercept": False, "lam": 0.5})
    fit_tiny(root / "parent", head={"lam": 0.7})
    run("reweight", root / "parent", "--steps", "3", "--val-fraction", "0.34", "--apply", root / "weighted")
    return {"no_intercept": root / "no_intercept", "weighted": root / "weighted"}


@pytest.fixture
def fits(monkeypatch):
    """Every RidgeHead.fit / PrimalSystem.fit made while an audit runs: (settings, weights)."""
    heads, systems = [], []
    head_fit, system_fit = RidgeHead.fit, PrimalSystem.fit.__func__

    def record_head(self, G, y, sample_weight=None):
        heads.append((self.get_params(), None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)))
        return head_fit(self, G, y, sample_weight)

    def record_system(cls, G, Y, a, lam, fit_intercept=True, device="cpu", chunk_size=65536):
        systems.append(({"lam": lam, "fit_intercept": fit_intercept}, None if a is None else np.asarray(a, dtype=np.float64)))
        return system_fit(cls, G, Y, a, lam, fit_intercept, device, chunk_size)

    monkeypatch.setattr(RidgeHead, "fit", record_head)
    monkeypatch.setattr(PrimalSystem, "fit", classmethod(record_system))
    return heads, systems


def brute_force_loo_loss(model: Carrot, G: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared error of each training image's prediction by the run's head refitted without it (n refits)."""
    w = None if model.sample_weight_ is None else np.asarray(model.sample_weight_)
    out = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        h = frozen_clone(model.head_).fit(G[keep], y[keep], None if w is None else w[keep])
        target = (model.head_.classes_ == y[i]).astype(float)
        out.append(float(((h.decision_function(G[i : i + 1])[0] - target) ** 2).sum()))
    return np.array(out)


@pytest.mark.parametrize("kind", ["no_intercept", "weighted"])
@pytest.mark.parametrize("audit", AUDITS, ids=[a[0] for a in AUDITS])
def test_every_audit_refits_the_fitted_model(runs, kind, audit, fits, tmp_path):
    run_dir = tmp_path / kind
    shutil.copytree(runs[kind], run_dir)
    model = Carrot.load(run_dir)
    head = model.head_
    w = None if model.sample_weight_ is None else np.asarray(model.sample_weight_)
    assert (kind == "weighted") == (w is not None) and (kind == "no_intercept") == (not head.fit_intercept)
    run(audit[0], run_dir, *audit[1:])
    heads, systems = fits
    want = {**head.get_params(), "lam": head.lam_}
    assert all(params == want for params, _ in heads), (want, heads)
    assert all(s["fit_intercept"] == head.fit_intercept and s["lam"] == head.lam_ for s, _ in systems)
    if w is not None:  # every refit is weighted with (a subset of) the run's weights
        steps = systems if audit[0] == "reweight" else []  # RRO's steps: the run's weights times the learned ones
        assert all(a is not None and np.isin(a, w).all() for _, a in heads + (systems if not steps else []))
        if steps:
            from carrot.data import stratified_indices

            y_all = np.array([r.label for r in model.train_records_])
            base = w[stratified_indices(y_all, model.classes_, 0.34, model.config.seed, "train")[0]]
            np.testing.assert_allclose(steps[0][1], base, rtol=1e-12)  # step 0: uniform learned weights
            assert all(a.shape == base.shape and (a[base == 0] == 0).all() for _, a in steps)
    if audit[0] in ("evaluate", "debug", "bench"):
        assert heads, "the audit refits the head, so the recorder must have seen it"

    G = model.train_embeddings_
    y = np.array([r.label for r in model.train_records_])
    G_test = np.load(run_dir / "test_embeddings.npy")
    y_test = np.array([lab for _, lab in model.meta_["test_records"]])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if audit[0] == "evaluate":
        ev = json.loads((run_dir / "evaluation.json").read_text())
        assert ev["accuracy"]["mean"] == pytest.approx(metrics["test_accuracy"])  # the run's own head, refitted
        assert ev["lam"] == head.lam_
    elif audit[0] == "tracin":
        from carrot.audit.tracin import sample_ids

        got = json.loads((run_dir / "tracin" / "self_influence.json").read_text())
        loo = np.array([got[i]["carrot_loo_loss"] for i in sample_ids([r.path for r in model.train_records_])])
        np.testing.assert_allclose(loo, brute_force_loo_loss(model, G, y), rtol=1e-7, atol=1e-10)
    elif audit[0] in ("debug", "reweight"):
        from carrot.data import stratified_indices

        f_rows, v_rows = stratified_indices(y, model.classes_, 0.34, model.config.seed, "train")
        ref = frozen_clone(head).fit(G[f_rows], y[f_rows], None if w is None else w[f_rows])
        test_acc = float((ref.predict(G_test) == y_test).mean())
        if audit[0] == "debug":
            res = json.loads((run_dir / "debug.json").read_text())
            assert res["baseline"]["test_accuracy"] == pytest.approx(test_acc)
            assert res["baseline"]["val_accuracy"] == pytest.approx(float((ref.predict(G[v_rows]) == y[v_rows]).mean()))
        else:
            res = json.loads((run_dir / "reweight.json").read_text())
            assert res["uniform_test_accuracy"] == pytest.approx(test_acc)
            learned = np.asarray(res["weights"])
            assert (learned[v_rows] == 0).all() and (w is None or (learned[w == 0] == 0).all())
    elif audit[0] == "bench":
        rows = json.loads((run_dir / "t_sweep.json").read_text())
        at_t = {r["t"]: r for r in rows}[float(model.config.diffusion.t)]
        assert at_t["lam"] == head.lam_ and at_t["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert (run_dir / "index.html").is_file()
