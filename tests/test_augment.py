import numpy as np
import pytest
import torch

from carrot.ridge.augment import AugmentConfig, augmented_softmax, fit_augmented_ridge, fit_sampled_ridge, nuisance_plan
from carrot.errors import CarrotError
from carrot.ridge.head import RidgeHead


def blobs(n=120, d=8, c=5, seed=0):
    g = np.random.default_rng(seed)
    means = g.normal(size=(c, d)) * 2.0
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    return means[y] + g.normal(size=(n, d)), y


def test_noise_is_label_safe_for_the_confusing_classes():
    G, y = blobs()
    head = RidgeHead(lam=1.0).fit(G, y)
    plan = nuisance_plan(head.coef_, head.intercept_, G, y, AugmentConfig(topk=2))
    Ga = plan.sample(torch.from_numpy(G), 50, torch.Generator().manual_seed(0))
    F0 = head.decision_function(G)
    Fa = head.decision_function(Ga.numpy()).reshape(len(y), 50, -1)
    for i in range(len(y)):
        q = plan.bases[i]
        # margins against the top-K confusing classes are exactly unchanged
        c = y[i]
        diffs = head.coef_[:, c].unsqueeze(1) - head.coef_
        proj = diffs - q @ (q.T @ diffs)
        kept = torch.nonzero(proj.norm(dim=0) < 1e-8).flatten().tolist()
        for k in kept:
            np.testing.assert_allclose(Fa[i, :, c] - Fa[i, :, k], F0[i, c] - F0[i, k], atol=1e-8)
    assert (plan.alpha >= 0).all() and (plan.alpha > 0).any()
    # chance constraint: correctly classified images stay correct with probability >= 1 - delta (per class)
    correct = F0.argmax(1) == y
    flips = (Fa.argmax(2) != y[:, None])[correct].mean()
    assert flips <= 0.05


def test_analytic_expectation_matches_sampling_within_monte_carlo_error():
    G, y = blobs(n=60, d=6, c=4, seed=1)
    cfg = AugmentConfig(topk=1, alpha_max=4.0)
    analytic, plan = fit_augmented_ridge(G, y, 2.0, cfg=cfg)
    errs = {}
    for m in (100, 1600):
        errs[m] = np.mean([float((fit_sampled_ridge(G, y, 2.0, plan, m=m, seed=s).coef_ - analytic.coef_).norm()
                                 / analytic.coef_.norm()) for s in range(4)])
    # error shrinks like 1 / sqrt(m): 16x the samples, about 4x smaller error (0.25; 0.4 leaves room for chance)
    assert errs[1600] < 0.4 * errs[100] and errs[1600] < 0.02
    # and the spread over seeds at m = 400 covers the remaining gap (within Monte Carlo error)
    reps = torch.stack([fit_sampled_ridge(G, y, 2.0, plan, m=400, seed=s).coef_ for s in range(8)])
    se = reps.std(0) / np.sqrt(8)
    z = ((reps.mean(0) - analytic.coef_) / se.clamp_min(1e-12)).abs()
    assert float(z.max()) < 5.0


def test_class_level_plan_and_softmax_sampling():
    G, y = blobs(seed=2)
    head = RidgeHead(lam=1.0).fit(G, y)
    plan = nuisance_plan(head.coef_, head.intercept_, G, y, AugmentConfig(level="class"))
    for c in range(5):
        rows = np.flatnonzero(y == c)
        assert all(torch.equal(plan.bases[rows[0]], plan.bases[r]) for r in rows)
    ce, plan2 = augmented_softmax(G, y, lam=1e-2, m=3)
    assert (ce.predict(G) == y).mean() > 0.8 and len(plan2.alpha) == len(y)
    with pytest.raises(CarrotError, match="augment.delta"):
        AugmentConfig(delta=0)
