import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from carrot.errors import CarrotError
from carrot.embed.graph import affinity, median_bandwidth, normalized_laplacian, pairwise_sq_dists


def brute_affinity(H: np.ndarray, P: np.ndarray, ss: float, sf: float) -> np.ndarray:
    n = H.shape[0]
    W = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                W[i, j] = np.exp(-np.sum((P[i] - P[j]) ** 2) / (2 * ss**2)) * np.exp(-np.sum((H[i] - H[j]) ** 2) / (2 * sf**2))
    return W


@pytest.mark.parametrize("n,d", [(2, 3), (5, 4), (16, 8), (30, 17)])
def test_affinity_matches_brute_force(n, d):
    g = np.random.default_rng(n * 100 + d)
    H, P = g.normal(size=(n, d)), g.uniform(-1, 1, size=(n, 2))
    W = affinity(torch.from_numpy(H)[None], torch.from_numpy(P), 0.7, 2.5)[0].numpy()
    np.testing.assert_allclose(W, brute_affinity(H, P, 0.7, 2.5), rtol=1e-10, atol=1e-12)


def test_median_heuristic_is_the_median_offdiagonal_distance():
    g = np.random.default_rng(0)
    X = g.normal(size=(12, 5))
    d = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    off = d[~np.eye(12, dtype=bool)]
    sigma = median_bandwidth(pairwise_sq_dists(torch.from_numpy(X)[None]))[0].item()
    # torch's median takes the lower of the two middle values
    assert sigma == pytest.approx(np.sort(off)[(len(off) - 1) // 2], rel=1e-9)
    H = torch.from_numpy(X)[None]
    P = torch.rand(12, 2, dtype=torch.float64)
    ss = median_bandwidth(pairwise_sq_dists(P[None]))[0].item()
    np.testing.assert_allclose(affinity(H, P)[0].numpy(), brute_affinity(X, P.numpy(), ss, sigma), rtol=1e-10)


def test_knn_is_symmetric_and_keeps_the_strongest_edges():
    g = torch.Generator().manual_seed(1)
    H = torch.randn(2, 20, 6, generator=g, dtype=torch.float64)
    P = torch.rand(20, 2, generator=g, dtype=torch.float64)
    full = affinity(H, P, 0.5, 3.0)
    W = affinity(H, P, 0.5, 3.0, knn=3)
    assert torch.equal(W, W.transpose(-1, -2))
    for b in range(2):
        for i in range(20):
            top = set(full[b, i].topk(3).indices.tolist())
            assert top <= set(W[b, i].nonzero().flatten().tolist())
    kept = W > 0
    assert torch.equal(W[kept], full[kept])


def test_laplacian_spectrum_and_isolated_node_has_no_nan():
    g = torch.Generator().manual_seed(2)
    H = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    W = affinity(H, torch.rand(9, 2, generator=g, dtype=torch.float64))
    W[:, 0, :] = 0
    W[:, :, 0] = 0  # node 0 isolated
    L = normalized_laplacian(W)
    assert torch.isfinite(L).all()
    assert torch.equal(L[:, 0, 0], torch.ones(3, dtype=torch.float64))
    ev = torch.linalg.eigvalsh(L)
    assert ev.min() > -1e-10 and ev.max() < 2 + 1e-10
    d = W.sum(-1)
    ref = torch.eye(9, dtype=torch.float64) - W / torch.sqrt(d.unsqueeze(-1) * d.unsqueeze(-2)).clamp_min(1e-300)
    ref[:, 0, 0] = 1
    assert torch.allclose(L, ref, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, "wide", float("nan")])
def test_bad_bandwidth_is_named(bad):
    with pytest.raises(CarrotError, match="sigma_space"):
        affinity(torch.randn(1, 4, 3), torch.rand(4, 2), sigma_space=bad)


def test_shape_errors_name_the_parameter():
    with pytest.raises(CarrotError, match="P: expected"):
        affinity(torch.randn(1, 4, 3), torch.rand(5, 2))
    with pytest.raises(CarrotError, match="knn"):
        affinity(torch.randn(1, 4, 3), torch.rand(4, 2), knn=0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_affinity_properties(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    W = affinity(torch.randn(1, n, d, generator=g, dtype=torch.float64), torch.rand(n, 2, generator=g, dtype=torch.float64))
    assert torch.equal(W, W.transpose(-1, -2))
    assert (W >= 0).all() and (W <= 1).all()
    assert (W.diagonal(dim1=-2, dim2=-1) == 0).all()


def test_scaled_median_bandwidth():
    g = torch.Generator().manual_seed(4)
    H = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    P = torch.rand(10, 2, generator=g, dtype=torch.float64)
    sf = median_bandwidth(pairwise_sq_dists(H))
    W = affinity(H, P, sigma_space=1.0, sigma_feat="median*2")
    ref = torch.stack([affinity(H[b : b + 1], P, 1.0, 2 * float(sf[b]))[0] for b in range(2)])
    assert torch.allclose(W, ref, atol=1e-14)
    for bad in ("median*0", "median*x", "mean"):
        with pytest.raises(CarrotError, match="median\\*k"):
            affinity(H, P, sigma_feat=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,n,d", [(1, 2, 1), (3, 17, 5), (2, 64, 384), (1, 257, 768)])
def test_symmetry_holds_by_construction_at_every_stage(dtype, b, n, d):
    # sizes up to a ViT's 257 tokens x 768 dims, where blocked matmul kernels need not return a
    # bitwise-symmetric X X^T: d2, W (with and without the kNN mask) and L must be symmetric exactly
    g = torch.Generator().manual_seed(n * 1000 + d)
    H = torch.randn(b, n, d, generator=g, dtype=dtype)
    P = torch.rand(b, n, 2, generator=g, dtype=dtype)
    d2 = pairwise_sq_dists(H)
    assert torch.equal(d2, d2.transpose(-1, -2))
    assert (d2 >= 0).all() and (d2.diagonal(dim1=-2, dim2=-1) == 0).all()
    ref = ((H.double()[:, :, None] - H.double()[:, None]) ** 2).sum(-1)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(d2.double(), ref, rtol=tol, atol=tol * ref.max().item())
    for knn in (None, 3):
        W = affinity(H, P, knn=knn)
        assert torch.equal(W, W.transpose(-1, -2))
        L = normalized_laplacian(W)
        assert torch.equal(L, L.transpose(-1, -2))


def test_laplacian_of_a_nearly_symmetric_affinity_is_exactly_symmetric():
    # a caller's W that is symmetric only to rounding still gives a bitwise-symmetric L
    g = torch.Generator().manual_seed(7)
    A = torch.rand(2, 30, 30, generator=g, dtype=torch.float64)
    W = A + A.transpose(-1, -2)
    W = W + 1e-15 * torch.rand(2, 30, 30, generator=g, dtype=torch.float64)
    assert not torch.equal(W, W.transpose(-1, -2))
    L = normalized_laplacian(W)
    assert torch.equal(L, L.transpose(-1, -2))
    Ws = 0.5 * (W + W.transpose(-1, -2))
    d = Ws.sum(-1)
    ref = torch.eye(30, dtype=torch.float64) - Ws / torch.sqrt(d.unsqueeze(-1) * d.unsqueeze(-2))
    assert torch.allclose(L, ref, atol=1e-14)
