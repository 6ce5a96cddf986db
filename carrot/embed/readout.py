"""Readout: diffused node features -> one embedding per image."""
from __future__ import annotations

import torch


def mean_readout(Hd: torch.Tensor) -> torch.Tensor:
    """g = mean_j H'_j; (B, N, D) -> (B, D)."""
    return Hd.mean(dim=-2)


def weighted_readout(H: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g = H^T w, identical to mean readout of exp(-tL) H when w = exp(-tL) 1 / N; (B,N,D),(B,N) -> (B,D)."""
    return torch.einsum("bnd,bn->bd", H.to(w.dtype), w)
