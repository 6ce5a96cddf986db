"""The CUDA paths against the CPU paths. Skipped where torch sees no CUDA GPU (CI, the development
machine); run on a lent GPU by ``benchmarks/gpu_session.sh``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from carrot.ridge.head import RidgeHead
from carrot.ridge.primal import PrimalSystem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


def _blobs(n: int, d: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    return g.normal(size=(c, d))[y] + g.normal(size=(n, d)), y


@pytest.mark.parametrize("n,d,c,solver,weighted", [(300, 40, 5, "primal", False), (300, 40, 5, "primal", True),
                                                    (60, 200, 4, "dual", True), (2000, 64, 10, "auto", False)])
def test_ridge_head_on_cuda_equals_cpu(n, d, c, solver, weighted):
    G, y = _blobs(n, d, c)
    w = np.random.default_rng(1).uniform(0.2, 2.0, n) if weighted else None
    cpu = RidgeHead(lam=0.7, solver=solver, device="cpu", chunk_size=128).fit(G, y, w)
    gpu = RidgeHead(lam=0.7, solver=solver, device="cuda", chunk_size=128).fit(G, y, w)
    np.testing.assert_allclose(gpu.coef_.numpy(), cpu.coef_.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(gpu.intercept_.numpy(), cpu.intercept_.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(gpu.dual_coef_.numpy(), cpu.dual_coef_.numpy(), rtol=1e-8, atol=1e-11)
    assert gpu.coef_.device.type == "cpu"  # fitted state comes back to the host


def test_streamed_memmap_fit_on_cuda(tmp_path):
    G, y = _blobs(5000, 96, 20, seed=2)
    mm = np.lib.format.open_memmap(tmp_path / "G.npy", mode="w+", dtype=np.float32, shape=G.shape)
    mm[:] = G
    mm.flush()
    cpu = RidgeHead(lam=3.0, device="cpu").fit(G.astype(np.float32).astype(np.float64), y)
    gpu = RidgeHead(lam=3.0, device="cuda", chunk_size=1024).fit(np.load(tmp_path / "G.npy", mmap_mode="r"), y)
    np.testing.assert_allclose(gpu.coef_.numpy(), cpu.coef_.numpy(), rtol=1e-9, atol=1e-11)


def test_ridge_system_on_cuda_gives_the_same_loo_and_woodbury():
    G, y = _blobs(400, 30, 6, seed=3)
    Y = torch.nn.functional.one_hot(torch.as_tensor(y), 6).to(torch.float64)
    cpu = PrimalSystem.fit(G, Y, None, 2.0, device="cpu")
    gpu = PrimalSystem.fit(G, Y, None, 2.0, device="cuda")
    torch.testing.assert_close(gpu.theta, cpu.theta, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gpu.loo_logits(), cpu.loo_logits(), rtol=1e-8, atol=1e-10)
    drop = np.arange(0, 400, 37)
    torch.testing.assert_close(gpu.updated_theta(drop, torch.zeros(len(drop), dtype=torch.float64)),
                               cpu.updated_theta(drop, torch.zeros(len(drop), dtype=torch.float64)), rtol=1e-8, atol=1e-10)


def test_backbone_and_pipeline_on_cuda(synthetic_root):
    from carrot.features.backbone import create_backbone
    from carrot.config import RunConfig
    from carrot.data import load_imagefolder, load_image
    from carrot.run.pipeline import Carrot

    cpu_bb = create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu")
    gpu_bb = create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cuda")
    train, _ = load_imagefolder(synthetic_root)
    x = torch.stack([cpu_bb.transform()(load_image(r)) for r in train.records[:4]])
    H_cpu, grid = cpu_bb(x)
    H_gpu, grid_gpu = gpu_bb(x)
    assert grid == grid_gpu and H_gpu.device.type == "cuda"
    torch.testing.assert_close(H_gpu.cpu(), H_cpu, rtol=1e-3, atol=1e-3)  # cuDNN/cuBLAS reduction order

    cfg = {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "pretrained": False}, "head": {"lam": 1.0}}
    m_cpu = Carrot(RunConfig.from_dict({**cfg, "device": "cpu"}))
    m_gpu = Carrot(RunConfig.from_dict({**cfg, "device": "cuda"}))
    paths = [r.path for r in train.records]
    G_cpu, G_gpu = m_cpu.embed_images(paths)[0], m_gpu.embed_images(paths)[0]
    np.testing.assert_allclose(G_gpu, G_cpu, rtol=2e-3, atol=2e-3)
    m_gpu.fit(G_gpu, train.labels, train.records, train.classes)
    assert m_gpu.head_.coef_.device.type == "cpu"


def test_faiss_gpu_index_equals_flat_cpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("this FAISS build has no GPU support (faiss-cpu)")
    from carrot.attribution.retrieval import KernelIndex

    G, y = _blobs(3000, 32, 8, seed=4)
    Gt, _ = _blobs(20, 32, 8, seed=5)
    head = RidgeHead(lam=1.0).fit(G, y)
    cls = head.decision_function(Gt).argmax(1)
    i_cpu, v_cpu = KernelIndex.build(head, G, use_gpu=False).top_k(Gt, cls, 10, 200)
    i_gpu, v_gpu = KernelIndex.build(head, G, use_gpu=True).top_k(Gt, cls, 10, 200)
    np.testing.assert_allclose(v_gpu, v_cpu, rtol=1e-10)


@pytest.mark.parametrize("ts", [[0.7], [0.0, 1.0, 4.0]])
def test_graph_and_diffusion_on_cuda_equal_cpu(ts):
    from carrot.features.backbone import patch_centres
    from carrot.config import RunConfig
    from carrot.run.pipeline import Carrot

    H = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    P = patch_centres((5, 10), torch.float64)
    cpu = Carrot(RunConfig.from_dict({"device": "cpu"})).region_weights(H, P, ts)
    gpu = Carrot(RunConfig.from_dict({"device": "cuda"})).region_weights(H, P, ts)
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approx", ["exact", "nystroem"])
def test_kernel_head_on_cuda_equals_cpu(approx):
    """The kernel head's n x n (or n x m) solve on the GPU: the fit, the LOO path's choice, LOO and removal equal the
    CPU's; fitted state comes back to the host."""
    from carrot.ridge.kernel import KernelRidgeHead

    G, y = _blobs(600, 48, 6, seed=3)
    w = np.random.default_rng(4).uniform(0.2, 2.0, len(y))
    kw = dict(kernel="rbf", approx=approx, n_landmarks=128)
    cpu = KernelRidgeHead(device="cpu", **kw).fit(G, y, w)
    gpu = KernelRidgeHead(device="cuda", **kw).fit(G, y, w)
    assert (gpu.gamma_, gpu.lam_) == (cpu.gamma_, cpu.lam_) and gpu.dual_coef_.device.type == "cpu"
    Gt = _blobs(50, 48, 6, seed=5)[0]
    np.testing.assert_allclose(gpu.decision_function(Gt), cpu.decision_function(Gt), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(gpu.system().loo_logits().numpy(), cpu.system().loo_logits().numpy(), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(gpu.system().decision_without(Gt, [1, 5, 9]).numpy(),
                               cpu.system().decision_without(Gt, [1, 5, 9]).numpy(), rtol=1e-8, atol=1e-9)
