import numpy as np
import pytest

from carrot.errors import CarrotError
from carrot.head import RidgeHead
from carrot.loo import ridge_loo_path


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
