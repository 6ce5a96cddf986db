"""Kernels and the Gram algebra of the kernel head: k(X, Y) for the registered kernels, a Gram held dense (n, n)
or as its factor (the Nystroem features, :class:`LowRankGram`), and its weighted centring.

With weights a (S = sum a), the weighted-centred Gram Kc = (I - 1 a^T / S) K (I - a 1^T / S) is the kernel of the
feature map centred at its a-weighted mean, and kc(x, z_i) (:func:`centre_cross`) is the same centring of the cross
kernel of new inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from carrot.errors import CarrotError
from carrot.validation import ArrayLike, as_float64_matrix


def _sq_dist(X: torch.Tensor, Y: torch.Tensor, y_sq: torch.Tensor | None = None) -> torch.Tensor:
    """|x - y|^2 (m, n); ``y_sq``: the rows of Y's squared norms (n,) when already known (a head's training rows)."""
    y_sq = (Y * Y).sum(1) if y_sq is None else y_sq
    return ((X * X).sum(1, keepdim=True) + y_sq - 2 * X @ Y.T).clamp_min_(0.0)


def _decay(base: torch.Tensor, gamma: float, degree: int, coef0: float) -> torch.Tensor:
    return torch.exp(-gamma * base)


def _polynomial(base: torch.Tensor, gamma: float, degree: int, coef0: float) -> torch.Tensor:
    return (gamma * base + coef0) ** degree


@dataclass(frozen=True)
class Kernel:
    """One kernel k(X, Y) = of_base(base(X, Y), gamma, degree, coef0): the part that does not depend on the kernel's
    parameters (a distance, an inner product), shared by every gamma of a search, then the parameters' map; and the
    scale its 'auto' gamma grid is built around."""

    name: str
    base: Callable[..., torch.Tensor]  # (X, Y, y_sq=None) -> (m, n)
    of_base: Callable[[torch.Tensor, float, int, float], torch.Tensor]
    formula: str
    median: Callable[[torch.Tensor], float] | None  # 1 / median of the distance the kernel decays with

    def fn(self, X: torch.Tensor, Y: torch.Tensor, gamma: float, degree: int, coef0: float,
           y_sq: torch.Tensor | None = None) -> torch.Tensor:
        return self.of_base(self.base(X, Y, y_sq), gamma, degree, coef0)


def _median_inverse(dist: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], float]:
    def scale(Z: torch.Tensor) -> float:
        Zs = Z[torch.randperm(len(Z), generator=torch.Generator().manual_seed(0))[:1000]]
        d = dist(Zs, Zs)
        off = d[~torch.eye(len(Zs), dtype=torch.bool)]
        med = float(off.median()) if off.numel() else 1.0
        return 1.0 / med if med > 0 else 1.0

    return scale


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("rbf", _sq_dist, _decay, "exp(-gamma |x - y|^2)", _median_inverse(_sq_dist)),
    Kernel("laplacian", lambda X, Y, y_sq=None: torch.cdist(X, Y, p=1.0), _decay, "exp(-gamma |x - y|_1)",
           _median_inverse(lambda X, Y: torch.cdist(X, Y, p=1.0))),
    Kernel("poly", lambda X, Y, y_sq=None: X @ Y.T, _polynomial, "(gamma x.y + coef0)^degree", None),
)}


def kernel_matrix(kernel: str, X: ArrayLike, Y: ArrayLike | None = None, gamma: float = 1.0, degree: int = 3,
                  coef0: float = 1.0, y_sq: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel between rows of X (m, D) and Y (n, D) as float64 (m, n); K(X, X) (Y None) is symmetric with the
    kernel's own diagonal by construction.

    Parameters
    ----------
    kernel : one of :data:`KERNELS` ('rbf', 'laplacian', 'poly').
    X : (m, D); Y : (n, D) or None for X itself; gamma > 0; degree >= 1 and coef0 >= 0 (poly only).
    y_sq : (n,) the squared norms of Y's rows when the caller keeps them (the RBF kernel of many small batches
        against one training set), else None.

    Returns
    -------
    torch.Tensor (m, n) float64.
    """
    if kernel not in KERNELS:
        raise CarrotError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    X = X if torch.is_tensor(X) and X.dtype == torch.float64 else as_float64_matrix(X, "X")
    same = Y is None
    Y = X if same else (Y if torch.is_tensor(Y) and Y.dtype == torch.float64 else as_float64_matrix(Y, "Y"))
    if X.shape[1] != Y.shape[1]:
        raise CarrotError(f"Y: expected {X.shape[1]} features as X, got {Y.shape[1]}")
    K = KERNELS[kernel].fn(X, Y, float(gamma), int(degree), float(coef0), None if same else y_sq)
    return _symmetrised(kernel, K) if same else K


def _symmetrised(kernel: str, K: torch.Tensor) -> torch.Tensor:
    """K(X, X) symmetric with the kernel's own diagonal (1 for the decaying kernels), by construction."""
    K = (K + K.T) / 2
    if kernel != "poly":
        K.diagonal().fill_(1.0)
    return K


def gram_over(kernel: str, X: torch.Tensor, gammas: Sequence[float], degree: int = 3,
              coef0: float = 1.0) -> Iterator[torch.Tensor]:
    """K(X, X) (n, n) for each of ``gammas`` in turn, the kernel's base (the distances, the inner products) computed
    once: each equals :func:`kernel_matrix` (X, None, gamma) bitwise, at a search's cost of one n^2 D product, not one
    per gamma. One more n x n array is alive than for a single gamma."""
    if kernel not in KERNELS:
        raise CarrotError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    k = KERNELS[kernel]
    base = k.base(X, X)
    for gamma in gammas:
        yield _symmetrised(kernel, k.of_base(base, float(gamma), int(degree), float(coef0)))


@dataclass(frozen=True)
class LowRankGram:
    """A Gram K = F F^T (n, n) held as its factor F (n, r) (the Nystroem head's features): ``K @ X`` and ``K[rows]``
    as for the dense matrix, in O(n r) memory."""

    F: torch.Tensor

    def __len__(self) -> int:
        return len(self.F)

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        return self.F @ (self.F.T @ X)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.F[rows] @ self.F.T

    def sub(self, keep: torch.Tensor) -> "LowRankGram":
        return LowRankGram(self.F[keep])

    def to(self, device: torch.device | str) -> "LowRankGram":
        return LowRankGram(self.F.to(device))


Gram = torch.Tensor | LowRankGram  # a training Gram, dense (n, n) or factored


def gram_sub(K: Gram, keep: torch.Tensor) -> Gram:
    """The Gram of training rows ``keep`` (k,) of K."""
    return K.sub(keep) if isinstance(K, LowRankGram) else K[keep][:, keep]


def weighted_centred(K: Gram, a: torch.Tensor) -> tuple[Gram, torch.Tensor, float]:
    """(Kc symmetric, row means K a / S (n,), total a^T K a / S^2): the Gram of the feature map centred at its
    a-weighted mean (for a factored K = F F^T, Kc = Fc Fc^T with Fc = F - 1 mu^T, mu = a^T F / S)."""
    S = float(a.sum())
    if isinstance(K, LowRankGram):
        mu = a @ K.F / S
        return LowRankGram(K.F - mu), K.F @ mu, float(mu @ mu)
    r = K @ a / S
    t = float(a @ r) / S
    Kc = K - r.unsqueeze(0) - r.unsqueeze(1) + t
    return (Kc + Kc.T) / 2, r, t


def centre_cross(k: torch.Tensor, r: torch.Tensor, a: torch.Tensor, t: float) -> torch.Tensor:
    """kc(x, z_i) (m, n) from k(x, z_i) (m, n): the kernel of the feature map centred at the training set's
    a-weighted mean, with the training rows' r = K a / S and t = a^T K a / S^2 of :func:`weighted_centred`."""
    return k - r - (k @ a / float(a.sum())).unsqueeze(1) + t
