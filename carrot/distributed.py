"""Multi-process / multi-node work on torch.distributed (torchrun sets the environment).

* Gram moments: each rank sums S = sum a, s1 = sum a g, sy = sum a y, GtAG, GtAY over its rows;
  one all_reduce; every rank then solves the same D x D system (:meth:`RidgeHead.fit_moments`).
* Sharded extraction: rank r extracts rows r, r + world, ... of each split into its own token cache.
Works with the gloo backend on CPUs (tested with 2 processes) and nccl on GPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .validation import ArrayLike, as_weights, one_hot


def world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed if initialised, else from torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_from_env() -> bool:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass
class GramMoments:
    """Sufficient statistics of the weighted ridge problem, summable across shards."""

    S: torch.Tensor  # () total weight
    s1: torch.Tensor  # (D,) sum a g
    sy: torch.Tensor  # (C,) sum a y
    GtAG: torch.Tensor  # (D, D)
    GtAY: torch.Tensor  # (D, C)

    @classmethod
    def accumulate(cls, G: ArrayLike, y_idx: np.ndarray, n_classes: int, sample_weight: ArrayLike | None = None,
                   chunk_size: int = 65536, device: str | torch.device = "cpu") -> "GramMoments":
        """Stream rows of G (array or memmap) in chunks; float64 accumulation on ``device``."""
        n, d = int(G.shape[0]), int(G.shape[1])
        a = as_weights(sample_weight, n)
        m = cls(torch.zeros((), dtype=torch.float64, device=device), torch.zeros(d, dtype=torch.float64, device=device),
                torch.zeros(n_classes, dtype=torch.float64, device=device),
                torch.zeros(d, d, dtype=torch.float64, device=device), torch.zeros(d, n_classes, dtype=torch.float64, device=device))
        for s in range(0, n, chunk_size):
            from .head import RidgeHead

            X = RidgeHead._rows(G, slice(s, s + chunk_size)).to(device)
            ac = a[s : s + chunk_size].to(device)
            Y = one_hot(np.asarray(y_idx)[s : s + chunk_size], n_classes).to(device)
            aX = X * ac.unsqueeze(1)
            m.S += ac.sum()
            m.s1 += aX.sum(0)
            m.sy += ac @ Y
            m.GtAG += aX.T @ X
            m.GtAY += aX.T @ Y
        return m

    def all_reduce(self) -> "GramMoments":
        """Sum the moments of every rank in place (no-op when not distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.S, self.s1, self.sy, self.GtAG, self.GtAY):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return self
