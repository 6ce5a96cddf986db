"""The run directory object: every file name, a versioned run.json, the same Carrot after fit and load."""
import json
import shutil

import numpy as np
import pytest
import torch

from carrot.audit.registry import AUDITS, Audit, register
from carrot.errors import CarrotError
from carrot.run.pipeline import Carrot
from carrot.report.audits import SECTIONS, audits_html
from carrot.run.rundir import RUN_FORMAT_VERSION, RunDir



@pytest.fixture(scope="module")
def fitted(tmp_path_factory, fit_tiny):
    return fit_tiny(tmp_path_factory.mktemp("rundir") / "run", head={"lam": 0.5})


FITTED_STATE = ("classes_", "train_embeddings_", "sample_weight_", "test_embeddings_", "test_records_", "metrics_", "derived_from_")


def same_state(a: Carrot, b: Carrot) -> None:
    assert a.config == b.config and a.train_records_ == b.train_records_
    for name in FITTED_STATE:
        va, vb = getattr(a, name), getattr(b, name)
        assert (np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb), name
    for name in ("coef_", "intercept_", "feature_mean_", "prior_", "dual_coef_"):
        assert torch.equal(getattr(a.head_, name), getattr(b.head_, name)), name
    assert torch.equal(a.head_.factor_.chol, b.head_.factor_.chol)
    assert a.head_.get_params() == b.head_.get_params()
    skip = ("carrot_version", "python", "torch")
    assert {k: v for k, v in a.meta_.items() if k not in skip} == {k: v for k, v in b.meta_.items() if k not in skip}


def test_a_fitted_model_equals_the_saved_and_loaded_one(fitted, tmp_path):
    run = Carrot.load(fitted)
    y = np.array([r.label for r in run.train_records_])
    model = Carrot(run.config, backbone=run.backbone).fit(run.train_embeddings_, y, run.train_records_, run.classes_)
    model.record_test(run.test_embeddings_, run.test_records_, run.metrics_)
    same_state(model, run)
    model.save(tmp_path / "again")
    same_state(model, Carrot.load(tmp_path / "again"))
    meta = json.loads((tmp_path / "again" / "run.json").read_text())
    assert meta["format"] == "carrot.run" and meta["version"] == RUN_FORMAT_VERSION


def test_run_json_versions(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    meta = json.loads((run / "run.json").read_text())
    for version, match in ((RUN_FORMAT_VERSION + 1, "written by a newer carrot.*upgrade carrot"),
                           (0, "expected a run.json format version"), ("2", "expected a run.json format version"),
                           (True, "expected a run.json format version")):
        (run / "run.json").write_text(json.dumps({**meta, "version": version}))
        with pytest.raises(CarrotError, match=match):
            Carrot.load(run)
    (run / "run.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("version", "classes")}))
    with pytest.raises(CarrotError, match="run.json lacks 'classes'"):
        Carrot.load(run)
    legacy = {k: v for k, v in meta.items() if k != "version"}  # format 1 runs (no version key) still load
    (run / "run.json").write_text(json.dumps(legacy))
    assert Carrot.load(run).classes_ == meta["classes"]


def test_every_audit_file_is_derived_and_cleared_and_a_new_audit_is_one_registration_and_its_section(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    rd = RunDir(run)
    derived = {p.relative_to(run).as_posix() for p in rd.derived()}
    assert {a.file for a in AUDITS.values()} <= derived and {"explanations", "index.html", "train_weights.npy"} <= derived
    audit = register(Audit("toy", "toy.json", lambda r: [f"toy {r['x']}"]))
    try:
        rd.write_audit("toy", {"x": 7})
        assert "<h2>toy</h2><pre>" in audits_html({"toy": {"x": 7}})  # no section of its own: its JSON, shown plainly
        SECTIONS["toy"] = lambda r: f"<h2>Toy {r['x']}</h2>"
        assert rd.read_audit("toy") == {"x": 7} and "<h2>Toy 7</h2>" in audits_html({"toy": {"x": 7}})
        assert run / "toy.json" in rd.derived()
        (run / "explanations").rmdir() if (run / "explanations").is_dir() else None
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        (outside / "keep.txt").write_text("mine")
        (run / "explanations").symlink_to(outside)  # a symlinked output folder: the link goes, its target stays
        with pytest.raises(CarrotError, match="already holds a fitted run; pass --overwrite"):
            rd.check_target(overwrite=False)
        rd.check_target(overwrite=True)  # checks only: the old run stays whole until the new one replaces it
        assert (run / "toy.json").is_file() and rd.exists()
        Carrot.load(run).save(run)  # the refit run replaces the folder whole: derived files go, a link's target stays
        assert not (run / "toy.json").exists() and not (run / "explanations").exists() and (outside / "keep.txt").is_file()
        assert rd.exists() and rd.head.is_file() and rd.train_embeddings.is_file()
        assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no staging or old folder left
    finally:
        del AUDITS[audit.name]
        SECTIONS.pop(audit.name, None)
    with pytest.raises(KeyError, match="unknown audit 'nope'; registered: evaluation"):
        rd.audit("nope")
