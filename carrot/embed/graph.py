"""Region graph: W = K_space(P) * K_feat(H) (Gaussian, zero diagonal), L = I - D^-1/2 W D^-1/2."""
from __future__ import annotations

import torch

from carrot.config import median_factor
from carrot.errors import CarrotError


def symmetric_part(A: torch.Tensor) -> torch.Tensor:
    """(A + A^T) / 2 over the last two dims: bitwise symmetric, since a + b == b + a in IEEE arithmetic."""
    return 0.5 * (A + A.transpose(-1, -2))


def pairwise_sq_dists(X: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, (B, N, D) -> (B, N, N): bitwise symmetric, >= 0, exact zero diagonal.

    d2_ij = K_ii + K_jj - 2 K_ij from the Gram K = X X^T, made symmetric before use: a matmul
    kernel need not return a bitwise-symmetric X X^T, and every later step (Gaussian, kNN mask,
    Laplacian) keeps whatever symmetry d2 has.
    """
    K = symmetric_part(X @ X.transpose(-1, -2))
    sq = K.diagonal(dim1=-2, dim2=-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2)) - 2.0 * K
    d2 = d2.clamp_min_(0.0)
    d2.diagonal(dim1=-2, dim2=-1).zero_()
    return d2


def median_bandwidth(d2: torch.Tensor) -> torch.Tensor:
    """Median heuristic: sigma = median off-diagonal pairwise distance, per graph; (B, N, N) -> (B,)."""
    n = d2.shape[-1]
    if n < 2:
        return torch.ones(d2.shape[0], dtype=d2.dtype, device=d2.device)
    # d2 is symmetric: the strict upper triangle has the same (lower) median as the whole off-diagonal
    iu = torch.triu_indices(n, n, 1, device=d2.device)
    sigma = d2[:, iu[0], iu[1]].median(dim=-1).values.clamp_min(0).sqrt()
    return torch.where(sigma > 0, sigma, torch.ones_like(sigma))


def resolve_bandwidth(value: float | str, d2: torch.Tensor, name: str) -> torch.Tensor:
    """Per-graph bandwidth (B,) from a number, 'median' or 'median*k' and squared distances (B, N, N)."""
    k = median_factor(value, name)
    if k is not None:
        return k * median_bandwidth(d2)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CarrotError(f"{name}: expected 'median', 'median*k' or a positive number, got {value!r}") from None
    if not v > 0:
        raise CarrotError(f"{name}: expected 'median', 'median*k' or a positive number, got {value!r}")
    return torch.full((d2.shape[0],), v, dtype=d2.dtype, device=d2.device)


def affinity(
    H: torch.Tensor,
    P: torch.Tensor,
    sigma_space: float | str = "median",
    sigma_feat: float | str = "median",
    knn: int | None = None,
) -> torch.Tensor:
    """Gaussian spatial x feature affinity W (B, N, N); optional symmetric kNN sparsification.

    Bandwidths: a number, 'median' (per-graph median pairwise distance) or 'median*k' (k times it).

    H: (B, N, D) features; P: (N, 2) or (B, N, 2) centres. With ``knn=k`` an edge is kept when
    either endpoint has the other among its k strongest neighbours.
    """
    if H.dim() != 3:
        raise CarrotError(f"H: expected (B, N, D), got shape {tuple(H.shape)}")
    shared = P.dim() == 2  # one layout for the batch: spatial distances and bandwidth computed once
    P = P.unsqueeze(0) if shared else P
    if P.shape[1] != H.shape[1] or P.shape[-1] != 2 or (not shared and P.shape[0] != H.shape[0]):
        raise CarrotError(f"P: expected ({H.shape[1]}, 2) or ({H.shape[0]}, {H.shape[1]}, 2), got {tuple(P.shape[1:] if shared else P.shape)}")
    P = P.to(H.dtype)
    ds2, df2 = pairwise_sq_dists(P), pairwise_sq_dists(H)
    ss = resolve_bandwidth(sigma_space, ds2, "sigma_space").view(-1, 1, 1)
    sf = resolve_bandwidth(sigma_feat, df2, "sigma_feat").view(-1, 1, 1)
    W = torch.exp(-ds2 / (2 * ss * ss) - df2 / (2 * sf * sf))
    eye = torch.eye(W.shape[-1], dtype=torch.bool, device=W.device)
    W = W.masked_fill(eye, 0.0)  # out of place, so gradients reach the pixels (the pixel maps' peers)
    if knn is not None:
        n = W.shape[-1]
        if not isinstance(knn, int) or knn < 1:
            raise CarrotError(f"knn: expected a positive integer or None, got {knn!r}")
        if knn < n - 1:
            idx = W.topk(knn, dim=-1).indices
            keep = torch.zeros_like(W, dtype=torch.bool).scatter_(-1, idx, True)
            keep = keep | keep.transpose(-1, -2)
            W = W * keep
    return W


def normalized_laplacian(W: torch.Tensor) -> torch.Tensor:
    """L = I - D^-1/2 W D^-1/2 (B, N, N); an isolated node (degree 0) gets L_ii = 1, never NaN."""
    W = symmetric_part(W)  # a caller's W too; a no-op (bitwise) on affinity()'s output
    deg = W.sum(-1)
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(torch.finfo(W.dtype).tiny).rsqrt(), torch.zeros_like(deg))
    # the outer product d_i d_j is bitwise symmetric (a * b == b * a), so S and L are too
    S = W * (inv_sqrt.unsqueeze(-1) * inv_sqrt.unsqueeze(-2))
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return eye - S
