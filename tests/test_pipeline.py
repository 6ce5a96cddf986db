import numpy as np
import pytest
import scipy.linalg
import torch

from carrot.features.backbone import patch_centres
from carrot.config import BackboneConfig, DiffusionConfig, GraphConfig, RunConfig
from carrot.errors import CarrotError, NotFittedError
from carrot.embed.graph import affinity, normalized_laplacian
from carrot.run.pipeline import Carrot
from carrot.features.regions import RegionSet

PLAIN = BackboneConfig(blocks=1, global_tokens=False)  # the patch readout of the last block (no choice to make)


def regions(b=3, grid=(4, 5), d=6, seed=0) -> RegionSet:
    g = torch.Generator().manual_seed(seed)
    return RegionSet(torch.randn(b, grid[0] * grid[1], d, generator=g, dtype=torch.float64), patch_centres(grid, torch.float64), grid)


def test_t_zero_embedding_is_plain_mean_pooling():
    r = regions()
    G, w = Carrot(RunConfig(backbone=PLAIN, diffusion=DiffusionConfig(t=0.0))).embed_regions(r)
    assert torch.equal(G, torch.einsum("bnd,bn->bd", r.H, w))
    assert torch.allclose(G, r.H.mean(1), atol=1e-15, rtol=0)


@pytest.mark.parametrize("method", ["eigh", "chebyshev"])
@pytest.mark.parametrize("knn", [None, 3])
def test_embedding_is_mean_of_diffused_tokens(method, knn):
    r = regions(seed=1)
    cfg = RunConfig(backbone=PLAIN, graph=GraphConfig(sigma_space=0.6, sigma_feat="median", knn=knn), diffusion=DiffusionConfig(t=2.0, method=method))
    G, _ = Carrot(cfg).embed_regions(r)
    L = normalized_laplacian(affinity(r.H, r.P, 0.6, "median", knn)).numpy()
    for b in range(r.batch):
        ref = (scipy.linalg.expm(-2.0 * L[b]) @ r.H[b].numpy()).mean(0)
        np.testing.assert_allclose(G[b].numpy(), ref, rtol=1e-9, atol=1e-11)


def test_regionset_validates():
    with pytest.raises(CarrotError, match="NaN or Inf"):
        RegionSet(torch.full((1, 4, 2), float("nan")), patch_centres((2, 2)), (2, 2))
    with pytest.raises(CarrotError, match="RegionSet.P"):
        RegionSet(torch.zeros(1, 4, 2), patch_centres((1, 3)), (2, 2))
    with pytest.raises(CarrotError, match="grid_hw"):
        RegionSet(torch.zeros(1, 4, 2), patch_centres((2, 2)), (3, 3))


def test_explain_before_fit_is_refused():
    with pytest.raises(NotFittedError):
        Carrot().explain(["x.png"])
