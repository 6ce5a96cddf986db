"""The ridge core: centred moments against oracles, one factorisation shared by head, LOO and removal."""
import numpy as np
import pytest
import torch

from carrot.errors import CarrotError
from carrot.ridge.head import RidgeHead
from carrot.ridge.primal import PrimalSystem
from carrot.ridge.core import CentredMoments, RidgeFactor, spectrum
from carrot.validation import one_hot


def problem(n, d, c, seed, offset=0.0, weighted=True):
    g = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    G = g.normal(size=(c, d))[y] * 0.5 + g.normal(size=(n, d)) + offset
    a = g.uniform(0.1, 2.0, n) if weighted else None
    return G, y, a


@pytest.mark.parametrize("n,d,c,chunk", [(50, 8, 3, 7), (200, 30, 5, 64), (17, 40, 4, 5)])
def test_two_pass_moments_survive_a_large_mean(n, d, c, chunk):
    """|mu| = 1e6 against a spread of 1: the one-pass G^T A G - S mu mu^T loses every digit, two-pass centring none."""
    G0, y, a = problem(n, d, c, seed=n + d)
    offset = 1e6  # exact in float64 and cancels exactly when subtracted from the mean, so G0's moments are the oracle
    m = CentredMoments.accumulate(G0 + offset, y, a, n_classes=c, chunk_size=chunk)
    ref = CentredMoments.accumulate(G0, y, a, n_classes=c, chunk_size=n)
    np.testing.assert_allclose(m.M.numpy(), ref.M.numpy(), rtol=1e-8, atol=1e-8 * float(ref.M.abs().max()))
    np.testing.assert_allclose(m.B.numpy(), ref.B.numpy(), rtol=1e-8, atol=1e-8 * float(ref.B.abs().max()))
    np.testing.assert_allclose(m.mu.numpy() - offset, ref.mu.numpy(), atol=1e-8)
    assert torch.equal(m.M, m.M.T)
    w = torch.as_tensor(a)
    G = torch.as_tensor(G0 + offset)
    one_pass = (G * w[:, None]).T @ G - w.sum() * torch.outer(m.mu, m.mu)
    assert float((one_pass - ref.M).abs().max()) > 1e3 * float((m.M - ref.M).abs().max())  # the form the core avoids


@pytest.mark.parametrize("n,d,c,weighted,intercept", [(40, 10, 3, True, True), (12, 60, 4, True, False), (30, 30, 2, False, True)])
def test_primal_and_dual_factors_solve_the_same_system(n, d, c, weighted, intercept):
    G, y, a = problem(n, d, c, seed=n * d)
    w = torch.ones(n, dtype=torch.float64) if a is None else torch.as_tensor(a)
    m = CentredMoments.accumulate(G, y, w, n_classes=c, fit_intercept=intercept)
    lam = 0.3
    U = w.sqrt()[:, None] * (torch.as_tensor(G) - m.mu)
    V = torch.as_tensor(np.random.default_rng(1).normal(size=(d, 5)))
    exact = torch.linalg.solve(m.M + lam * torch.eye(d, dtype=torch.float64), V)
    for f in (RidgeFactor.primal(m.M, lam), RidgeFactor.dual(U, lam)):
        np.testing.assert_allclose(f.solve(V).numpy(), exact.numpy(), rtol=1e-8, atol=1e-10)
    s2, basis = spectrum(m, U if n < d else None)
    assert basis.shape[0] == d and (s2 >= 0).all()


@pytest.mark.parametrize("solver", ["primal", "dual"])
@pytest.mark.parametrize("intercept", [True, False])
def test_system_from_a_loaded_head_reuses_its_factor(tmp_path, monkeypatch, solver, intercept):
    G, y, a = problem(30, 12, 3, seed=4)
    head = RidgeHead(lam=0.8, solver=solver, fit_intercept=intercept).fit(G, y, a)
    head.save(tmp_path / "h.safetensors")
    back = RidgeHead.load(tmp_path / "h.safetensors")
    assert back.factor_.kind == solver and torch.equal(back.sample_weight_, torch.as_tensor(a))
    ref = PrimalSystem.fit(G, one_hot(y, 3), a, 0.8, intercept)
    monkeypatch.setattr(CentredMoments, "accumulate", lambda *a, **k: pytest.fail("re-accumulated the Gram"))
    sys_ = back.system(G, y)  # the head's weights, no sample_weight passed
    Gt = np.random.default_rng(9).normal(size=(4, 12))
    np.testing.assert_allclose(sys_.decision(Gt).numpy(), ref.decision(Gt).numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(sys_.hat_diag().numpy(), ref.hat_diag().numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(sys_.removal_effect(Gt).numpy(), ref.removal_effect(Gt).numpy(), rtol=1e-7, atol=1e-10)
    with pytest.raises(CarrotError, match="sample_weight: differs from the weights the head was fitted with"):
        back.system(G, y, np.ones(30))
    with pytest.raises(CarrotError, match="expected the 30 training rows"):
        back.system(G[:20], y[:20])


def test_moments_refuse_bad_input():
    G, y, _ = problem(10, 3, 2, seed=0)
    with pytest.raises(CarrotError, match="n_classes"):
        CentredMoments.accumulate(G, y)
    with pytest.raises(CarrotError, match="Y: expected 10 rows"):
        CentredMoments.accumulate(G, y[:5], n_classes=2)
    with pytest.raises(CarrotError, match="sample_weight"):
        CentredMoments.accumulate(G, y, np.zeros(10), n_classes=2)


def test_a_head_without_a_saved_factor_is_factorised_once_on_its_rows():
    """Heads written before format 3 (and heads fitted from moments) carry no factor: head.system fits the system."""
    G, y, a = problem(30, 6, 3, seed=8)
    head = RidgeHead(lam=0.5).fit(G, y, a)
    ref = head.system(G, y)
    head.factor_ = None
    legacy = head.system(G, y)
    np.testing.assert_allclose(legacy.loo_logits().numpy(), ref.loo_logits().numpy(), rtol=1e-9, atol=1e-12)


def test_loo_cross_entropy_is_the_refit_label_loss_at_a_fitted_temperature():
    G, y, a = problem(25, 4, 3, seed=11)
    head = RidgeHead(lam=0.4).fit(G, y, a)
    scores, T = head.system(G, y).loo_cross_entropy()
    loo = np.stack([RidgeHead(lam=0.4).fit(np.delete(G, i, 0), np.delete(y, i), np.delete(a, i)).decision_function(G[i : i + 1])[0]
                    for i in range(len(y))])

    def ce(t):
        z = torch.log_softmax(torch.as_tensor(loo) / t, 1)
        return -z[torch.arange(len(y)), torch.as_tensor(y)]

    np.testing.assert_allclose(scores.numpy(), ce(T).numpy(), rtol=1e-7, atol=1e-9)
    assert ce(T).mean() <= min(ce(T * 1.05).mean(), ce(T / 1.05).mean()) + 1e-9  # a minimum over T
