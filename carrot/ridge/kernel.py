"""Kernel ridge head: the dual closed form on a kernel of the (standardised, L2-normalised) embeddings.

With weights a (s = sqrt a, S = sum a), the weighted-centred Gram Kc = (I - 1 a^T / S) K (I - a 1^T / S) (the kernel
of the feature map centred at its a-weighted mean) and M = diag(s) Kc diag(s) = Q diag(m) Q^T, the head is

    f(x) = ybar + kc(x)^T alpha,   alpha = s * (M + lam I)^-1 (s * (Y - ybar)),

the intercept unpenalised (ybar is the a-weighted class mean, the prior). It is linear in the labels,
f(x) = l(x)^T Y with l(x) = a / S + s * (M + lam I)^-1 (s * kc(x)) (the equivalent kernel), and its hat diagonal is
h_ii = a_i / S + sum_k Q_ik^2 m_k / (m_k + lam), so leave-one-out is exact for every lambda from one eigendecomposition
per kernel parameter: f_-i(x_i) = (f_i - h_ii y_i) / (1 - h_ii), and removing a set R of training images changes
f(x) by l_R(x)^T (I - H_RR)^-1 (Y_R - f_R) (block Sherman-Morrison-Woodbury; Hastie, Tibshirani & Friedman,
"Elements of Statistical Learning", 7.10 and 5.8).

Above ``NYSTROEM_ABOVE`` training images (or when the n x n arrays do not fit in half the memory) 'auto' fits the
head on the Nystroem kernel k~(x, y) = phi(x) . phi(y), phi(x) = k(x, C) K_CC^(-1/2) with m training rows C as
landmarks (Williams & Seeger 2001; sklearn's Nystroem): the Gram is then held as its factor Phi (n, m), M has rank
<= m, and every identity above holds exactly for that approximate model with O(n m) memory and O(n m^2) time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from carrot.devices import device_memory, resolve_device
from carrot.errors import CarrotError, check_is_fitted
from carrot.io import atomic_path, write_json
from carrot.ridge.headfile import load_parts, read_meta, settings
from carrot.ridge.loo import DEFAULT_LAMBDAS, LooPath, check_lambdas
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, encode_labels, index_labels

KERNEL_HEAD_FORMAT_VERSION = 2  # 2: + the Nystroem approximation (approx_, landmarks); 1: exact only
NYSTROEM_ABOVE = 8192  # 'auto' approximation: exact dual up to this many training images, Nystroem above it
N_LANDMARKS = 2048  # default landmarks (m) of the Nystroem head
APPROXIMATIONS = ("auto", "exact", "nystroem")
GAMMA_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)  # 'auto' gamma: these times the median heuristic


DUAL_ARRAYS = 9  # n x n float64 arrays alive at a fit's peak: the best gamma's Kc and Q, the next gamma's K, Kc, M
# and its eigenvectors, eigh's workspace (about 2), and the LOO path's product
LOW_RANK_ARRAYS = 8  # n x m float64 arrays of the Nystroem fit's peak: two gammas' Phi, Phi_c, U, Q and the LOO product


def _memory(dev: torch.device) -> int | None:
    return device_memory(dev)


def dual_memory_error(head: "KernelRidgeHead", n: int, approx: str = "exact") -> str | None:
    """Why the kernel head on ``n`` training images (``approx`` 'exact': the n x n dual; 'nystroem': n x m factors)
    does not fit in half of the head's device memory, or None."""
    dev = resolve_device(head.device)
    dev = dev if dev.type != "mps" else torch.device("cpu")
    if approx == "nystroem":
        m = min(n, int(head.n_landmarks))
        need, what = LOW_RANK_ARRAYS * 8 * n * m, f"{LOW_RANK_ARRAYS} n x m (m = {m} landmarks)"
    else:
        need, what = DUAL_ARRAYS * 8 * n * n, f"{DUAL_ARRAYS} n x n"
    have = _memory(dev)
    if have is None or need <= have // 2:
        return None
    return (f"the {'Nystroem' if approx == 'nystroem' else 'exact'} kernel head on n = {n} training images holds "
            f"{what} float64 arrays ({need / 2**30:.1f} GiB), more than half of the {have / 2**30:.1f} GiB of "
            f"{dev.type} memory")


def choose_approx(head: "KernelRidgeHead", n: int) -> str:
    """The approximation a head of setting ``approx`` uses on ``n`` training images: 'auto' is exact up to
    :data:`NYSTROEM_ABOVE` images when the n x n dual fits in half the memory, Nystroem otherwise."""
    if head.approx != "auto":
        return head.approx
    return "nystroem" if n > NYSTROEM_ABOVE or dual_memory_error(head, n) else "exact"


def _sq_dist(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return ((X * X).sum(1, keepdim=True) + (Y * Y).sum(1) - 2 * X @ Y.T).clamp_min_(0.0)


def _rbf(X: torch.Tensor, Y: torch.Tensor, gamma: float, degree: int, coef0: float) -> torch.Tensor:
    return torch.exp(-gamma * _sq_dist(X, Y))


def _laplacian(X: torch.Tensor, Y: torch.Tensor, gamma: float, degree: int, coef0: float) -> torch.Tensor:
    return torch.exp(-gamma * torch.cdist(X, Y, p=1.0))


def _poly(X: torch.Tensor, Y: torch.Tensor, gamma: float, degree: int, coef0: float) -> torch.Tensor:
    return (gamma * (X @ Y.T) + coef0) ** degree


@dataclass(frozen=True)
class Kernel:
    """One kernel: k(X, Y) and the scale its 'auto' gamma grid is built around."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, float, int, float], torch.Tensor]
    formula: str
    median: Callable[[torch.Tensor], float] | None  # 1 / median of the distance the kernel decays with


def _median_inverse(dist: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], float]:
    def scale(Z: torch.Tensor) -> float:
        Zs = Z[torch.randperm(len(Z), generator=torch.Generator().manual_seed(0))[:1000]]
        d = dist(Zs, Zs)
        off = d[~torch.eye(len(Zs), dtype=torch.bool)]
        med = float(off.median()) if off.numel() else 1.0
        return 1.0 / med if med > 0 else 1.0

    return scale


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("rbf", _rbf, "exp(-gamma |x - y|^2)", _median_inverse(_sq_dist)),
    Kernel("laplacian", _laplacian, "exp(-gamma |x - y|_1)", _median_inverse(lambda X, Y: torch.cdist(X, Y, p=1.0))),
    Kernel("poly", _poly, "(gamma x.y + coef0)^degree", None),
)}


def kernel_matrix(kernel: str, X: ArrayLike, Y: ArrayLike | None = None, gamma: float = 1.0, degree: int = 3,
                  coef0: float = 1.0) -> torch.Tensor:
    """The kernel between rows of X (m, D) and Y (n, D) as float64 (m, n); K(X, X) (Y None) is symmetric with the
    kernel's own diagonal by construction.

    Parameters
    ----------
    kernel : one of :data:`KERNELS` ('rbf', 'laplacian', 'poly').
    X : (m, D); Y : (n, D) or None for X itself; gamma > 0; degree >= 1 and coef0 >= 0 (poly only).

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
    K = KERNELS[kernel].fn(X, Y, float(gamma), int(degree), float(coef0))
    if same:
        K = (K + K.T) / 2
        if kernel != "poly":
            K.diagonal().fill_(1.0)
    return K


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


class KernelRidgeHead(ClassifierMixin, BaseEstimator):
    """Multi-class kernel ridge classifier in closed form (dual, float64), with exact representer terms,
    equivalent kernel, leave-one-out and removal.

    Parameters: ``kernel`` one of :data:`KERNELS`; ``gamma`` (> 0) or 'auto': chosen with ``lam`` by exact LOO
    accuracy (ties: lower LOO squared error, then larger lambda) over ``gamma_grid`` (default: 0.25..4 times the
    inverse median distance of the training embeddings; 0.5, 1, 2 for poly), one eigendecomposition per gamma;
    ``lam`` (> 0) or 'auto' over ``lam_grid``; ``degree``, ``coef0`` for poly; ``standardize``: embeddings
    standardised (a-weighted) and L2-normalised before the kernel; ``approx``: 'exact' (the n x n dual),
    'nystroem' (the kernel k~ of ``n_landmarks`` training rows, chosen by ``random_state``, as sklearn's Nystroem;
    the head then is exactly kernel ridge on k~) or 'auto' (exact up to :data:`NYSTROEM_ABOVE` training images
    when it fits in half the memory); ``device`` for the n x n (or n x m) work.
    Fitted: ``classes_``, ``X_fit_`` (n, D) the preprocessed training embeddings, ``dual_coef_`` alpha (n, C),
    ``intercept_`` (C,) (f(x) = intercept_ + k(x)^T alpha), ``prior_`` (C,) = a-weighted ybar (f(x) = prior_ +
    kc(x)^T alpha), ``gamma_``, ``lam_``, ``loo_path_`` (LOO accuracy per (gamma, lambda) when searched),
    ``approx_`` ('exact' or 'nystroem') and, for Nystroem, ``landmarks_`` (m, D) and ``normalization_`` (m, m):
    phi(x) = k(x, landmarks_) normalization_, k(x, y) = phi(x) . phi(y).
    """

    def __init__(self, kernel: str = "rbf", gamma: float | str = "auto", lam: float | str = "auto", degree: int = 3,
                 coef0: float = 1.0, gamma_grid: tuple[float, ...] | None = None, lam_grid: tuple[float, ...] | None = None,
                 standardize: bool = True, approx: str = "auto", n_landmarks: int = N_LANDMARKS, random_state: int = 0,
                 device: str = "cpu") -> None:
        self.kernel = kernel
        self.gamma = gamma
        self.lam = lam
        self.degree = degree
        self.coef0 = coef0
        self.gamma_grid = gamma_grid
        self.lam_grid = lam_grid
        self.standardize = standardize
        self.approx = approx
        self.n_landmarks = n_landmarks
        self.random_state = random_state
        self.device = device

    def _check_settings(self) -> None:
        if self.kernel not in KERNELS:
            raise CarrotError(f"kernel: expected one of {', '.join(KERNELS)}, got {self.kernel!r}")
        for name in ("gamma", "lam"):
            v = getattr(self, name)
            if v != "auto" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0):
                raise CarrotError(f"{name}: expected 'auto' or a finite number > 0, got {v!r}")
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or not 1 <= self.degree <= 10:
            raise CarrotError(f"degree: expected an integer 1..10, got {self.degree!r}")
        if isinstance(self.coef0, bool) or not isinstance(self.coef0, (int, float)) or not np.isfinite(self.coef0) or self.coef0 < 0:
            raise CarrotError(f"coef0: expected a finite number >= 0, got {self.coef0!r}")
        if self.gamma_grid is not None:
            g = np.asarray(self.gamma_grid, dtype=np.float64)
            if g.ndim != 1 or not len(g) or not np.all(np.isfinite(g)) or np.any(g <= 0):
                raise CarrotError(f"gamma_grid: expected a non-empty list of finite numbers > 0, got {self.gamma_grid!r}")
        if self.lam_grid is not None:
            check_lambdas(self.lam_grid)
        if not isinstance(self.standardize, bool):
            raise CarrotError(f"standardize: expected true or false, got {self.standardize!r}")
        if self.approx not in APPROXIMATIONS:
            raise CarrotError(f"approx: expected one of {', '.join(APPROXIMATIONS)}, got {self.approx!r}")
        if isinstance(self.n_landmarks, bool) or not isinstance(self.n_landmarks, int) or self.n_landmarks < 1:
            raise CarrotError(f"n_landmarks: expected a positive integer, got {self.n_landmarks!r}")
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, int) or self.random_state < 0:
            raise CarrotError(f"random_state: expected an integer >= 0, got {self.random_state!r}")

    # preprocessing -------------------------------------------------------------------------------------------
    def _preprocess(self, G: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            return G
        Z = (G - self.scale_mean_) / self.scale_std_
        return Z / Z.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _gram(self, X: torch.Tensor, Y: torch.Tensor | None, gamma: float) -> torch.Tensor:
        """The exact kernel k(X, Y) (the Nystroem map's too, against its landmarks)."""
        return kernel_matrix(self.kernel, X, Y, gamma, self.degree, self.coef0)

    def _phi(self, Z: torch.Tensor) -> torch.Tensor:
        """Nystroem features (m, r) of preprocessed rows Z (m, D): k(Z, landmarks_) normalization_."""
        C = self.landmarks_.to(Z.device)
        return self._gram(Z, C, self.gamma_) @ self.normalization_.to(Z.device)

    def _phi_fit(self) -> torch.Tensor:
        """Nystroem features (n, r) of the training rows, computed once per fitted or loaded head."""
        if getattr(self, "_phi_fit_", None) is None:
            self._phi_fit_ = self._phi(self.X_fit_)
        return self._phi_fit_

    def _kernel(self, Z: torch.Tensor) -> torch.Tensor:
        """k(Z, X_fit_) (m, n) of preprocessed rows Z (m, D) with the fitted gamma (the Nystroem kernel when
        approximated)."""
        if self.approx_ == "nystroem":
            return self._phi(Z) @ self._phi_fit().T
        return self._gram(Z, self.X_fit_, self.gamma_)

    def train_gram(self, Z: torch.Tensor | None = None) -> Gram:
        """The Gram of preprocessed training rows Z (default ``X_fit_``) under the fitted kernel: dense (n, n), or
        its Nystroem factor (:class:`LowRankGram`)."""
        if self.approx_ == "nystroem":
            return LowRankGram(self._phi_fit() if Z is None else self._phi(Z))
        return self._gram(self.X_fit_ if Z is None else Z, None, self.gamma_)

    def _nystroem_map(self, Z: torch.Tensor, a: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(landmarks (m, D), normalization (m, m)) of sklearn's Nystroem on the rows of weight > 0, seeded by
        ``random_state`` (the same landmarks for every gamma)."""
        from sklearn.kernel_approximation import Nystroem

        X = Z.cpu()[a > 0].numpy()
        ny = Nystroem(kernel={"poly": "polynomial"}.get(self.kernel, self.kernel), gamma=gamma, degree=self.degree,
                      coef0=self.coef0, n_components=min(self.n_landmarks, len(X)), random_state=self.random_state).fit(X)
        return (torch.as_tensor(ny.components_, dtype=torch.float64),
                torch.as_tensor(np.ascontiguousarray(ny.normalization_.T), dtype=torch.float64))

    def _gammas(self, Z: torch.Tensor) -> list[float]:
        if self.gamma != "auto":
            return [float(self.gamma)]
        if self.gamma_grid is not None:
            return [float(g) for g in self.gamma_grid]
        k = KERNELS[self.kernel]
        base = k.median(Z) if k.median is not None else 1.0
        return [base * m for m in (GAMMA_MULTIPLIERS if k.median is not None else (0.5, 1.0, 2.0))]

    def fit(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "KernelRidgeHead":
        """Fit in closed form; 'auto' gamma / lam by exact LOO (one eigendecomposition of M per gamma).

        Parameters
        ----------
        G : (n, D) finite embeddings; y : (n,) labels (at least two classes); sample_weight : (n,) >= 0 or None.

        Returns
        -------
        self
        """
        self._check_settings()
        G = as_float64_matrix(G, "G")
        n, d = G.shape
        classes, y_idx = encode_labels(y, n)
        if len(classes) < 2:
            raise CarrotError(f"y: expected at least 2 classes to fit a classifier, got {len(classes)} ({classes.tolist()})")
        a = as_weights(sample_weight, n)
        dev = resolve_device(self.device)
        dev = dev if dev.type != "mps" else torch.device("cpu")
        self.approx_ = choose_approx(self, n)
        too_big = dual_memory_error(self, n, self.approx_)
        if too_big:
            fix = "fewer landmarks (head.landmarks)" if self.approx_ == "nystroem" else "approx nystroem (head.approx)"
            raise CarrotError(f"G: {too_big}; use {fix}, head.kind: ridge, or fewer training images")
        if self.standardize:
            S = float(a.sum())
            self.scale_mean_ = (a @ G) / S
            var = (a @ (G - self.scale_mean_) ** 2) / S
            self.scale_std_ = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
        Z = self._preprocess(G).to(dev)
        a_dev = a.to(dev)
        Y = torch.nn.functional.one_hot(torch.as_tensor(y_idx), len(classes)).to(torch.float64).to(dev)
        lams = check_lambdas(self.lam_grid or DEFAULT_LAMBDAS) if self.lam == "auto" else np.array([float(self.lam)])
        best, path, fmap = None, [], None
        for gamma in self._gammas(Z.cpu()):
            if self.approx_ == "nystroem":
                fmap = self._nystroem_map(Z, a, gamma)
                C, N = (v.to(dev) for v in fmap)
                gram: Gram = LowRankGram(self._gram(Z, C, gamma) @ N)
            else:
                gram = self._gram(Z, None, gamma)
            spec = _Spectrum.of(gram, a_dev)
            loo = spec.loo_path(Y, y_idx, lams)
            lam = loo.best_lambda
            li = int(np.flatnonzero(loo.lambdas == lam)[0])
            path.append({"gamma": gamma, "lambdas": loo.lambdas.tolist(), "loo_accuracy": loo.accuracy.tolist(),
                         "loo_mse": loo.mse.tolist()})
            key = (-loo.accuracy[li], loo.mse[li], -lam)
            if best is None or key < best[0]:
                best = (key, gamma, lam, spec, fmap, gram)
        _, self.gamma_, self.lam_, spec, fmap, gram = best
        self.landmarks_, self.normalization_ = fmap if fmap is not None else (None, None)
        self._phi_fit_ = gram.F.cpu() if isinstance(gram, LowRankGram) else None
        self.loo_path_ = path if (self.lam == "auto" or self.gamma == "auto") else None
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = d
        self.X_fit_ = Z.cpu()
        self.sample_weight_ = None if sample_weight is None else a
        self._set_solution(spec, Y)
        return self

    def _set_solution(self, spec: "_Spectrum", Y: torch.Tensor) -> None:
        self.spectrum_ = spec
        self.prior_ = (spec.a @ Y / spec.S).cpu()
        alpha = spec.s.unsqueeze(1) * spec.solve(spec.s.unsqueeze(1) * (Y - self.prior_.to(Y.device)), self.lam_)
        self.dual_coef_ = alpha.cpu()
        self.row_mean_, self.total_mean_ = spec.r.cpu(), spec.t
        # f(x) = prior + (k(x) - r - k(x) a / S + t) alpha = intercept + k(x) alpha, as sum(alpha) = 0
        self.intercept_ = self.prior_ - (self.row_mean_ @ self.dual_coef_)
        self.train_targets_ = Y.cpu()
        self._state_, self._feature_coef_ = None, None

    @property
    def _a(self) -> torch.Tensor:
        return self.sample_weight_ if self.sample_weight_ is not None else torch.ones(len(self.X_fit_), dtype=torch.float64)

    def _spectrum(self) -> "_Spectrum":
        spec = getattr(self, "spectrum_", None)
        if spec is None:  # after load: one eigendecomposition
            spec = self.spectrum_ = _Spectrum.of(self.train_gram(), self._a)
        return spec

    def _check_input(self, G: ArrayLike) -> torch.Tensor:
        check_is_fitted(self, ("dual_coef_",))
        G = as_float64_matrix(G, "G")
        if G.shape[1] != self.n_features_in_:
            raise CarrotError(f"G: expected {self.n_features_in_} features as in fit, got {G.shape[1]}")
        return self._preprocess(G)

    def centred_kernel(self, G: ArrayLike) -> torch.Tensor:
        """kc(x, z_i) (m, n): the kernel of the feature map centred at the training set's a-weighted mean."""
        return self._kc(self._check_input(G))

    def _kc(self, Z: torch.Tensor) -> torch.Tensor:
        return centre_cross(self._kernel(Z), self.row_mean_, self._a, self.total_mean_)

    def _decision(self, Z: torch.Tensor) -> torch.Tensor:
        if self.approx_ == "nystroem":  # k(x)^T alpha = phi(x) . (Phi^T alpha), without the (m, n) kernel
            if getattr(self, "_feature_coef_", None) is None:
                self._feature_coef_ = self._phi_fit().T @ self.dual_coef_
            return self._phi(Z) @ self._feature_coef_.to(Z.device) + self.intercept_.to(Z.device)
        return self._kernel(Z) @ self.dual_coef_ + self.intercept_

    def decision_function(self, G: ArrayLike) -> np.ndarray:
        """Logits (m, C) float64: intercept_ + k(x)^T alpha."""
        return self._decision(self._check_input(G)).numpy()

    def torch_decision(self, G: torch.Tensor) -> torch.Tensor:
        """Logits (m, C) of float64 embeddings with autograd (the pixel split differentiates through it)."""
        check_is_fitted(self, ("dual_coef_",))
        return self._decision(self._preprocess(G.to(torch.float64)))

    def predict(self, G: ArrayLike) -> np.ndarray:
        """Labels (m,) from ``classes_``."""
        return self.classes_[self.decision_function(G).argmax(1)]

    def representer_terms(self, G: ArrayLike, c: int) -> torch.Tensor:
        """(m, n) alpha_ic kc(x, z_i): f_c(x) = prior_c + the sum over i, exactly (the training images' terms)."""
        return self.centred_kernel(G) * self.dual_coef_[:, c]

    def equivalent_kernel(self, G: ArrayLike) -> torch.Tensor:
        """(m, n) l(x): f(x) = l(x)^T Y for the one-hot targets Y (each training image's label weight)."""
        return self._l(self._kc(self._check_input(G)))

    def _l(self, kc: torch.Tensor) -> torch.Tensor:
        spec = self._spectrum()
        kc = kc.to(spec.s.device)
        return (spec.a / spec.S + spec.s * spec.solve((spec.s * kc).T, self.lam_).T).cpu()

    def training_terms(self, G_test: ArrayLike, classes: ArrayLike | None = None) -> dict[str, torch.Tensor]:
        """The three exact views of :func:`carrot.attribution.training.training_terms` for the kernel head, for one
        class per test image (default: the predicted one).

        Returns
        -------
        dict of tensors (m, n): ``removal`` (f_-i(x)_c - f_c(x), refit-exact), ``equivalent_kernel``
        (l_i(x) (y_ic - ybar_c)) and ``representer`` (alpha_ic kc(x, z_i)), the last two summing to logit - prior;
        plus ``logit`` (m,) and ``prior`` (m,).
        """
        Z = self._check_input(G_test)
        kc = self._kc(Z)
        F = self.prior_ + kc @ self.dual_coef_
        c = F.argmax(1) if classes is None else torch.as_tensor(np.asarray(classes), dtype=torch.long)
        if c.shape != (len(Z),):
            raise CarrotError(f"classes: expected one class per test image ({len(Z)}), got shape {tuple(c.shape)}")
        L = self._l(kc)
        Yc = self.train_targets_ - self.prior_
        e = self._train_state()[2]
        rows = torch.arange(len(Z))
        return {"removal": -L * e.T[c], "equivalent_kernel": L * Yc.T[c], "representer": kc * self.dual_coef_.T[c],
                "logit": F[rows, c], "prior": self.prior_[c]}

    def _train_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f (n, C), h (n,), R (n, C)) of the training fit, R_i = (y_i - f_i) / (1 - h_ii): computed once per fit."""
        if getattr(self, "_state_", None) is None:
            spec = self._spectrum()
            f = (self.prior_.to(spec.s.device) + spec.Kc @ self.dual_coef_.to(spec.s.device)).cpu()
            h = spec.hat(self.lam_).cpu()
            self._state_ = (f, h, (self.train_targets_ - f) / (1 - h).unsqueeze(1))
        return self._state_

    def hat_diag(self) -> torch.Tensor:
        """(n,) h_ii of the training fit (the leverage of each training image)."""
        return self._train_state()[1]

    def train_decision(self) -> torch.Tensor:
        """(n, C) f(z_i) on the training images, from the Gram (no kernel re-evaluation)."""
        return self._train_state()[0]

    def loo_decision(self) -> torch.Tensor:
        """(n, C) exact leave-one-out logits f_-i(z_i) (a refit without image i, for each i)."""
        h = self.hat_diag().unsqueeze(1)
        return (self.train_decision() - h * self.train_targets_) / (1 - h)

    # the training-system surface run summaries use (as carrot.ridge.removal.RidgeSystem) --------------------
    @property
    def a(self) -> torch.Tensor:
        """(n,) the training weights (ones when unweighted)."""
        return self._a

    def loo_logits(self) -> torch.Tensor:
        """:meth:`loo_decision`, under RidgeSystem's name."""
        return self.loo_decision()

    def loo_cross_entropy(self, loo: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Exact LOO cross-entropy of every training label under a temperature-calibrated softmax (as
        :meth:`carrot.ridge.removal.RidgeSystem.loo_cross_entropy`)."""
        from carrot.ridge.removal import calibrated_cross_entropy

        loo = self.loo_decision() if loo is None else loo
        return calibrated_cross_entropy(loo, self.train_targets_.argmax(1), self._a > 0)

    def loo_loss_change(self, G_eval: ArrayLike, y_eval_idx: np.ndarray, chunk: int = 256) -> torch.Tensor:
        """(n,) exact change of the summed squared loss on (G_eval, y_eval) when each training image is removed:
        with f_-i(x) - f(x) = -l_i(x) R_i, R_i = e_i / (1 - h_ii), the sum over x of -2 l_i(x) (E_x . R_i) +
        l_i(x)^2 |R_i|^2, E = F - Y (negative: removing i helps). Streamed over ``chunk`` evaluation rows."""
        from carrot.validation import one_hot

        Ge = as_float64_matrix(G_eval, "G_eval")
        Y = one_hot(np.asarray(y_eval_idx), len(self.classes_))
        R = self._train_state()[2]
        r2 = (R * R).sum(1)
        total = torch.zeros(len(R), dtype=torch.float64)
        for s in range(0, len(Ge), chunk):
            kc = self._kc(self._check_input(Ge[s : s + chunk]))
            Q = self._l(kc)
            E = self.prior_ + kc @ self.dual_coef_ - Y[s : s + chunk]
            total += (-2 * Q * (E @ R.T) + Q * Q * r2).sum(0)
        return total

    def removal_effect(self, G: ArrayLike, rows: Sequence[int] | None = None) -> torch.Tensor:
        """(m, len(rows), C) f(x) - f_-i(x) for removing each training image i alone (exact, equal to a refit)."""
        idx = torch.arange(len(self.X_fit_)) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        L = self.equivalent_kernel(G)[:, idx]
        return L.unsqueeze(2) * self._train_state()[2][idx].unsqueeze(0)

    def remove(self, G: ArrayLike, rows: Sequence[int]) -> torch.Tensor:
        """(m, C) f(x) - f_-R(x) for removing the set R = ``rows`` together: l_R(x)^T (I - H_RR)^-1 e_R (exact)."""
        return self.removal_from(self.equivalent_kernel(G), rows)

    def removal_from(self, L: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """:meth:`remove` from the equivalent kernel L (m, n) of the inputs, computed once for many sets."""
        R = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.long)
        if not len(R) or R.min() < 0 or R.max() >= len(self.X_fit_):
            raise CarrotError(f"rows: expected training indices in 0..{len(self.X_fit_) - 1}, got {list(rows)!r}")
        if float(self._a[R].sum()) >= float(self._a.sum()) * (1 - 1e-12):
            raise CarrotError(f"rows: removing {len(R)} training images leaves none with weight > 0 to fit")
        H_RR = self._hat_rows(R)[:, R]
        e = (self.train_targets_ - self.train_decision())[R]
        try:
            return L[:, R] @ torch.linalg.solve(torch.eye(len(R), dtype=torch.float64) - H_RR, e)
        except torch.linalg.LinAlgError:
            raise CarrotError(f"rows: the fit without these {len(R)} training images is undetermined "
                              "(I - H_RR is singular)") from None

    def refit_fixed(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "KernelRidgeHead":
        """The head fitted on other rows or weights with this head's feature map (its preprocessing, kernel and
        gamma) and lambda held, every class kept as a column: the model RRO and debug's loops step through, so a
        run they write (``--apply``) is exactly the model they scored. One eigendecomposition."""
        check_is_fitted(self, ("dual_coef_",))
        Z = self._check_input(G)
        y_idx = index_labels(self.classes_, np.asarray(y), "y")
        a = as_weights(sample_weight, len(Z))
        ref = self._held(self.standardize, Z, None if sample_weight is None else a)
        if self.standardize:
            ref.scale_mean_, ref.scale_std_ = self.scale_mean_, self.scale_std_
        Y = torch.nn.functional.one_hot(torch.as_tensor(y_idx), len(self.classes_)).to(torch.float64)
        ref._set_solution(_Spectrum.of(ref.train_gram(), a), Y)
        return ref

    def _held(self, standardize: bool, Z: torch.Tensor, a: torch.Tensor | None) -> "KernelRidgeHead":
        """An unsolved head on preprocessed rows Z with weights a and this head's kernel, gamma, lambda and Nystroem
        map held as fitted."""
        ref = KernelRidgeHead(kernel=self.kernel, gamma=self.gamma_, lam=self.lam_, degree=self.degree, coef0=self.coef0,
                              standardize=standardize, approx=self.approx_, n_landmarks=self.n_landmarks,
                              random_state=self.random_state, device=self.device)
        ref.classes_, ref.n_features_in_, ref.gamma_, ref.lam_ = self.classes_, self.n_features_in_, self.gamma_, self.lam_
        ref.approx_, ref.landmarks_, ref.normalization_ = self.approx_, self.landmarks_, self.normalization_
        ref.X_fit_, ref.loo_path_, ref.sample_weight_, ref._phi_fit_ = Z, None, a, None
        return ref

    def refit_without(self, rows: Sequence[int]) -> "KernelRidgeHead":
        """The head refitted from scratch without training images ``rows``: the same kernel, gamma, lambda and
        preprocessing (held as fitted) and every class kept as a column, even one left without images."""
        keep = torch.as_tensor(np.setdiff1d(np.arange(len(self.X_fit_)), np.asarray(list(rows), dtype=np.int64)))
        ref = self._held(False, self.X_fit_[keep], self._a[keep])
        dev = self._spectrum().s.device
        gram = (LowRankGram(self._phi_fit()[keep].to(dev)) if self.approx_ == "nystroem"
                else self._gram(ref.X_fit_.to(dev), None, self.gamma_))
        ref._set_solution(_Spectrum.of(gram, ref.sample_weight_.to(dev)), self.train_targets_[keep].to(dev))
        return ref

    def _hat_rows(self, R: torch.Tensor) -> torch.Tensor:
        """(len(R), n) rows R of the (weighted, non-symmetric) hat matrix: H[r, j] = l_j(z_r)."""
        return self._l(self._spectrum().Kc[R].cpu())

    def _hat_cols(self, R: torch.Tensor) -> torch.Tensor:
        """(n, len(R)) columns R of the hat matrix: H[i, j] = a_j / S + s_j ((M + lam)^-1 (s * Kc[:, i]))_j."""
        spec = self._spectrum()
        Rd = R.to(spec.s.device)
        Minv_R = spec.inverse_columns(Rd, self.lam_)
        cols = spec.a[Rd] / spec.S + spec.Kc @ (spec.s.unsqueeze(1) * Minv_R) * spec.s[Rd]
        return cols.cpu()

    def certificate(self, g_x: ArrayLike, limit: int = 50):
        """The fewest training images found (greedy on exact effects) whose removal changes the predicted class of
        one image, as :func:`carrot.attribution.training.certificate` for the ridge head: each step removes the
        image with the largest exact drop of the margin f_c - f_k in the fit without the images already removed
        (the downdated smoother: l'(x) = l(x) + l_S(x)^T (I - H_SS)^-1 H_S., h'_ii = h_ii + H_iS (I - H_SS)^-1 H_Si),
        and the set is checked by one refit (embedding preprocessing, gamma and lambda held as fitted).

        Returns
        -------
        :class:`carrot.attribution.training.Certificate`.
        """
        import time

        from carrot.attribution.training import class_margin, next_removal, runner_up, verified

        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise CarrotError(f"limit: expected a positive integer, got {limit!r}")
        t0 = time.perf_counter()
        x = np.asarray(g_x, dtype=np.float64).reshape(1, -1)
        kc = self.centred_kernel(x)
        l_x = self._l(kc)[0]  # (n,)
        f0 = (self.prior_ + kc @ self.dual_coef_)[0]
        c = int(f0.argmax())
        F, h, _ = self._train_state()
        Y, a = self.train_targets_, self._a
        E = Y - F
        active = a > 0
        limit = min(limit, int(active.sum()) - 1)
        S: list[int] = []
        rows = torch.empty(0, len(a), dtype=torch.float64)  # H[S, :]
        cols = torch.empty(len(a), 0, dtype=torch.float64)  # H[:, S]
        path: list[float] = []
        f = f0
        B, idx = None, torch.as_tensor(S, dtype=torch.long)  # LU factors of I - H_SS and S, set at each step's end
        for _ in range(limit):
            if S:  # x B^-1 and B^-1 X by LU solves with the last step's factors
                lx = l_x + _right_solve(B, l_x[idx].unsqueeze(0))[0] @ rows
                hS = h + (_right_solve(B, cols) * rows.T).sum(1)
                ES = Y - (F - cols @ torch.linalg.lu_solve(*B, E[idx]))
            else:
                lx, hS, ES = l_x, h, E
            k = runner_up(f, c)
            denom = 1 - hS
            i = next_removal(lx * (ES[:, c] - ES[:, k]) / denom.clamp_min(1e-12), denom, active, S)
            if i is None:
                break
            S.append(i)
            ii = torch.as_tensor([i])
            rows, cols = torch.cat([rows, self._hat_rows(ii)]), torch.cat([cols, self._hat_cols(ii)], 1)
            idx = torch.as_tensor(S)
            B = torch.linalg.lu_factor(torch.eye(len(S), dtype=torch.float64) - rows[:, idx])
            f = f0 - (_right_solve(B, l_x[idx].unsqueeze(0))[0] @ E[idx])
            path.append(class_margin(f, c))
            if int(f.argmax()) != c:
                break
        # the refit keeps every class as a column: one left without images scores by its prior 0
        return verified(S, path, c, f, lambda: torch.as_tensor(
            self.refit_without(S).decision_function(self._preprocess(torch.as_tensor(x))))[0], limit, t0)

    # persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors) and ``path``.json (settings, shapes) atomically."""
        from safetensors.torch import save_file

        check_is_fitted(self, ("dual_coef_",))
        t = {"X_fit": self.X_fit_, "dual_coef": self.dual_coef_, "intercept": self.intercept_, "prior": self.prior_,
             "row_mean": self.row_mean_, "train_targets": self.train_targets_}
        if self.standardize:
            t.update(scale_mean=self.scale_mean_, scale_std=self.scale_std_)
        if self.sample_weight_ is not None:
            t["sample_weight"] = self.sample_weight_
        if self.approx_ == "nystroem":
            t.update(landmarks=self.landmarks_, normalization=self.normalization_)
        with atomic_path(Path(path)) as tmp:
            save_file({k: v.contiguous() for k, v in t.items()}, str(tmp))
        params = self.get_params()
        for k in ("gamma_grid", "lam_grid"):
            params[k] = None if params[k] is None else [float(v) for v in params[k]]
        write_json(str(path) + ".json", {
            "format": "carrot.KernelRidgeHead", "version": KERNEL_HEAD_FORMAT_VERSION, "params": params,
            "gamma_": self.gamma_, "lam_": self.lam_, "total_mean_": self.total_mean_, "loo_path_": self.loo_path_,
            "approx_": self.approx_, "classes": self.classes_.tolist(), "n_features": self.n_features_in_,
            "n_train": int(len(self.X_fit_))})

    @classmethod
    def load(cls, path: str | Path) -> "KernelRidgeHead":
        """Read a head written by :meth:`save`, checking tensors against the metadata."""
        path = Path(path)
        meta, version = read_meta(path, cls, KERNEL_HEAD_FORMAT_VERSION)
        params = settings(meta.get("params"), cls, path)
        if version == 1:  # written before the approximation: the exact dual, and its clones stay exact
            params.setdefault("approx", "exact")
        head = cls(**params)
        head._check_settings()
        return load_parts(path, lambda t: cls._from_parts(head, meta, t, path))

    @classmethod
    def _from_parts(cls, head: "KernelRidgeHead", meta: dict, t: dict, path: Path) -> "KernelRidgeHead":
        head.classes_ = np.asarray(meta["classes"])
        head.n_features_in_, n, c = int(meta["n_features"]), int(meta["n_train"]), len(head.classes_)
        head.gamma_, head.lam_, head.total_mean_ = float(meta["gamma_"]), float(meta["lam_"]), float(meta["total_mean_"])
        head.loo_path_ = meta.get("loo_path_")
        head.approx_ = meta.get("approx_", "exact")  # version 1: the exact dual only
        if head.approx_ not in ("exact", "nystroem"):
            raise CarrotError(f"head file '{path}': approx_ must be exact or nystroem, got {head.approx_!r}; refit the run")
        head.landmarks_, head.normalization_ = (t["landmarks"], t["normalization"]) if head.approx_ == "nystroem" else (None, None)
        head.X_fit_, head.dual_coef_, head.intercept_ = t["X_fit"], t["dual_coef"], t["intercept"]
        head.prior_, head.row_mean_, head.train_targets_ = t["prior"], t["row_mean"], t["train_targets"]
        head.sample_weight_ = t.get("sample_weight")
        if head.standardize:
            head.scale_mean_, head.scale_std_ = t["scale_mean"], t["scale_std"]
        d = head.n_features_in_
        shapes = {"X_fit": (head.X_fit_, (n, d)), "dual_coef": (head.dual_coef_, (n, c)),
                  "train_targets": (head.train_targets_, (n, c)), "intercept": (head.intercept_, (c,)),
                  "prior": (head.prior_, (c,)), "row_mean": (head.row_mean_, (n,))}
        if head.sample_weight_ is not None:
            shapes["sample_weight"] = (head.sample_weight_, (n,))
        if head.standardize:
            shapes.update(scale_mean=(head.scale_mean_, (d,)), scale_std=(head.scale_std_, (d,)))
        if head.approx_ == "nystroem":
            m = len(head.landmarks_)
            if not 1 <= m <= n:
                raise CarrotError(f"head file '{path}': expected 1..{n} landmarks (n_train), got {m}; refit the run")
            shapes.update(landmarks=(head.landmarks_, (m, d)), normalization=(head.normalization_, (m, m)))
        for name, (arr, shape) in shapes.items():
            if arr.shape != shape or arr.dtype != torch.float64 or not torch.isfinite(arr).all():
                raise CarrotError(f"head file '{path}': {name} is not a finite float64 array of shape {shape}; refit the run")
        if (head.sample_weight_ is not None and (head.sample_weight_ < 0).any()) or not (
                head.gamma_ > 0 and head.lam_ > 0 and np.isfinite([head.gamma_, head.lam_, head.total_mean_]).all()):
            raise CarrotError(f"head file '{path}': gamma_, lam_ or the weights are out of range; refit the run")
        head.spectrum_, head._state_, head._phi_fit_, head._feature_coef_ = None, None, None, None
        return head


def _right_solve(B: tuple[torch.Tensor, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """X B^-1 (k, s) for X (k, s) and B's LU factors (torch.linalg.lu_factor): (B^-T X^T)^T."""
    return torch.linalg.lu_solve(*B, X.T, adjoint=True).T


class WeightedDual:
    """The kernel ridge solution under training weights a on a fixed feature map (the head's preprocessing, kernel,
    gamma and lambda held): what RRO steps through, one Cholesky of diag(s) Kc diag(s) + lam I per set of weights
    (for a factored Gram, U = diag(s) Fc: (U U^T + lam I)^-1 = (I - U (U^T U + lam I)^-1 U^T) / lam, r x r).

    With x = [1, phi(z) - mu_a] the primal rows and M = X^T A X + lam diag(0, I), x_i^T M^-1 x_v
    = 1 / S + (kc(i, v) - kc_i^T diag(s) (diag(s) Kc diag(s) + lam I)^-1 diag(s) kc_v) / lam (the intercept block
    by centring at the a-weighted mean, the rest by the push-through identity), so the implicit gradient of a loss
    of the logits F_v, dL/da_i = sum_c x_i^T M^-1 (X_v^T dL/dF)_c r_ic, needs no feature map."""

    def __init__(self, head: "KernelRidgeHead", Z: torch.Tensor, Y: torch.Tensor, a: torch.Tensor,
                 K: Gram | None = None) -> None:
        check_is_fitted(head, ("dual_coef_",))
        self.head, self.Z, self.Y, self.a = head, Z, Y, a
        self.K = head.train_gram(Z) if K is None else K
        self.Kc, self.r, self.t = weighted_centred(self.K, a)
        self.S, self.s, self.lam = float(a.sum()), a.sqrt(), float(head.lam_)
        if isinstance(self.Kc, LowRankGram):
            self.U = self.s.unsqueeze(1) * self.Kc.F
            P = self.U.T @ self.U  # (r, r)
        else:
            P = self.s.unsqueeze(1) * self.Kc * self.s.unsqueeze(0)  # (n, n)
        M = (P + P.T) / 2
        self.chol = torch.linalg.cholesky(M + self.lam * torch.eye(len(M), dtype=M.dtype, device=M.device))
        self.prior = a @ Y / self.S
        self.alpha = self.s.unsqueeze(1) * self._solve(self.s.unsqueeze(1) * (Y - self.prior))
        self.residuals = Y - (self.prior + self.Kc @ self.alpha)  # r_i = y_i - f(x_i), (n, C)

    def _solve(self, V: torch.Tensor) -> torch.Tensor:
        """(diag(s) Kc diag(s) + lam I)^-1 V."""
        if isinstance(self.Kc, LowRankGram):
            return (V - self.U @ torch.cholesky_solve(self.U.T @ V, self.chol)) / self.lam
        return torch.cholesky_solve(V, self.chol)

    def centred(self, G: ArrayLike) -> torch.Tensor:
        """kc(x_v, z_i) (m, n) of embeddings G (m, D) under these weights."""
        Zq = self.head._check_input(G)
        k = (self.head._phi(Zq) @ self.K.F.T if isinstance(self.K, LowRankGram)
             else self.head._gram(Zq, self.Z, self.head.gamma_))
        return centre_cross(k, self.r, self.a, self.t)

    def decision(self, G: ArrayLike) -> torch.Tensor:
        """Logits (m, C) of the weighted solution."""
        return self.prior + self.centred(G) @ self.alpha

    def weight_gradient(self, G_val: ArrayLike, dF: torch.Tensor) -> torch.Tensor:
        """dL/da (n,) for a loss whose gradient in the logits of G_val (m, D) is dF (m, C)."""
        B = self.centred(G_val).T @ dF  # (n, C): sum_v kc(i, v) dF_v
        xMx = (B - self.Kc @ (self.s.unsqueeze(1) * self._solve(self.s.unsqueeze(1) * B))) / self.lam + dF.sum(0) / self.S
        return (xMx * self.residuals).sum(1)


class DualCounterfactuals:
    """The kernel head's exact counterfactual refits in the interface the attribution audits use (the ridge head's
    is :class:`~carrot.ridge.removal.RidgeSystem`): without a set (block Woodbury in the dual), only a set (the dual
    solved again with the other weights 0), without each image alone; the feature map is the head's, held fixed."""

    def __init__(self, head: "KernelRidgeHead") -> None:
        check_is_fitted(head, ("dual_coef_",))
        self.head, self.a, self.G = head, head._a, head.X_fit_
        self._K: Gram | None = None

    def decision(self, G: ArrayLike) -> torch.Tensor:
        """Logits (m, C)."""
        return torch.as_tensor(self.head.decision_function(G))

    def decision_without(self, G: ArrayLike, rows: Sequence[int]) -> torch.Tensor:
        """Logits (m, C) of the head refitted without training images ``rows``."""
        return self.decision(G) - self.head.remove(G, rows)

    def decision_only(self, G: ArrayLike, rows: Sequence[int]) -> torch.Tensor:
        """Logits (m, C) of the head refitted on training images ``rows`` only (rows of weight 0 drop out of the
        dual exactly, so the solve is k x k for the k kept images)."""
        if self._K is None:
            self._K = self.head.train_gram()
        keep = torch.as_tensor(np.unique(np.asarray(rows, dtype=np.int64)))
        keep = keep[self.a[keep] > 0]
        if not len(keep):
            raise CarrotError(f"rows: expected training images with weight > 0 to refit on, got {list(rows)!r}")
        return WeightedDual(self.head, self.G[keep], self.head.train_targets_[keep], self.a[keep],
                            gram_sub(self._K, keep)).decision(G)

    def loo_effect(self, G: ArrayLike) -> torch.Tensor:
        """(m, n, C) f_-i(x) - f(x) for removing each training image alone."""
        return -self.head.removal_effect(G)


@dataclass
class _Spectrum:
    """M = diag(s) Kc diag(s) = Q diag(m) Q^T for one kernel parameter: every lambda's solve, hat and LOO. For a
    factored Gram, U = diag(s) Fc (n, r) = Q diag(sqrt m) V^T (thin SVD), Q (n, r) spanning the range of M; M is 0
    on the rest."""

    Kc: Gram  # weighted-centred Gram, (n, n) or factored
    r: torch.Tensor  # (n,) K a / S
    t: float  # a^T K a / S^2
    a: torch.Tensor
    s: torch.Tensor
    S: float
    m: torch.Tensor  # (k,) eigenvalues of M, clamped >= 0 (M is PSD); k = n, or the rank of a factored M
    Q: torch.Tensor  # (n, k)
    low_rank: bool = False

    @classmethod
    def of(cls, K: Gram, a: torch.Tensor) -> "_Spectrum":
        Kc, r, t = weighted_centred(K, a)
        s = a.sqrt()
        if isinstance(Kc, LowRankGram):  # thin SVD, nothing truncated: solve, hat and LOO see the same M
            Q, sv, _ = torch.linalg.svd(s.unsqueeze(1) * Kc.F, full_matrices=False)
            return cls(Kc, r, t, a, s, float(a.sum()), sv * sv, Q, low_rank=True)
        M = s.unsqueeze(1) * Kc * s.unsqueeze(0)
        m, Q = torch.linalg.eigh((M + M.T) / 2)
        return cls(Kc, r, t, a, s, float(a.sum()), m.clamp_min(0.0), Q)

    def solve(self, V: torch.Tensor, lam: float) -> torch.Tensor:
        """(M + lam I)^-1 V (the null space of a low-rank M scaled by 1 / lam)."""
        QtV = self.Q.T @ V
        out = self.Q @ (QtV / (self.m + lam).unsqueeze(1))
        return out + (V - self.Q @ QtV) / lam if self.low_rank else out

    def inverse_columns(self, R: torch.Tensor, lam: float) -> torch.Tensor:
        """Columns R (k,) of (M + lam I)^-1, (n, k), from rows R of Q (and the 1 / lam of a low-rank M's null space)."""
        QR = self.Q[R].T
        out = self.Q @ (QR / (self.m + lam).unsqueeze(1))
        if self.low_rank:
            out = out - self.Q @ QR / lam
            out[R, torch.arange(len(R), device=R.device)] += 1 / lam
        return out

    def hat(self, lam: float) -> torch.Tensor:
        return self.a / self.S + torch.einsum("ik,ik,k->i", self.Q, self.Q, self.m / (self.m + lam))

    def loo_path(self, Y: torch.Tensor, y_idx: np.ndarray, lams: np.ndarray) -> LooPath:
        """Exact LOO accuracy and mean squared error for every lambda (the criterion of the linear head's path)."""
        ybar = self.a @ Y / self.S
        QtV = self.Q.T @ (self.s.unsqueeze(1) * (Y - ybar))
        # f = ybar + Kc diag(s) (M + lam)^-1 diag(s) Yc; Kc diag(s) is 0 on the null space of M
        KcSQ = self.Kc @ (self.s.unsqueeze(1) * self.Q)
        QQ = self.Q * self.Q
        y_t = torch.as_tensor(y_idx, device=Y.device)
        acc, mse = [], []
        for lam in lams:
            f = ybar + KcSQ @ (QtV / (self.m + lam).unsqueeze(1))
            h = (self.a / self.S + QQ @ (self.m / (self.m + lam))).unsqueeze(1)
            f_loo = (f - h * Y) / (1 - h)
            acc.append(float((f_loo.argmax(1) == y_t).double().mean()))
            mse.append(float(((f_loo - Y) ** 2).sum(1).mean()))
        return LooPath(lams, None, None, np.array(acc), np.array(mse))
