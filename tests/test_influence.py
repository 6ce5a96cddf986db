import numpy as np
import pytest
import torch

from carrot.errors import CarrotError
from carrot.ridge.head import RidgeHead
from carrot.validation import one_hot
from carrot.ridge.primal import PrimalSystem


def problem(n, d, c, seed, weighted=True):
    g = np.random.default_rng(seed)
    G = g.normal(size=(n, d)) + g.normal(size=d)
    y = np.concatenate([np.arange(c), np.arange(c), g.integers(0, c, n - 2 * c)])
    a = g.uniform(0.2, 2.0, n) if weighted else np.ones(n)
    return G, y, a


GRID = [(30, 8, 3, True), (30, 8, 3, False), (20, 25, 4, True), (60, 12, 2, True), (45, 45, 6, False), (420, 40, 200, True)]


@pytest.mark.parametrize("n,d,c,intercept", GRID)
def test_system_matches_head(n, d, c, intercept):
    G, y, a = problem(n, d, c, seed=n + d)
    head = RidgeHead(lam=0.4, fit_intercept=intercept).fit(G, y, a)
    sys_ = head.system(G, y, a)
    np.testing.assert_allclose(sys_.coef.numpy(), head.coef_.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sys_.intercept.numpy(), head.intercept_.numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n,d,c,intercept", GRID)
def test_removal_effect_on_test_logits_matches_refits(n, d, c, intercept):
    G, y, a = problem(n, d, c, seed=2 * n + d)
    Gt = np.random.default_rng(5).normal(size=(4, d))
    head = RidgeHead(lam=0.4, fit_intercept=intercept).fit(G, y, a)
    sys_ = head.system(G, y, a)
    eff = sys_.removal_effect(Gt).numpy()
    base = head.decision_function(Gt)
    loo = sys_.loo_logits().numpy()
    for i in range(n):
        keep = np.arange(n) != i
        ref = RidgeHead(lam=0.4, fit_intercept=intercept).fit(G[keep], y[keep], a[keep])
        np.testing.assert_allclose(base + eff[:, i], ref.decision_function(Gt), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(loo[i], ref.decision_function(G[i : i + 1])[0], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n,d,c,intercept", GRID)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_woodbury_reweight_remove_add_matches_refit(n, d, c, intercept, k):
    G, y, a = problem(n, d, c, seed=3 * n + k)
    g = np.random.default_rng(k)
    sys_ = PrimalSystem.fit(G, one_hot(y, c), a, 0.4, intercept)
    idx = g.choice(n, size=k, replace=False)
    new_w = g.uniform(0, 3, size=k)
    new_w[0] = 0.0  # one removal
    G_add = g.normal(size=(2, d))
    y_add = np.array([0, c - 1])
    theta = sys_.updated_theta(idx, new_w, G_add, one_hot(y_add, c), [1.5, 0.5])
    a2 = a.copy()
    a2[idx] = new_w
    ref = RidgeHead(lam=0.4, fit_intercept=intercept).fit(
        np.vstack([G, G_add]), np.concatenate([y, y_add]), np.concatenate([a2, [1.5, 0.5]])
    )
    Gt = g.normal(size=(5, d))
    np.testing.assert_allclose(sys_.decision(Gt, theta).numpy(), ref.decision_function(Gt), rtol=1e-7, atol=1e-9)


def test_woodbury_bad_input():
    G, y, a = problem(20, 4, 2, seed=0)
    sys_ = PrimalSystem.fit(G, one_hot(y, 2), a, 1.0)
    with pytest.raises(CarrotError, match="idx"):
        sys_.updated_theta([0, 0])
    with pytest.raises(CarrotError, match="idx"):
        sys_.updated_theta([25])
    with pytest.raises(CarrotError, match="new_weights"):
        sys_.updated_theta([1], [-1.0])
    assert torch.equal(sys_.updated_theta([]), sys_.theta)


def test_loo_loss_change_matches_refits():
    G, y, a = problem(40, 6, 3, seed=9)
    Gt = np.random.default_rng(1).normal(size=(13, 6))
    yt = np.random.default_rng(2).integers(0, 3, 13)
    sys_ = PrimalSystem.fit(G, one_hot(y, 3), a, 0.7)
    got = sys_.loo_loss_change(Gt, yt, chunk=5).numpy()
    Yt = one_hot(yt, 3).numpy()
    base = ((sys_.decision(Gt).numpy() - Yt) ** 2).sum()
    for i in (0, 7, 39):
        keep = np.arange(40) != i
        ref = PrimalSystem.fit(G[keep], one_hot(y[keep], 3), a[keep], 0.7)
        assert got[i] == pytest.approx(((ref.decision(Gt).numpy() - Yt) ** 2).sum() - base, rel=1e-8, abs=1e-12)
