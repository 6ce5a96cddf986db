"""Gram moments summed over 2 gloo processes give the single-process head."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from carrot.ridge.core import CentredMoments
from carrot.errors import CarrotError
from carrot.ridge.head import RidgeHead


def data():
    g = np.random.default_rng(0)
    G = g.normal(size=(301, 12)) + 3.0
    y = np.concatenate([np.arange(5), g.integers(0, 5, 296)])
    return G, y, g.uniform(0.5, 2.0, 301)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    G, y, a = data()
    rows = np.arange(rank, len(y), world)
    m = CentredMoments.accumulate(G[rows], y[rows], a[rows], n_classes=5, chunk_size=17, distributed=True)
    head = RidgeHead(lam=0.8).fit_moments(m, np.arange(5))
    torch.save({"coef": head.coef_, "intercept": head.intercept_, "S": m.S}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_process_gloo_moments_equal_single_process(tmp_path):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    G, y, a = data()
    ref = RidgeHead(lam=0.8).fit(G, y, sample_weight=a)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["S"].item() == pytest.approx(a.sum())
        np.testing.assert_allclose(r["coef"].numpy(), ref.coef_.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(r["intercept"].numpy(), ref.intercept_.numpy(), rtol=1e-9, atol=1e-11)


def test_moments_single_process_and_shard_duals():
    G, y, a = data()
    head = RidgeHead(lam=0.8).fit_moments(CentredMoments.accumulate(G, y, a, n_classes=5), np.arange(5))
    ref = RidgeHead(lam=0.8).fit(G, y, sample_weight=a)
    np.testing.assert_allclose(head.decision_function(G), ref.decision_function(G), rtol=1e-9, atol=1e-11)
    duals = torch.cat([head.dual_coef(G[:100], y[:100], a[:100]), head.dual_coef(G[100:], y[100:], a[100:])])
    np.testing.assert_allclose(duals.numpy(), ref.dual_coef_.numpy(), rtol=1e-8, atol=1e-10)
    with pytest.raises(CarrotError, match="lam: 'auto'"):
        RidgeHead(lam="auto").fit_moments(CentredMoments.accumulate(G, y, n_classes=5), np.arange(5))
