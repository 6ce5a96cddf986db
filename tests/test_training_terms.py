"""Exact training-image views of a logit (representer, equivalent kernel, removal) and the certificate."""
import numpy as np
import pytest

from carrot.ridge.head import RidgeHead, frozen_clone


def problem(n, d, c, seed, weighted):
    g = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    G = g.normal(size=(c, d))[y] * 0.8 + g.normal(size=(n, d)) + 2.0
    a = g.uniform(0.2, 2.0, n) if weighted else None
    if weighted:
        a[-1] = 0.0  # an image outside the model
    return G, y, a, g.normal(size=(6, d)) + 2.0


GRID = [(30, 8, 3, True, True, "primal"), (20, 40, 4, True, True, "dual"), (40, 10, 2, False, False, "primal"),
        (25, 25, 5, True, False, "dual")]


@pytest.mark.parametrize("n,d,c,weighted,intercept,solver", GRID)
def test_both_decompositions_sum_to_the_logit_and_removal_equals_refits(n, d, c, weighted, intercept, solver):
    G, y, a, Gt = problem(n, d, c, n * d + c, weighted)
    head = RidgeHead(lam=0.7, fit_intercept=intercept, solver=solver).fit(G, y, a)
    system = head.system(G, y)
    cls = np.arange(len(Gt)) % c  # not only the predicted class
    t = system.training_terms(Gt, cls)
    logits = head.decision_function(Gt)[np.arange(len(Gt)), cls]
    np.testing.assert_allclose(t.logit.numpy(), logits, rtol=1e-12, atol=1e-12)
    for view in ("equivalent_kernel", "representer"):
        total = t.prior.numpy() + getattr(t, view).sum(1).numpy()
        np.testing.assert_allclose(total, logits, rtol=1e-9, atol=1e-9 * np.abs(logits).max())
    w = np.ones(n) if a is None else a
    for i in range(n):
        keep = np.arange(n) != i
        ref = frozen_clone(head).fit(G[keep], y[keep], None if a is None else a[keep]) if len(np.unique(y[keep])) == c else None
        if ref is None or w[i] == 0:
            continue
        want = ref.decision_function(Gt)[np.arange(len(Gt)), cls] - logits
        np.testing.assert_allclose(t.removal[:, i].numpy(), want, rtol=1e-7, atol=1e-9)
    if a is not None:  # an image with weight 0 contributes nothing to either sum and its removal changes nothing
        assert t.equivalent_kernel[:, -1].abs().max() == 0 and t.representer[:, -1].abs().max() == 0
        assert t.removal[:, -1].abs().max() == 0


def refit_margin(head, G, y, a, removed, g, c):
    keep = np.setdiff1d(np.arange(len(y)), removed)
    f = frozen_clone(head).fit(G[keep], y[keep], None if a is None else a[keep]).decision_function(g[None])[0]
    return f[c] - np.max(np.delete(f, c))


@pytest.mark.parametrize("weighted", [False, True])
def test_certificate_steps_are_exact_and_the_set_flips_by_refit(weighted):
    G, y, a, Gt = problem(24, 5, 3, 7, weighted)
    head = RidgeHead(lam=2.0).fit(G, y, a)
    system = head.system(G, y)
    found = 0
    for g in Gt:
        c = int(head.decision_function(g[None]).argmax())
        cert = system.certificate(g, limit=10)
        if not cert.found:
            continue
        found += 1
        assert cert.new_class != c and cert.margin > 0 and cert.refit_max_abs_diff < 1e-9
        for s in range(len(cert.indices)):  # each step's margin (Woodbury) equals a refit without the prefix
            assert cert.path[s] == pytest.approx(refit_margin(head, G, y, a, cert.indices[: s + 1], g, c), abs=1e-8)
        assert all(m > 0 for m in cert.path[:-1]) and cert.path[-1] < 0  # stops at the first flip
        # step 1 is the exact argmax over single removals of the drop of f_c - f_k (k the runner-up): n refits
        f0 = head.decision_function(g[None])[0]
        k = int(np.argsort(-f0, kind="stable")[1])

        def gap(removed):
            keep = np.setdiff1d(np.arange(len(y)), removed)
            f = frozen_clone(head).fit(G[keep], y[keep], None if a is None else a[keep]).decision_function(g[None])[0]
            return f[c] - f[k]

        drops = {i: (f0[c] - f0[k]) - gap([i]) for i in range(len(y)) if a is None or a[i] > 0}
        assert drops[cert.indices[0]] == pytest.approx(max(drops.values()), abs=1e-9)
    assert found >= 1


def test_certificate_that_cannot_flip_says_so():
    G, y, a, _ = problem(40, 4, 2, 3, False)
    G[y == 0] -= 6.0  # well separated classes
    head = RidgeHead(lam=0.1).fit(G, y)
    cert = head.system(G, y).certificate(G[0], limit=3)
    assert not cert.found and cert.indices == [] and cert.new_class is None and len(cert.path) == 3
