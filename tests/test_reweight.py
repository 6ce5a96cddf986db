import numpy as np
import pytest
import torch

from carrot.errors import CarrotError
from carrot.validation import one_hot
from carrot.ridge.primal import PrimalSystem
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
        sys_ = PrimalSystem.fit(G, Y, w, 0.5, intercept)
        return loss_and_grad(sys_.decision(Gv), torch.as_tensor(yv), loss, 0.3)[0]

    L, grad = weight_gradient(PrimalSystem.fit(G, Y, a, 0.5, intercept), Gv, yv, loss, 0.3)
    assert L == pytest.approx(val_loss(a), rel=1e-12)
    eps = 1e-6
    for i in range(0, n, 3):
        up, dn = a.copy(), a.copy()
        up[i] += eps
        dn[i] -= eps
        fd = (val_loss(up) - val_loss(dn)) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("kernel,n,d,c,zero", [("rbf", 25, 6, 3, False), ("laplacian", 14, 9, 2, True), ("poly", 20, 5, 4, True)])
def test_kernel_weight_gradient_matches_refits_of_the_dual(loss, kernel, n, d, c, zero):
    """The dual gradient against central differences of exact refits with the feature map held (standardize=False
    and a fixed gamma: the head's kernel of the raw embeddings), a zero-weight row included."""
    from carrot.ridge.dual import DualSystem
    from carrot.ridge.kernel import KernelRidgeHead

    G, y, a, Gv, yv = problem(n, d, c, seed=3 * n + d)
    if zero:
        a[1] = 0.0
    head = KernelRidgeHead(kernel=kernel, gamma=0.3, lam=0.4, standardize=False).fit(G, y, a)
    Y = one_hot(y, c)
    Z = torch.as_tensor(G)

    def val_loss(w):
        refit = KernelRidgeHead(kernel=kernel, gamma=0.3, lam=0.4, standardize=False).fit(G, y, w)
        return loss_and_grad(torch.as_tensor(refit.decision_function(Gv)), torch.as_tensor(yv), loss, 0.3)[0]

    system = DualSystem.on_weights(head, Z, Y, torch.as_tensor(a))
    assert torch.allclose(system.decision(Gv), torch.as_tensor(head.decision_function(Gv)), atol=1e-10)
    L, grad = weight_gradient(system, Gv, yv, loss, 0.3)
    assert L == pytest.approx(val_loss(a), rel=1e-10)
    eps = 1e-4  # second-order differences: truncation ~ eps^2, above the refits' rounding (poly Grams are ill-conditioned)
    for i in [0, 1] + list(range(2, n, 4)):
        step = [a.copy() for _ in range(3)]
        if a[i] > 0:  # central difference
            step[0][i] -= eps
            step[2][i] += eps
            fd = (val_loss(step[2]) - val_loss(step[0])) / (2 * eps)
        else:  # at a zero weight: the one-sided second-order difference
            step[1][i] += eps
            step[2][i] += 2 * eps
            fd = (-3 * val_loss(a) + 4 * val_loss(step[1]) - val_loss(step[2])) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=2e-5, abs=1e-8), i


def test_the_dual_gradient_of_a_linear_kernel_is_the_primal_one():
    """Kernel x.z (poly, degree 1, coef0 0): the dual system and the ridge head's primal system are one model, so
    their weight gradients agree (two derivations, one number)."""
    from carrot.ridge.dual import DualSystem
    from carrot.ridge.kernel import KernelRidgeHead

    G, y, a, Gv, yv = problem(18, 5, 3, seed=7)
    head = KernelRidgeHead(kernel="poly", gamma=1.0, degree=1, coef0=0.0, lam=0.6, standardize=False).fit(G, y, a)
    Y = one_hot(y, 3)
    dual = weight_gradient(DualSystem.on_weights(head, torch.as_tensor(G), Y, torch.as_tensor(a)), Gv, yv, "ce", 0.3)
    primal = weight_gradient(PrimalSystem.fit(G, Y, a, 0.6, True), Gv, yv, "ce", 0.3)
    assert dual[0] == pytest.approx(primal[0], rel=1e-10)
    assert torch.allclose(dual[1], primal[1], rtol=1e-8, atol=1e-12)


def test_rro_with_the_kernel_head_lowers_the_validation_loss_and_refuses_consistency():
    from carrot.ridge.kernel import KernelRidgeHead

    G, y, a, Gv, yv = problem(40, 6, 3, seed=11)
    head = KernelRidgeHead(gamma=0.5, lam=0.3).fit(G, y)
    res = rro(G, y, Gv, yv, head, RROConfig(steps=15, holdout=0.0, loss="ce"))
    losses = [h["val_loss"] for h in res.history]
    assert losses[res.best_step] < losses[0] and res.alpha.shape == (40,) and np.all(res.alpha > 0)
    assert res.history[0]["val_accuracy"] == pytest.approx(float((head.predict(Gv) == yv).mean()))
    with pytest.raises(CarrotError, match="rro.consistency: the kernel head has no support-profile term"):
        rro(G, y, Gv, yv, head, RROConfig(steps=2, consistency=0.5))


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
