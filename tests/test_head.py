import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.linear_model import Ridge

from carrot.attribution.representer import centred_kernel, region_contributions, representer_contributions, top_k
from carrot.errors import CarrotError, NotFittedError
from carrot.ridge.head import RidgeHead


def problem(n: int, d: int, c: int, seed: int, weighted: bool):
    g = np.random.default_rng(seed)
    G = g.normal(size=(n, d)) + g.normal(size=d) * 3  # non-centred features
    y = np.concatenate([np.arange(c), g.integers(0, c, size=n - c)])
    a = g.uniform(0.1, 3.0, size=n) if weighted else None
    return G, y, a


GRID = [(n, d, c, w) for (n, d) in [(12, 30), (40, 8), (64, 64), (150, 20)] for c in (2, 5, 12) for w in (False, True) if c <= n]
GRID += [(250, 300, 200, w) for w in (False, True)] + [(600, 64, 200, w) for w in (False, True)]  # C = 200


@pytest.mark.parametrize("n,d,c,weighted", GRID)
def test_matches_sklearn_ridge_primal_and_dual(n, d, c, weighted):
    G, y, a = problem(n, d, c, seed=n + d + c, weighted=weighted)
    Y = np.eye(c)[y]
    ref = Ridge(alpha=0.7, fit_intercept=True, solver="cholesky").fit(G, Y, sample_weight=a)
    for solver in ("primal", "dual"):
        head = RidgeHead(lam=0.7, solver=solver, device="cpu").fit(G, y, sample_weight=a)
        np.testing.assert_allclose(head.coef_.numpy(), ref.coef_.T, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(head.intercept_.numpy(), ref.intercept_, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(head.decision_function(G), ref.predict(G), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n,d,c,weighted", GRID)
def test_representer_identity_is_exact(n, d, c, weighted):
    """prior_c + sum_i beta_ic k(i, x) == logit_c(x) to 1e-6 relative (float64)."""
    G, y, a = problem(n, d, c, seed=3 * n + d, weighted=weighted)
    head = RidgeHead(lam=0.3).fit(G, y, sample_weight=a)
    Gt = np.random.default_rng(9).normal(size=(7, d)) * 2
    contrib = representer_contributions(head, G, Gt)
    logits = head.decision_function(Gt)
    recon = contrib.sum(1).numpy() + head.prior_.numpy()
    np.testing.assert_allclose(recon, logits, rtol=1e-6, atol=1e-9 * np.abs(logits).max())
    # W* = sum_i (g_i - mu) beta_i^T
    Wrep = (torch.from_numpy(G) - head.feature_mean_).T @ head.dual_coef_
    np.testing.assert_allclose(Wrep.numpy(), head.coef_.numpy(), rtol=1e-6, atol=1e-10)


def test_unweighted_intercept_free_and_sample_weight_zero_equals_removal():
    G, y, _ = problem(50, 10, 3, seed=1, weighted=False)
    a = np.ones(50)
    a[:5] = 0
    h0 = RidgeHead(lam=1.0).fit(G, y, sample_weight=a)
    h1 = RidgeHead(lam=1.0).fit(G[5:], y[5:])
    np.testing.assert_allclose(h0.coef_.numpy(), h1.coef_.numpy(), atol=1e-10)
    np.testing.assert_allclose(h0.intercept_.numpy(), h1.intercept_.numpy(), atol=1e-10)
    assert np.all(h0.dual_coef_[:5].numpy() == 0)
    ref = Ridge(alpha=1.0, fit_intercept=False).fit(G, np.eye(3)[y])
    h2 = RidgeHead(lam=1.0, fit_intercept=False).fit(G, y)
    np.testing.assert_allclose(h2.coef_.numpy(), ref.coef_.T, rtol=1e-8)
    assert np.all(h2.intercept_.numpy() == 0)


def test_region_decomposition_sums_to_logit():
    g = torch.Generator().manual_seed(0)
    G, y, _ = problem(60, 16, 4, seed=2, weighted=False)
    head = RidgeHead(lam=0.5).fit(G, y)
    H = torch.randn(25, 16, generator=g, dtype=torch.float64)
    w = torch.rand(25, generator=g, dtype=torch.float64) / 20
    r = region_contributions(head, H, w)
    logits = head.decision_function((H.T @ w)[None].numpy())[0]
    np.testing.assert_allclose(r.sum(0).numpy() + head.prior_.numpy(), logits, rtol=1e-10, atol=1e-12)


def test_top_k_orders_support_and_inhibition():
    v = torch.tensor([0.5, -2.0, 3.0, 0.0, -0.1], dtype=torch.float64)
    tk = top_k(v, 2)
    assert tk.support_idx.tolist() == [2, 0] and tk.inhibit_idx.tolist() == [1, 4]
    assert tk.inhibit_val.tolist() == [-2.0, -0.1]
    with pytest.raises(CarrotError, match="1 <= k <= 5"):
        top_k(v, 6)


def test_predict_before_fit_and_bad_inputs_are_named():
    with pytest.raises(NotFittedError, match="not fitted"):
        RidgeHead().predict(np.zeros((2, 3)))
    G, y, _ = problem(20, 4, 2, seed=0, weighted=False)
    for lam in (0, -1.0, float("nan")):
        with pytest.raises(CarrotError, match="lam: expected"):
            RidgeHead(lam=lam).fit(G, y)
    bad = G.copy()
    bad[3, 1] = np.nan
    with pytest.raises(CarrotError, match="NaN/Inf in 1 row"):
        RidgeHead().fit(bad, y)
    with pytest.raises(CarrotError, match="at least 2 classes"):
        RidgeHead().fit(G, np.zeros(20, dtype=int))
    with pytest.raises(CarrotError, match=r"y: expected shape \(20,\)"):
        RidgeHead().fit(G, y[:-1])
    with pytest.raises(CarrotError, match="sample_weight"):
        RidgeHead().fit(G, y, sample_weight=-np.ones(20))
    head = RidgeHead().fit(G, y)
    with pytest.raises(CarrotError, match="expected 4 features"):
        head.predict(np.zeros((1, 5)))


def test_save_load_roundtrip(tmp_path):
    G, y, a = problem(30, 6, 3, seed=4, weighted=True)
    labels = np.array(["a", "b", "c"])[y]
    head = RidgeHead(lam=2.0).fit(G, labels, sample_weight=a)
    head.save(tmp_path / "h.safetensors")
    back = RidgeHead.load(tmp_path / "h.safetensors")
    assert back.classes_.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(back.decision_function(G), head.decision_function(G))
    np.testing.assert_array_equal(back.predict(G), head.predict(G))
    assert torch.equal(back.dual_coef_, head.dual_coef_)
    with pytest.raises(CarrotError, match="not found"):
        RidgeHead.load(tmp_path / "missing.safetensors")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 40), d=st.integers(1, 30), c=st.integers(2, 4), lam=st.floats(1e-3, 1e3), seed=st.integers(0, 10**6))
def test_identity_property(n, d, c, lam, seed):
    G, y, a = problem(max(n, c), d, c, seed, weighted=True)
    head = RidgeHead(lam=lam).fit(G, y, sample_weight=a)
    K = centred_kernel(head, G, G)
    recon = (K @ head.dual_coef_).numpy() + head.prior_.numpy()
    logits = head.decision_function(G)
    np.testing.assert_allclose(recon, logits, rtol=1e-6, atol=1e-8 * max(1.0, np.abs(logits).max()))


def test_streamed_memmap_fit_equals_in_memory(tmp_path):
    G, y, a = problem(1000, 16, 7, seed=11, weighted=True)
    mm = np.lib.format.open_memmap(tmp_path / "G.npy", mode="w+", dtype=np.float32, shape=G.shape)
    mm[:] = G
    mm.flush()
    G32 = np.load(tmp_path / "G.npy", mmap_mode="r")
    streamed = RidgeHead(lam=0.3, chunk_size=97).fit(G32, y, sample_weight=a)
    ref = RidgeHead(lam=0.3).fit(np.asarray(G32, dtype=np.float64), y, sample_weight=a)
    assert streamed.solver_ == "primal"
    np.testing.assert_allclose(streamed.coef_.numpy(), ref.coef_.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(streamed.dual_coef_.numpy(), ref.dual_coef_.numpy(), rtol=1e-10, atol=1e-12)
    mm = np.lib.format.open_memmap(tmp_path / "bad.npy", mode="w+", dtype=np.float32, shape=G.shape)
    mm[:] = G
    mm[500, 3] = np.inf
    with pytest.raises(CarrotError, match="NaN/Inf in 1 row"):
        RidgeHead(lam=0.3, chunk_size=97).fit(mm, y)


def test_is_a_scikit_learn_classifier():
    from sklearn.base import clone, is_classifier
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    g = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 40)
    G = g.normal(size=(3, 8))[y] * 1.5 + g.normal(size=(120, 8))
    head = RidgeHead(lam=2.0, solver="primal")
    assert is_classifier(head) and clone(head).get_params() == head.get_params()
    scores = cross_val_score(head, G, y, cv=3)
    manual = []
    from sklearn.model_selection import StratifiedKFold

    for tr, te in StratifiedKFold(3).split(G, y):
        manual.append((RidgeHead(lam=2.0, solver="primal").fit(G[tr], y[tr]).predict(G[te]) == y[te]).mean())
    np.testing.assert_allclose(scores, manual)
    search = GridSearchCV(RidgeHead(), {"lam": [0.01, 1.0, 100.0]}, cv=3).fit(G, y)
    assert search.best_params_["lam"] in (0.01, 1.0, 100.0)
    pipe = make_pipeline(StandardScaler(), RidgeHead(lam=1.0)).fit(G, y)
    assert pipe.score(G, y) == pytest.approx((pipe.predict(G) == y).mean())


def test_index_labels_refuses_unknown_labels_by_name():
    from carrot.errors import CarrotError
    from carrot.validation import index_labels

    classes = np.array(["b", "a", "d"])  # not sorted: positions follow the given order
    assert index_labels(classes, np.array(["d", "a", "b", "d"])).tolist() == [2, 1, 0, 2]
    with pytest.raises(CarrotError, match=r"y_test: 2 label\(s\) not among the 3 known classes: 'c', 'e'"):
        index_labels(classes, np.array(["a", "c", "e"]), "y_test")
    with pytest.raises(ValueError, match="not among"):  # input errors are ValueErrors too
        index_labels(np.array([0, 1, 2]), np.array([3]))
    with pytest.raises(CarrotError, match="not among"):  # a label of another type is unknown, not a TypeError
        index_labels(np.array([0, 1, 2]), np.array(["1"], dtype=object))
    with pytest.raises(CarrotError, match="expected a 1-D"):
        index_labels(classes, np.array([["a"]]))


def test_dual_coef_and_ridge_system_refuse_a_label_the_head_never_saw():
    from carrot.errors import CarrotError

    g = np.random.default_rng(0)
    G, y = g.normal(size=(20, 4)), np.repeat([0, 1, 3], [7, 7, 6])
    head = RidgeHead(lam=1.0).fit(G, y)
    y_bad = y.copy()
    y_bad[0] = 2  # between known classes: searchsorted alone would map it onto class 3
    for call in (lambda: head.dual_coef(G, y_bad), lambda: head.system(G, y_bad)):
        with pytest.raises(CarrotError, match="y: 1 label\\(s\\) not among the 3 known classes: 2"):
            call()


def test_loaded_head_keeps_every_setting_so_clone_refits_the_same_model(tmp_path):
    import json

    from sklearn.base import clone

    G, y, a = problem(30, 6, 3, seed=5, weighted=True)
    head = RidgeHead(lam="auto", lam_grid=(0.1, 1.0, 10.0), fit_intercept=False, solver="dual", device="cpu",
                     chunk_size=7).fit(G, y, sample_weight=a)
    head.save(tmp_path / "h.safetensors")
    back = RidgeHead.load(tmp_path / "h.safetensors")
    assert back.get_params() == head.get_params()
    refit = clone(back).set_params(lam=back.lam_).fit(G, y, sample_weight=a)
    np.testing.assert_allclose(refit.decision_function(G), head.decision_function(G), rtol=1e-10, atol=1e-12)
    meta_path = tmp_path / "h.safetensors.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CarrotError, match="version 99 was written by a newer carrot.*upgrade carrot"):
        RidgeHead.load(tmp_path / "h.safetensors")
    for bad_version in (0, "2", None):
        meta_path.write_text(json.dumps({**meta, "version": bad_version}))
        with pytest.raises(CarrotError, match="expected a head format version 1..3"):
            RidgeHead.load(tmp_path / "h.safetensors")
    meta_path.write_text(json.dumps({**meta, "version": 2, "params": {**meta["params"], "alpha": 1.0}}))
    with pytest.raises(CarrotError, match="params must be RidgeHead settings"):
        RidgeHead.load(tmp_path / "h.safetensors")
    # a head written before the settings were saved (version 1: lam, fit_intercept, solver at the top) still loads
    legacy = {k: v for k, v in meta.items() if k != "params"}
    legacy.update(version=1, lam="auto", fit_intercept=False, solver="dual")
    meta_path.write_text(json.dumps(legacy))
    old = RidgeHead.load(tmp_path / "h.safetensors")
    assert (old.lam, old.fit_intercept, old.solver) == ("auto", False, "dual")
    np.testing.assert_array_equal(old.decision_function(G), head.decision_function(G))
