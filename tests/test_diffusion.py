import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
import torch
from hypothesis import given, settings, strategies as st

from carrot.embed.diffusion import SpectralDiffusion, chebyshev_expm_multiply, diffusion_weights, kept_readout_weights
from carrot.errors import CarrotError
from carrot.embed.graph import affinity, normalized_laplacian
from carrot.embed.readout import mean_readout, weighted_readout


def laplacians(b: int, n: int, d: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    L = normalized_laplacian(affinity(H, torch.rand(n, 2, generator=g, dtype=torch.float64)))
    return L.to(dtype), H.to(dtype)


@pytest.mark.parametrize("n", [1, 2, 7, 33, 64])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 5.0, 20.0])
def test_exact_operator_matches_scipy_expm(n, t):
    L, _ = laplacians(2, n, 5, seed=n)
    E = SpectralDiffusion.from_laplacian(L).operator(t)
    for b in range(2):
        np.testing.assert_allclose(E[b].numpy(), scipy.linalg.expm(-t * L[b].numpy()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,t", [(5, 0.5), (40, 2.0), (64, 10.0), (100, 30.0)])
def test_chebyshev_matches_scipy_expm_multiply(n, t):
    L, H = laplacians(2, n, 3, seed=7 * n)
    out = chebyshev_expm_multiply(L, H, t)
    for b in range(2):
        ref = scipy.sparse.linalg.expm_multiply(-t * L[b].numpy(), H[b].numpy())
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_readout_identity_many_t_one_eigh(dtype, tol):
    """mean(exp(-tL) H) == H^T (exp(-tL) 1 / N) for every t from one eigendecomposition."""
    L, H = laplacians(3, 20, 6, seed=3, dtype=dtype)
    ts = [0.0, 0.1, 1.0, 4.0]
    spec = SpectralDiffusion.from_laplacian(L)
    w = spec.readout_weights(ts)
    assert w.shape == (4, 3, 20)
    for i, t in enumerate(ts):
        direct = mean_readout(spec.apply(H, t))
        np.testing.assert_allclose(weighted_readout(H, w[i]).numpy(), direct.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(
        diffusion_weights(L.double(), ts, "chebyshev").numpy(), spec.readout_weights(ts).double().numpy(), atol=10 * tol
    )


def test_t_zero_is_exactly_mean_pooling():
    L, H = laplacians(2, 16, 8, seed=5)
    w = diffusion_weights(L, [0.0])[0]
    assert torch.allclose(w, torch.full_like(w, 1 / 16), atol=1e-15, rtol=0)
    assert torch.allclose(weighted_readout(H, w), H.mean(1), atol=1e-14, rtol=0)
    assert torch.allclose(SpectralDiffusion.from_laplacian(L).apply(H, 0.0), H, atol=1e-13)


@pytest.mark.parametrize("t", [-0.1, float("nan"), float("inf")])
def test_bad_t_is_refused(t):
    L, _ = laplacians(1, 4, 2, seed=0)
    with pytest.raises(CarrotError, match="t: expected"):
        diffusion_weights(L, [t])
    with pytest.raises(CarrotError, match="method"):
        diffusion_weights(L, [1.0], "pade")


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 15), t=st.floats(0, 8), seed=st.integers(0, 1000))
def test_heat_operator_is_symmetric_contraction(n, t, seed):
    L, _ = laplacians(1, n, 3, seed)
    E = SpectralDiffusion.from_laplacian(L).operator(t)[0]
    assert torch.allclose(E, E.T, atol=1e-12)
    ev = torch.linalg.eigvalsh(E)
    assert ev.min() > -1e-10 and ev.max() < 1 + 1e-10


def test_auto_method_picks_by_number_of_t_and_size_and_agrees_with_both():
    from carrot.embed.diffusion import resolve_method

    assert resolve_method("auto", 1, 64) == "chebyshev" and resolve_method("auto", 6, 64) == "eigh"
    assert resolve_method("auto", 6, 1024) == "chebyshev" and resolve_method("eigh", 1, 4096) == "eigh"
    with pytest.raises(CarrotError, match="expected 'auto', 'eigh' or 'chebyshev', got 'pade'"):
        resolve_method("pade", 1, 4)
    L, _ = laplacians(3, 20, 4, seed=5)
    for ts in ([1.5], [0.0, 0.5, 3.0]):
        auto = diffusion_weights(L, ts)
        for m in ("eigh", "chebyshev"):
            torch.testing.assert_close(auto, diffusion_weights(L, ts, m), rtol=0, atol=1e-13)


@pytest.mark.parametrize("n,k,seed", [(2, 3, 0), (7, 5, 1), (33, 8, 2), (90, 6, 3)])
def test_kept_readout_weights_equal_each_restricted_graph(n, k, seed):
    """One recurrence on the full graph, K kept sets at once == each kept set's own normalised Laplacian and exp
    (scipy expm oracle), for several t; one node alone reads out itself; an isolated node keeps exp(-t) / |S|."""
    g = torch.Generator().manual_seed(seed)
    W = affinity(torch.randn(1, n, 4, generator=g, dtype=torch.float64), torch.rand(n, 2, generator=g, dtype=torch.float64))[0]
    if n > 3:  # node 0 isolated: no edges at all
        W[0, :], W[:, 0] = 0.0, 0.0
    keep = torch.rand(k, n, generator=g) < 0.5
    keep[:, 0] |= torch.arange(k) % 2 == 0
    keep[keep.sum(1) == 0, -1] = True
    keep[0] = False
    keep[0, n - 1] = True  # one node alone
    ts = [0.0, 0.4, 1.0, 7.0]
    got = kept_readout_weights(W, keep, ts)
    assert got.shape == (len(ts), k, n)
    for r in range(k):
        S = torch.nonzero(keep[r]).flatten()
        assert (got[:, r, ~keep[r]] == 0).all()
        for i, t in enumerate(ts):
            if len(S) == 1 or t == 0:
                ref = np.full(len(S), 1.0 / len(S))
            else:
                L = normalized_laplacian(W[S][:, S][None])[0].numpy()
                ref = scipy.linalg.expm(-t * L) @ np.full(len(S), 1.0 / len(S))
            np.testing.assert_allclose(got[i, r, S].numpy(), ref, rtol=1e-10, atol=1e-13)


def test_kept_readout_weights_refuse_bad_input():
    W = affinity(torch.randn(1, 5, 3, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64))[0]
    with pytest.raises(CarrotError, match="at least one node"):
        kept_readout_weights(W, torch.zeros(2, 5, dtype=torch.bool), [1.0])
    with pytest.raises(CarrotError, match=r"keep: expected \(K, 5\)"):
        kept_readout_weights(W, torch.ones(2, 4, dtype=torch.bool), [1.0])
    with pytest.raises(CarrotError, match=r"W: expected one graph"):
        kept_readout_weights(W[None], torch.ones(2, 5, dtype=torch.bool), [1.0])
    with pytest.raises(CarrotError, match="t: expected"):
        kept_readout_weights(W, torch.ones(2, 5, dtype=torch.bool), [-1.0])
