import numpy as np
import pytest

from carrot.errors import CarrotError
from carrot.ridge.head import RidgeHead
from carrot.attribution.retrieval import KernelIndex, exact_top_k, recall_at_k

faiss = pytest.importorskip("faiss")


def make_problem(n=400, d=16, c=5, seed=0):
    g = np.random.default_rng(seed)
    means = g.normal(size=(c, d)) * 2
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    G = (means[y] + g.normal(size=(n, d))).astype(np.float32).astype(np.float64)
    Gt = (means[g.integers(0, c, 20)] + g.normal(size=(20, d))).astype(np.float32).astype(np.float64)
    head = RidgeHead(lam=1.0).fit(G, y)
    return G, Gt, head, head.decision_function(Gt).argmax(1)


def test_flat_index_with_full_m_is_exact():
    G, Gt, head, cls = make_problem()
    idx = KernelIndex.build(head, G, "flat")
    got, vals = idx.top_k(Gt, cls, k=10, m=len(G))
    ref = exact_top_k(head, G, Gt, cls, 10)
    assert recall_at_k(got, ref) == 1.0
    assert np.all(np.diff(vals, axis=1) <= 1e-12)
    assert all(len(set(r)) == 10 for r in got)


def test_recall_grows_with_m_and_ivf_works():
    G, Gt, head, cls = make_problem(seed=1)
    ref = exact_top_k(head, G, Gt, cls, 10)
    flat = KernelIndex.build(head, G, "flat")
    recalls = [recall_at_k(flat.top_k(Gt, cls, 10, m)[0], ref) for m in (10, 50, 200)]
    assert recalls[0] <= recalls[1] <= recalls[2]
    ivf = KernelIndex.build(head, G, "ivf", nlist=8, nprobe=8)
    assert recall_at_k(ivf.top_k(Gt, cls, 10, 400)[0], ref) == 1.0  # all cells probed
    with pytest.raises(CarrotError, match="k, m"):
        flat.top_k(Gt, cls, 20, 10)
    with pytest.raises(CarrotError, match="index kind"):
        KernelIndex.build(head, G, "hnsw")


def test_returned_values_are_the_exact_float64_contributions():
    import torch

    from carrot.attribution.representer import centred_kernel

    g = np.random.default_rng(7)
    y = g.integers(0, 3, 200)
    G = g.normal(size=(200, 12)) + y[:, None]  # float64, not float32-representable
    Gt = g.normal(size=(6, 12)) * 1e3 + 1.0  # large values: float32 rounding would show
    head = RidgeHead(lam=0.5).fit(G, y)
    cls = head.decision_function(Gt).argmax(1)
    got, vals = KernelIndex.build(head, G, "flat", use_gpu=False).top_k(Gt, cls, k=5, m=200)
    exact = (centred_kernel(head, G, Gt) * head.dual_coef_.T[torch.as_tensor(cls)]).numpy()
    np.testing.assert_allclose(vals, np.take_along_axis(exact, got, 1), rtol=1e-12, atol=0)


def test_gpu_index_request_without_a_gpu_is_named():
    if faiss.get_num_gpus() > 0:
        pytest.skip("this FAISS build sees a GPU")
    G, _, head, _ = make_problem(n=50)
    with pytest.raises(CarrotError, match="use_gpu: a GPU index was requested"):
        KernelIndex.build(head, G, "flat", use_gpu=True)


@pytest.mark.parametrize("kind", ["ridge", "kernel"])
def test_similar_index_finds_the_heads_own_nearest_images(kind):
    """SimilarIndex: FAISS exact search and the torch fallback give the exact top-k by the head's own similarity
    (the centred inner product, or the RBF kernel), with its exact values; inverted lists find most of them."""
    pytest.importorskip("faiss")
    from carrot.attribution.retrieval import SimilarIndex
    from carrot.ridge.kernel import KernelRidgeHead

    g = np.random.default_rng(7)
    centres = g.normal(size=(6, 12)) * 2
    y = np.arange(600) % 6
    G, Q = centres[y] + g.normal(size=(600, 12)), centres[np.arange(30) % 6] + g.normal(size=(30, 12))
    head = (RidgeHead(lam=1.0) if kind == "ridge" else KernelRidgeHead(gamma=0.5, lam=0.1, approx="exact")).fit(G, y)
    S = head.affinity(Q, G).numpy()
    exact = np.argsort(-S, axis=1, kind="stable")[:, :5]
    for how in ("flat", "torch"):
        idx, val = SimilarIndex.build(head, G, how).search(Q, 5)
        np.testing.assert_array_equal(idx, exact)
        np.testing.assert_allclose(val, np.take_along_axis(S, exact, 1), rtol=1e-12)
    ivf = SimilarIndex.build(head, G, "ivf", nprobe=8).search(Q, 5)[0]
    assert recall_at_k(ivf, exact) >= 0.8
    with pytest.raises(CarrotError, match="k: expected"):
        SimilarIndex.build(head, G, "torch").search(Q, 0)
