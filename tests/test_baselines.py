import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from carrot.ridge.baselines import SoftmaxHead, TracInHead
from carrot.errors import CarrotError


def data(n=80, d=6, c=3, seed=0):
    g = np.random.default_rng(seed)
    means = g.normal(size=(c, d))
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    return means[y] + g.normal(size=(n, d)) + 2.0, y, g.normal(size=(10, d)) + 2.0


@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_head_representer_identity_and_sklearn(seed):
    G, y, Gt = data(seed=seed)
    lam = 1e-2
    head = SoftmaxHead(lam=lam).fit(G, y)
    assert head.grad_norm_ < 1e-7
    Xt = torch.from_numpy(Gt) - head.feature_mean_
    K = Xt @ (torch.from_numpy(G) - head.feature_mean_).T
    recon = (K @ head.dual_coef_).numpy() + head.intercept_.numpy()
    # W - sum_i x_i beta_i^T = grad_W / (2 lam): the identity is exact up to the optimiser's stationarity
    bound = Xt.abs().sum(1, keepdim=True).numpy() * head.grad_norm_ / (2 * lam) + 1e-12
    assert np.all(np.abs(recon - head.decision_function(Gt)) <= bound)
    assert np.abs(recon - head.decision_function(Gt)).max() < 1e-5
    # same objective as sklearn's multinomial LogisticRegression with C = 1 / (2 lam n)
    ref = LogisticRegression(C=1 / (2 * lam * len(y)), tol=1e-12, max_iter=10_000).fit(G, y)
    np.testing.assert_allclose(head.coef_.numpy().T, ref.coef_, rtol=1e-4, atol=1e-5)


def test_tracin_matches_per_example_autograd():
    G, y, Gt = data(n=30, seed=2)
    head = TracInHead.fit(G, y, epochs=6, lr=0.3, batch_size=8, n_checkpoints=3)
    assert len(head.checkpoints) == 3
    yt = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    infl = head.influence(G, y, Gt, yt)

    def grad(x, label, theta):
        th = theta.clone().requires_grad_(True)
        xa = torch.cat([torch.ones(1, dtype=torch.float64), torch.from_numpy(x) - head.feature_mean])
        loss = torch.nn.functional.cross_entropy((xa @ th)[None], torch.tensor([label]))
        return torch.autograd.grad(loss, th)[0].flatten()

    for (i, j) in [(0, 0), (3, 7), (9, 29)]:
        ref = sum(lr * grad(Gt[i], yt[i], th) @ grad(G[j], y[j], th) for th, lr in head.checkpoints)
        assert infl[i, j].item() == pytest.approx(ref.item(), rel=1e-10)
    si = head.self_influence(G, y)
    ref = sum(lr * grad(G[4], y[4], th).pow(2).sum() for th, lr in head.checkpoints)
    assert si[4].item() == pytest.approx(ref.item(), rel=1e-10)


def test_baseline_errors():
    G, y, _ = data()
    with pytest.raises(CarrotError, match="lam"):
        SoftmaxHead(lam=0).fit(G, y)
    with pytest.raises(CarrotError, match="n_checkpoints"):
        TracInHead.fit(G, y, epochs=2, n_checkpoints=5)
