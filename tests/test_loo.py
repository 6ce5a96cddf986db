import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carrot.errors import CarrotError
from carrot.ridge.head import RidgeHead
from carrot.ridge.loo import ridge_loo_path


@pytest.mark.parametrize("n,d,c,weighted,intercept", [
    (15, 40, 3, False, True), (15, 40, 3, True, True), (40, 6, 2, False, True),
    (40, 6, 4, True, True), (30, 30, 5, True, False),
])
def test_loo_matches_brute_force_refits(n, d, c, weighted, intercept):
    g = np.random.default_rng(n * d + c)
    G = g.normal(size=(n, d)) + 2.0
    y = np.concatenate([np.arange(c), np.arange(c), g.integers(0, c, n - 2 * c)])
    a = g.uniform(0.2, 2.0, n) if weighted else None
    lams = [0.05, 1.0, 30.0]
    path = ridge_loo_path(G, y, lams, sample_weight=a, fit_intercept=intercept)
    for li, lam in enumerate(lams):
        for i in range(n):
            keep = np.arange(n) != i
            h = RidgeHead(lam=lam, fit_intercept=intercept).fit(G[keep], y[keep], None if a is None else a[keep])
            np.testing.assert_allclose(path.loo_logits[li, i], h.decision_function(G[i : i + 1])[0], rtol=1e-7, atol=1e-9)


def test_zero_weight_points_are_predicted_out_of_sample():
    g = np.random.default_rng(0)
    G, y = g.normal(size=(12, 30)), np.tile([0, 1, 2], 4)
    a = np.ones(12)
    a[0] = 0.0
    path = ridge_loo_path(G, y, [0.5], sample_weight=a)
    h = RidgeHead(lam=0.5).fit(G, y, sample_weight=a)
    np.testing.assert_allclose(path.loo_logits[0, 0], h.decision_function(G[:1])[0], rtol=1e-8)
    assert path.hat_diag[0, 0] == 0


def test_best_lambda_and_bad_grid():
    g = np.random.default_rng(1)
    G = g.normal(size=(60, 5))
    y = (G[:, 0] > 0).astype(int)
    path = ridge_loo_path(G, y)
    assert path.best_lambda in path.lambdas
    assert path.accuracy.max() > 0.8
    with pytest.raises(CarrotError, match="lambdas"):
        ridge_loo_path(G, y, [0.0, 1.0])


def test_auto_lambda_head_uses_the_loo_choice(tmp_path):
    g = np.random.default_rng(2)
    G = g.normal(size=(80, 12))
    y = (G[:, :3].sum(1) > 0).astype(int) + (G[:, 3] > 1)
    head = RidgeHead(lam="auto", lam_grid=(0.01, 1.0, 100.0)).fit(G, y)
    path = ridge_loo_path(G, y, [0.01, 1.0, 100.0])
    assert head.lam_ == path.best_lambda
    ref = RidgeHead(lam=head.lam_).fit(G, y)
    np.testing.assert_array_equal(head.decision_function(G), ref.decision_function(G))
    head.save(tmp_path / "h.safetensors")
    back = RidgeHead.load(tmp_path / "h.safetensors")
    assert back.lam_ == head.lam_ and back.lam_path_["loo_accuracy"] == path.accuracy.tolist()
    with pytest.raises(CarrotError, match="lam: expected 'auto'"):
        RidgeHead(lam="best").fit(G, y)


@pytest.mark.parametrize("n,d,c,weighted,intercept,chunk", [
    (200, 10, 4, False, True, 7), (200, 10, 4, True, True, 64), (150, 25, 6, True, False, 1000),
    (30, 50, 3, True, True, 8),  # n < D through the primal: the eigenbasis of M has null directions
])
def test_streamed_loo_scores_equal_the_in_memory_path(n, d, c, weighted, intercept, chunk):
    import torch

    from carrot.ridge.loo import loo_path
    from carrot.ridge.core import CentredMoments, chunks, spectrum

    g = np.random.default_rng(n + d)
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    G = g.normal(size=(c, d))[y] * 0.7 + g.normal(size=(n, d)) + 1.5
    a = g.uniform(0.0, 2.0, n) if weighted else None
    lams = [0.01, 0.3, 3.0, 100.0]
    ref = ridge_loo_path(G, y, lams, sample_weight=a, fit_intercept=intercept)
    w = torch.ones(n, dtype=torch.float64) if a is None else torch.as_tensor(a)
    m = CentredMoments.accumulate(G, y, w, n_classes=c, fit_intercept=intercept, chunk_size=chunk)
    rows = ((sl, torch.as_tensor(G[sl]) - m.mu) for sl in chunks(n, chunk))
    got = loo_path(m, spectrum(m), rows, y, w, lams)
    np.testing.assert_array_equal(got.accuracy, ref.accuracy)
    np.testing.assert_allclose(got.mse, ref.mse, rtol=1e-8)
    assert got.best_lambda == ref.best_lambda and got.loo_logits is None


def test_auto_lambda_streams_a_memmap(tmp_path):
    g = np.random.default_rng(5)
    y = g.integers(0, 5, 3000)
    G = (g.normal(size=(5, 16))[y] + g.normal(size=(3000, 16)) * 2).astype(np.float32)
    np.save(tmp_path / "G.npy", G)
    mm = np.load(tmp_path / "G.npy", mmap_mode="r")
    streamed = RidgeHead(lam="auto", chunk_size=256).fit(mm, y)
    in_memory = RidgeHead(lam="auto").fit(G.astype(np.float64), y)
    assert streamed.lam_ == in_memory.lam_
    np.testing.assert_array_equal(streamed.lam_path_["loo_accuracy"], in_memory.lam_path_["loo_accuracy"])
    np.testing.assert_allclose(streamed.coef_.numpy(), in_memory.coef_.numpy(), rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 60), d=st.integers(1, 12), c=st.integers(2, 4), chunk=st.integers(1, 70),
       lam=st.floats(1e-3, 1e3), intercept=st.booleans(), seed=st.integers(0, 10_000))
def test_loo_choice_does_not_depend_on_streaming(n, d, c, chunk, lam, intercept, seed):
    """lam='auto' through the streamed primal path picks what the in-memory exact LOO path picks."""
    g = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    G = g.normal(size=(n, d)) + y[:, None] * 0.5
    grid = (lam / 10, lam, lam * 10)
    ref = ridge_loo_path(G, y, grid, fit_intercept=intercept)
    head = RidgeHead(lam="auto", lam_grid=grid, fit_intercept=intercept, solver="primal", chunk_size=chunk).fit(G, y)
    np.testing.assert_array_equal(head.lam_path_["loo_accuracy"], ref.accuracy)
    np.testing.assert_allclose(head.lam_path_["loo_mse"], ref.mse, rtol=1e-7, atol=1e-12)
