"""A run fitted with the kernel head, through the commands: fit, load, predict, explain (exact training-image
views, token removal map, pixel map), evaluate accuracy, t sweep, compare; refusals by name where the kernel
head has no such property."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from carrot.cli import cli


@pytest.fixture(scope="module", params=["exact", "nystroem"])
def kernel_run(request, tmp_path_factory, fit_tiny):
    """The kernel head's exact dual, and its Nystroem approximation (8 landmarks) explained exactly as that model."""
    return fit_tiny(tmp_path_factory.mktemp(request.param) / "run",
                    head={"kind": "kernel", "kernel": "rbf", "approx": request.param, "landmarks": 8})


def refit_without(h, keep: np.ndarray):
    """An independent refit of the kernel head's model on training rows ``keep``: the exact dual solved directly, or
    sklearn's Ridge on the Nystroem features (sklearn's kernel of the landmarks), preprocessing and gamma held."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics.pairwise import rbf_kernel

    Z, y = h.X_fit_.numpy(), h.train_targets_.argmax(1).numpy()
    if h.approx_ == "exact":
        from carrot.ridge.kernel import KernelRidgeHead

        return KernelRidgeHead(kernel=h.kernel, gamma=h.gamma_, lam=h.lam_, standardize=False, approx="exact").fit(
            Z[keep], y[keep]).decision_function

    def phi(X):
        return rbf_kernel(X, h.landmarks_.numpy(), gamma=h.gamma_) @ h.normalization_.numpy()

    ridge = Ridge(alpha=h.lam_, solver="cholesky").fit(phi(Z[keep]), h.train_targets_.numpy()[keep])
    return lambda X: ridge.predict(phi(X))


def test_the_run_fits_saves_and_loads_the_kernel_head(kernel_run):
    from carrot.ridge.kernel import KernelRidgeHead
    from carrot.run.pipeline import Carrot

    model = Carrot.load(kernel_run)
    assert isinstance(model.head_, KernelRidgeHead) and model.head_.gamma_ > 0 and model.head_.lam_ > 0
    metrics = json.loads((kernel_run / "metrics.json").read_text())
    assert metrics["head"] == "kernel" and metrics["loo_path"] and 0 <= metrics["test_accuracy"] <= 1
    G = np.asarray(model.test_embeddings_)
    y = np.array([lab for _, lab in model.test_records_])
    assert metrics["test_accuracy"] == pytest.approx(float((model.head_.predict(G) == y).mean()))
    paths = [p for p, _ in model.test_records_[:3]]
    assert np.allclose(model.pixel_logits(model.inputs(paths)), model.head_.decision_function(model.embed_images(paths)[0]),
                       atol=1e-12)
    index = (kernel_run / "index.html").read_text()
    assert "harmful" in index.lower() or "Harmful" in index
    ny = ", Nystroem with 8 landmarks" if model.head_.approx_ == "nystroem" else ""
    assert f"kernel head (rbf, gamma = {model.head_.gamma_:.4g}{ny})" in index and "kept by" not in index
    assert metrics["approx"] == model.head_.approx_ and (model.head_.landmarks_ is None) == (not ny)


def test_the_default_head_is_auto_and_the_index_says_which_it_kept(tmp_path, fit_tiny):
    from carrot.config import RunConfig
    from carrot.ridge.heads import kind_of
    from carrot.run.pipeline import Carrot

    assert RunConfig().head.kind == "auto"
    run = fit_tiny(tmp_path / "auto")
    model = Carrot.load(run)
    choice = json.loads((run / "metrics.json").read_text())["head_choice"]
    kept = kind_of(model.head_).name
    assert set(choice) == {"ridge", "kernel"} and kept == ("kernel" if choice["kernel"] > choice["ridge"] else "ridge")
    index = (run / "index.html").read_text()
    assert (f"{kept} head" in index and "kept by head.kind auto (exact LOO accuracy: "
            f"ridge {choice['ridge']:.4f}, kernel {choice['kernel']:.4f})" in index)


def test_explain_with_the_kernel_head_keeps_the_exact_training_image_views(kernel_run, tmp_path, explain_json):
    from carrot.run.pipeline import Carrot

    model = Carrot.load(kernel_run)
    path = model.test_records_[0][0]
    exp = explain_json(kernel_run, path, tmp_path, "--permutations", "2")
    assert exp["head"] == "kernel" and "region_contributions" not in exp and "certificate" in exp
    assert exp["identity_error"]["data"] < 1e-9 and exp["identity_error"]["equivalent_kernel"] < 1e-9
    assert "regions" not in exp["identity_error"] and "region_removal" in exp["meaning"] and "pairs" not in exp["meaning"]
    drops = np.asarray(exp["region_removal"])
    assert drops.shape == tuple(exp["grid"]) and np.isfinite(drops).all()
    top = exp["supporting"][0]
    keep = np.arange(len(model.train_records_)) != top["index"]  # the score is a refit without the image
    h = model.head_
    G = model.embed_images([path])[0]
    z = h.preprocess(torch.as_tensor(G, dtype=torch.float64)).numpy()  # the fixed preprocessing, then a plain refit
    f, f_minus = h.decision_function(G)[0], refit_without(h, keep)(z)[0]
    assert top["score"] == pytest.approx(f[exp["predicted_index"]] - f_minus[exp["predicted_index"]], abs=1e-8)
    page = next(tmp_path.glob("0000_*/explanation.html")).read_text()
    assert "each token's exact removal from the graph" in page and "Shapley value" in page


def test_kernel_run_commands_work_or_refuse_by_name(kernel_run, tmp_path):
    ok = [["predict", str(kernel_run), str(tmp_path / "none"), "--out", str(tmp_path / "p.csv")],
          ["evaluate", str(kernel_run), "--what", "accuracy", "--seeds", "0", "--json"],
          ["compare", str(kernel_run), str(kernel_run)],
          ["bench", str(kernel_run), "--t", "0,1"],
          ["evaluate", str(kernel_run), "--what", "certificates", "--n-test", "3", "--json"],
          ["debug", str(kernel_run), "--drop", "2,4"],
          ["debug", str(kernel_run), "--drop", "2", "--downweight", "0.5"],
          ["evaluate", str(kernel_run), "--what", "mislabel", "--json"],
          ["evaluate", str(kernel_run), "--what", "lds,agreement,faithfulness", "--n-test", "3", "--k", "1,2",
           "--subsets", "4", "--json"]]
    (tmp_path / "none").mkdir()
    from carrot.run.pipeline import Carrot

    img = Carrot.load(kernel_run).test_records_[0][0]
    ok[0][2] = img
    for args in ok:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
    refused = {("tracin", str(kernel_run)): "tracin: the kernel head has no linear coefficients",
               ("evaluate", str(kernel_run), "--what", "deletion"): "evaluate --what deletion: the kernel head has no additive"}
    for args, message in refused.items():
        r = CliRunner().invoke(cli, list(args))
        assert r.exit_code == 2 and message in r.output and "head.kind: ridge" in r.output, (args, r.output)
        assert r.output.count("\n") == 1, r.output


def test_reweight_with_the_kernel_head_steps_its_dual_and_applies_the_weights(kernel_run, tmp_path):
    """RRO on a kernel run: step 0 is the kernel head on the fit rows (its feature map, gamma and lambda held), the
    learned weights refit a kernel head with the parent's gamma and lambda; --consistency is refused by name."""
    from carrot.ridge.dual import DualSystem
    from carrot.ridge.kernel import KernelRidgeHead
    from carrot.run.operations import _fit_val_split
    from carrot.run.pipeline import Carrot
    from carrot.validation import one_hot

    out, applied = tmp_path / "rw.json", tmp_path / "applied"
    r = CliRunner().invoke(cli, ["reweight", str(kernel_run), "--steps", "4", "--loss", "ce", "--out", str(out),
                                 "--apply", str(applied)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    model = Carrot.load(kernel_run)
    G, y = model.train_embeddings_, np.array([rec.label for rec in model.train_records_])
    f_rows, _ = _fit_val_split(model, y, 0.2)
    system = DualSystem.on_weights(model.head_, model.head_.preprocess(G[f_rows]), one_hot(y[f_rows], len(model.classes_)),
                          torch.ones(len(f_rows), dtype=torch.float64))
    G_test = np.asarray(model.test_embeddings_)
    y_test = np.array([lab for _, lab in model.test_records_])
    acc = float((system.decision(G_test).argmax(1).numpy() == y_test).mean())
    assert res["uniform_test_accuracy"] == pytest.approx(acc) and len(res["history"]) == 5
    weights = np.asarray(res["weights"])
    assert weights.shape == (len(y),) and np.all(weights[np.setdiff1d(np.arange(len(y)), f_rows)] == 0)
    derived = Carrot.load(applied)
    assert isinstance(derived.head_, KernelRidgeHead)
    assert (derived.head_.gamma_, derived.head_.lam_) == (model.head_.gamma_, model.head_.lam_)
    assert derived.head_.approx_ == model.head_.approx_
    if model.head_.approx_ == "nystroem":  # the parent's landmarks, not new ones
        assert torch.equal(derived.head_.landmarks_, model.head_.landmarks_)
    assert np.allclose(derived.sample_weight_, weights)
    # the applied run is the model RRO scored: the parent's feature map, the validation rows at weight 0
    best = DualSystem.on_weights(model.head_, model.head_.preprocess(G), one_hot(y, len(model.classes_)), torch.as_tensor(weights))
    assert np.allclose(derived.head_.decision_function(G_test), best.decision(G_test).numpy(), atol=1e-9)
    metrics = json.loads((applied / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(res["reweighted_test_accuracy"]) and metrics["head_choice"] is None
    assert "kept by" not in (applied / "index.html").read_text()
    r = CliRunner().invoke(cli, ["reweight", str(kernel_run), "--steps", "2", "--consistency", "0.5", "--out", str(out)])
    assert r.exit_code == 2 and "rro.consistency: the kernel head has no support-profile term" in r.output


@pytest.mark.parametrize("key,value,match", [("kind", "forest", "head.kind: expected ridge, kernel, auto"),
                                             ("kernel", "cosine", "head.kernel: expected rbf, laplacian, poly"),
                                             ("gamma", -1, "head.gamma: expected 'auto' or a finite number > 0"),
                                             ("gamma", "big", "head.gamma: expected")])
def test_head_config_keys_are_checked(key, value, match):
    from carrot.config import RunConfig
    from carrot.errors import CarrotError

    with pytest.raises(CarrotError, match=match):
        RunConfig.from_dict({"head": {"kind": "kernel", key: value}})
    with pytest.raises(CarrotError, match="head.fit_intercept: the kernel head always fits"):
        RunConfig.from_dict({"head": {"kind": "kernel", "fit_intercept": False}})
