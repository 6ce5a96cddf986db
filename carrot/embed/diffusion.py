"""Heat diffusion exp(-tL) on region graphs.

Exact path: batched symmetric eigendecomposition L = U diag(lam) U^T, reused for every t.
Fast path: Chebyshev expansion of exp(-t x) on the spectrum interval [0, 2] of a normalised
Laplacian, coefficients from modified Bessel functions (Hammond, Vandergheynst & Gribonval 2011);
the Chebyshev vectors T_k(L - I) X do not depend on t, so one recurrence serves every t.
With mean readout only w = exp(-tL) 1 / N is needed: one matrix-vector exponential per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from carrot.config import chebyshev_order
from carrot.errors import CarrotError


def _check_t(ts: Sequence[float]) -> list[float]:
    out = []
    for t in ts:
        t = float(t)
        if not np.isfinite(t) or t < 0:
            raise CarrotError(f"t: expected diffusion times >= 0, got {t!r}")
        out.append(t)
    return out


@dataclass
class SpectralDiffusion:
    """Eigendecomposition of a batch of Laplacians L (B, N, N), for exact exp(-tL) at many t."""

    evals: torch.Tensor  # (B, N)
    evecs: torch.Tensor  # (B, N, N)

    @classmethod
    def from_laplacian(cls, L: torch.Tensor) -> "SpectralDiffusion":
        if L.dim() != 3 or L.shape[-1] != L.shape[-2]:
            raise CarrotError(f"L: expected (B, N, N), got shape {tuple(L.shape)}")
        evals, evecs = torch.linalg.eigh(L)
        return cls(evals, evecs)

    def operator(self, t: float) -> torch.Tensor:
        """exp(-tL) as dense (B, N, N)."""
        (t,) = _check_t([t])
        return (self.evecs * torch.exp(-t * self.evals).unsqueeze(-2)) @ self.evecs.transpose(-1, -2)

    def apply(self, X: torch.Tensor, t: float) -> torch.Tensor:
        """exp(-tL) X for X (B, N, D) -> (B, N, D)."""
        (t,) = _check_t([t])
        coeff = self.evecs.transpose(-1, -2) @ X.to(self.evecs.dtype)
        return self.evecs @ (torch.exp(-t * self.evals).unsqueeze(-1) * coeff)

    def readout_weights(self, ts: Sequence[float]) -> torch.Tensor:
        """w(t) = exp(-tL) 1 / N for every t: (T, B, N)."""
        ts_ = torch.tensor(_check_t(ts), dtype=self.evals.dtype, device=self.evals.device)
        n = self.evals.shape[-1]
        proj = self.evecs.sum(-2)  # U^T 1, (B, N)
        decay = torch.exp(-ts_.view(-1, 1, 1) * self.evals.unsqueeze(0))  # (T, B, N)
        return torch.einsum("bij,tbj->tbi", self.evecs, decay * proj.unsqueeze(0)) / n


def chebyshev_expm_multiply(L: torch.Tensor, X: torch.Tensor, t: float, order: int | None = None) -> torch.Tensor:
    """exp(-tL) X by a Chebyshev series on [0, 2]; L (B, N, N) with spectrum in [0, 2], X (B, N, K).

    exp(-t(1 + y)) = e^{-t} [I_0(t) + 2 sum_k (-1)^k I_k(t) T_k(y)], y = L - I. The default order
    makes the truncated tail below float64 round-off for the given t.
    """
    return _chebyshev_series(L, X, _check_t([t]), order)[0]


def _chebyshev_series(L: torch.Tensor, X: torch.Tensor, ts: list[float], order: int | None = None) -> torch.Tensor:
    """exp(-tL) X for every t in ``ts`` from one recurrence T_k(L - I) X (the T_k do not depend on t): (T, B, N, K)."""
    if X.dim() != 3 or X.shape[:2] != L.shape[:2]:
        raise CarrotError(f"X: expected ({L.shape[0]}, {L.shape[1]}, K) to match L, got {tuple(X.shape)}")
    Y = L - torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return _chebyshev(lambda V: Y @ V, X, ts, order)


def _chebyshev(shifted: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, ts: list[float],
               order: int | None = None) -> torch.Tensor:
    """exp(-tL) X for every t in ``ts``, L given by its action ``shifted(V) = (L - I) V`` (spectrum of L in [0, 2]):
    sum_k c_k(t) T_k(L - I) X, one recurrence for every t; (T, *X.shape)."""
    from scipy.special import ive

    order = max(chebyshev_order(t) for t in ts) if order is None else order
    k = np.arange(order + 1)
    # ive(k, t) = I_k(t) e^{-t}: the e^{-t} factor is already folded in, with no overflow
    c = ive(k[None, :], np.asarray(ts, dtype=np.float64)[:, None]) * 2.0 * (-1.0) ** k
    c[:, 0] /= 2.0
    c = torch.as_tensor(c, dtype=X.dtype, device=X.device).view(len(ts), order + 1, *([1] * X.dim()))
    T_prev, T_cur = X, shifted(X)
    out = c[:, 0] * T_prev
    if order >= 1:
        out = out + c[:, 1] * T_cur
    for j in range(2, order + 1):
        T_prev, T_cur = T_cur, 2 * shifted(T_cur) - T_prev
        out = out + c[:, j] * T_cur
    return out


def kept_readout_weights(W: torch.Tensor, keep: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
    """Readout weights exp(-t L_S) 1_S / |S| of one graph restricted to each of K kept node sets S, without forming
    any restricted graph.

    L_S = I - D_S^-1/2 W_SS D_S^-1/2 is the normalised Laplacian of the kept nodes' affinities, D_S their degrees within
    S. With s = 1_S D_S^-1/2 (0 for a removed or isolated node), (L_S - I) v = -s * (W (s * v)) for v supported on S,
    so the Chebyshev recurrence of :func:`chebyshev_expm_multiply` runs on the full W, every kept set at once: one
    (K, N) x (N, N) product per term in place of K restricted Laplacians. Equal to :func:`diffusion_weights` of
    ``normalized_laplacian(W[S][:, S])`` to float64 rounding (tested); a set of one node reads it out alone (weight 1,
    as :meth:`~carrot.embed.embedder.Embedder.weights` gives a one-node graph).

    Parameters
    ----------
    W : (N, N) symmetric affinities, zero diagonal, one graph (:func:`~carrot.embed.graph.affinity`).
    keep : (K, N) bool, each row a nonempty kept set.
    ts : diffusion times >= 0.

    Returns
    -------
    (T, K, N) float64 weights, zero off each kept set, each row summing to at most 1.
    """
    ts = _check_t(ts)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise CarrotError(f"W: expected one graph's affinities (N, N), got shape {tuple(W.shape)}")
    m = torch.as_tensor(keep, dtype=W.dtype, device=W.device)
    if m.dim() != 2 or m.shape[1] != W.shape[0]:
        raise CarrotError(f"keep: expected (K, {W.shape[0]}) booleans, got shape {tuple(m.shape)}")
    counts = m.sum(1)
    if (counts == 0).any():
        raise CarrotError("keep: expected every kept set to hold at least one node")
    deg = (m @ W) * m  # degrees within each kept set (W symmetric)
    s = torch.where(deg > 0, deg.clamp_min(torch.finfo(W.dtype).tiny).rsqrt(), torch.zeros_like(deg))
    x = m / counts[:, None]
    out = x.expand(len(ts), -1, -1).clone()  # t = 0: the mean over each kept set
    positive = [i for i, t in enumerate(ts) if t > 0]
    if positive:
        out[positive] = _chebyshev(lambda V: -s * ((s * V) @ W), x, [ts[i] for i in positive])
        out[:, counts == 1] = x[counts == 1]
    return out


def resolve_method(method: str, n_t: int, N: int, t_max: float = 0.0) -> str:
    """'auto' -> 'eigh' where one eigendecomposition serves several t on a small graph (N <= 256), or where
    the Chebyshev series of the largest t needs more terms than the graph has nodes (its cost grows with t,
    eigh's does not); else 'chebyshev' (faster for a single t at every N, and for any number of t beyond
    N = 256; ``benchmarks/bench_diffusion.py``). 'eigh' and 'chebyshev' pass through."""
    if method == "auto":
        return "eigh" if (n_t > 1 and N <= 256) or chebyshev_order(t_max) > max(N, 64) else "chebyshev"
    if method not in ("eigh", "chebyshev"):
        raise CarrotError(f"diffusion method: expected 'auto', 'eigh' or 'chebyshev', got {method!r}")
    return method


def diffusion_weights(L: torch.Tensor, ts: Sequence[float], method: str = "auto") -> torch.Tensor:
    """Readout weights w(t) = exp(-tL) 1 / N for all t: L (B, N, N) -> (T, B, N)."""
    ts = _check_t(ts)
    method = resolve_method(method, len(ts), L.shape[-1], max(ts))
    if method == "eigh":
        return SpectralDiffusion.from_laplacian(L).readout_weights(ts)
    ones = torch.ones(L.shape[0], L.shape[1], 1, dtype=L.dtype, device=L.device)
    return _chebyshev_series(L, ones, ts)[..., 0] / L.shape[1]
