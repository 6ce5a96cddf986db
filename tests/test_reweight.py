import numpy as np
import pytest
import torch

from carrot.errors import CarrotError
from carrot.validation import one_hot
from carrot.ridge.removal import RidgeSystem
from carrot.audit.reweight import RROConfig, class_normalised, ess_fraction, loss_and_grad, rro, weight_gradient


def problem(n, d, c, seed):
    g = np.random.default_rng(seed)
    G = g.normal(size=(n, d)) + 1.0
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    return G, y, g.uniform(0.3, 2.0, n), g.normal(size=(15, d)) + 1.0, g.integers(0, c, 15)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("n,d,c,intercept", [(25, 6, 3, True), (12, 20, 2, True), (30, 8, 4, False)])
def test_exact_weight_gradient_matches_finite_differences(loss, n, d, c, intercept):
    G, y, a, Gv, yv = problem(n, d, c, seed=n + d)
    Y = one_hot(y, c)

    def val_loss(w):
        sys_ = RidgeSystem.fit(G, Y, w, 0.5, intercept)
        return loss_and_grad(sys_.decision(Gv), torch.as_tensor(yv), loss, 0.3)[0]

    L, grad = weight_gradient(RidgeSystem.fit(G, Y, a, 0.5, intercept), Gv, yv, loss, 0.3)
    assert L == pytest.approx(val_loss(a), rel=1e-12)
    eps = 1e-6
    for i in range(0, n, 3):
        up, dn = a.copy(), a.copy()
        up[i] += eps
        dn[i] -= eps
        fd = (val_loss(up) - val_loss(dn)) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_logit_gradients_match_autograd():
    F = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    for loss in ("mse", "ce"):
        L, dF = loss_and_grad(F.detach(), y, loss, 0.3)
        if loss == "ce":
            ref = torch.nn.functional.cross_entropy(F / 0.3, y)
        else:
            ref = ((F - torch.nn.functional.one_hot(y, 4)) ** 2).sum() / 7
        (g,) = torch.autograd.grad(ref, F)
        assert L == pytest.approx(ref.item(), rel=1e-12)
        assert torch.allclose(dF, g, atol=1e-12)


def test_class_normalisation_and_ess():
    y = torch.tensor([0, 0, 0, 1, 1])
    s = torch.tensor([0.1, 2.0, -1.0, 0.5, 0.5], dtype=torch.float64)
    a = class_normalised(s, y, 2, classwise=True)
    assert a[:3].sum().item() == pytest.approx(3) and a[3:].sum().item() == pytest.approx(2)
    ess = ess_fraction(a, y, 2)
    assert ess[1].item() == pytest.approx(1.0) and 0 < ess[0].item() < 1


def flipped_problem(seed):
    g = np.random.default_rng(seed)
    C, d = 5, 20
    means = g.normal(size=(C, d)) * 0.45

    def sample(n):
        y = g.integers(0, C, n)
        return means[y] + g.normal(size=(n, d)), y

    (G, y), (Gv, yv), (Gt, yt) = sample(600), sample(200), sample(4000)
    flip = g.random(600) < 0.2
    yn = y.copy()
    yn[flip] = (y[flip] + g.integers(1, C, flip.sum())) % C
    return G, yn, Gv, yv, Gt, yt, flip


@pytest.mark.parametrize("seed", [0, 3])
def test_rro_beats_uniform_weights_with_20_percent_flipped_labels(seed):
    G, yn, Gv, yv, Gt, yt, flip = flipped_problem(seed)
    res = rro(G, yn, Gv, yv, 1.0, RROConfig(), Gt, yt)
    uniform = res.history[0]["test_accuracy"]
    chosen = res.history[res.best_step]["test_accuracy"]
    assert res.best_step > 0
    assert chosen > uniform + 0.005, (uniform, chosen)
    assert res.alpha[flip].mean() < 0.8 * res.alpha[~flip].mean()
    assert min(res.ess.values()) >= RROConfig().ess_floor - 0.05
    for c in range(5):  # class totals are kept
        assert res.alpha[yn == c].sum() == pytest.approx((yn == c).sum())


def test_rro_config_checks():
    with pytest.raises(CarrotError, match="rro.steps"):
        RROConfig(steps=0)
    with pytest.raises(CarrotError, match="rro.loss"):
        RROConfig(loss="hinge")
    with pytest.raises(CarrotError, match="rro.holdout"):
        RROConfig(holdout=1.0)
    assert RROConfig().to_dict()["loss"] == "mse"


def test_support_profiles_are_the_exact_contributions_and_differentiable():
    from carrot.attribution.representer import centred_kernel
    from carrot.ridge.head import RidgeHead
    from carrot.audit.reweight import consistency_loss, support_profiles

    G, y, a, Gv, yv = problem(40, 6, 3, seed=5)
    head = RidgeHead(lam=0.5).fit(G, y, a)
    K = centred_kernel(head, G, Gv)
    ref = K * head.dual_coef_.T[torch.as_tensor(yv)]
    at = torch.tensor(a, requires_grad=True)
    prof = support_profiles(torch.from_numpy(G), one_hot(y, 3), at, 0.5, torch.from_numpy(Gv), torch.as_tensor(yv))
    np.testing.assert_allclose(prof.detach().numpy(), ref.numpy(), rtol=1e-8, atol=1e-10)
    loss = consistency_loss(prof, torch.as_tensor(yv))
    (g,) = torch.autograd.grad(loss, at)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_consistency_term_raises_within_class_agreement():
    G, yn, Gv, yv, Gt, yt, flip = flipped_problem(0)
    base = rro(G, yn, Gv, yv, 1.0, RROConfig(steps=20, holdout=0.0), Gt, yt)
    cons = rro(G, yn, Gv, yv, 1.0, RROConfig(steps=20, holdout=0.0, consistency=5.0), Gt, yt)
    assert cons.history[-1]["consistency"] < base.history[-1]["consistency"]
    assert cons.history[-1]["consistency"] < cons.history[0]["consistency"]
