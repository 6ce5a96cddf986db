"""Kernel ridge head: the dual closed form on a kernel of the (standardised, L2-normalised) embeddings.

    f(x) = ybar + kc(x)^T alpha,   alpha = s * (M + lam I)^-1 (s * (Y - ybar)),   M = diag(s) Kc diag(s),

with weights a = s^2, Kc the weighted-centred Gram (:mod:`carrot.ridge.gram`) and the intercept unpenalised; gamma and
lambda chosen by exact leave-one-out (:func:`carrot.ridge.dual.loo_path`: one eigendecomposition per gamma for a grid
of lambdas, one Cholesky per lambda for a few). Its
exact training system (LOO, removal, reweighting, the certificate) is :class:`carrot.ridge.dual.DualSystem`
(``head.system()``).

Above ``NYSTROEM_ABOVE`` training images (or when the n x n arrays do not fit in half the memory) 'auto' fits the
head on the Nystroem kernel k~(x, y) = phi(x) . phi(y), phi(x) = k(x, C) K_CC^(-1/2) with m training rows C as
landmarks (Williams & Seeger 2001; sklearn's Nystroem): the Gram is then held as its factor Phi (n, m), M has rank
<= m, and every identity holds exactly for that approximate model with O(n m) memory and O(n m^2) time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone

from carrot.devices import device_memory, resolve_device
from carrot.errors import CarrotError, check_is_fitted
from carrot.io import atomic_path, write_json
from carrot.ridge.dual import CentredGram, CholeskySolve, DualSystem, Spectrum, loo_path
from carrot.ridge.gram import KERNELS, Gram, LowRankGram, gram_over, kernel_matrix
from carrot.ridge.headfile import load_parts, read_meta, settings
from carrot.ridge.heads import register_head
from carrot.ridge.loo import DEFAULT_LAMBDAS, check_lambdas
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, encode_labels, index_labels

KERNEL_HEAD_FORMAT_VERSION = 2  # 2: + the Nystroem approximation (approx_, landmarks); 1: exact only
NYSTROEM_ABOVE = 8192  # 'auto' approximation: exact dual up to this many training images, Nystroem above it
N_LANDMARKS = 2048  # default landmarks (m) of the Nystroem head
APPROXIMATIONS = ("auto", "exact", "nystroem")
GAMMA_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)  # 'auto' gamma: these times the median heuristic


DUAL_ARRAYS = 10  # n x n float64 arrays alive at a fit's peak: the shared distances, the best gamma's Kc and Q, the
# next gamma's K, Kc, M and its eigenvectors, eigh's workspace (about 2), and the LOO path's product
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


@register_head("kernel", {"training_terms", "loo", "woodbury", "certificate", "reweight", "weight_update",
                          "attribution_audits"},
               "kernel ridge (dual): exact training-image terms, LOO and removal; no additive region split")
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

    @classmethod
    def from_config(cls, config: Any) -> "KernelRidgeHead":
        """The unfitted head of a run configuration (``head.*`` keys, the run's seed and device)."""
        h = config.head
        return cls(kernel=h.kernel, gamma=h.gamma, lam=h.lam, approx=h.approx, n_landmarks=h.landmarks,
                   random_state=config.seed, device=config.device)

    def search_flops(self, n: int, C: int) -> float:
        """About the floating-point operations of this head's exact (gamma, lambda) search on n images of C classes:
        per gamma one eigendecomposition (~10 n^3) and per lambda the LOO logits (2 n^2 C); n m^2 for Nystroem."""
        gammas = len(self.gamma_grid or GAMMA_MULTIPLIERS) if self.gamma == "auto" else 1
        lams = len(self.lam_grid or DEFAULT_LAMBDAS) if self.lam == "auto" else 1
        r = n if choose_approx(self, n) == "exact" else min(n, int(self.n_landmarks))
        return float(gammas * (10 * n * r * r + 2 * lams * n * r * C))

    def narrow_search(self, fitted: "KernelRidgeHead", growth: float) -> tuple["KernelRidgeHead", str]:
        """This head with its search narrowed to what ``fitted`` (the same head on a subsample ``growth`` times
        smaller) chose: its gamma, and three lambdas from its lambda to that lambda times ``growth`` (the regulariser
        of a sum of squared errors over ``growth`` times more images), among which exact LOO on the whole chooses;
        and a line saying so."""
        lams = tuple(float(fitted.lam_ * f) for f in (1.0, growth ** 0.5, growth))
        narrowed = clone(self).set_params(gamma="auto", gamma_grid=(float(fitted.gamma_),), lam="auto", lam_grid=lams)
        return narrowed, (f"gamma {fitted.gamma_:.4g} and lambda among {', '.join(f'{v:.3g}' for v in lams)} (one "
                          "Cholesky each)")

    def unfit_reason(self, n: int, config: Any) -> str | None:
        """Why head.kind 'auto' cannot fit this head of ``config`` on ``n`` training images: no intercept asked for,
        or not even the Nystroem factor fits in half the memory."""
        if not config.head.fit_intercept:
            return "head.fit_intercept is false, and the kernel head always fits an unpenalised intercept"
        return dual_memory_error(self, n, choose_approx(self, n))

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

    # preprocessing and the kernel ------------------------------------------------------------------
    def preprocess(self, G: ArrayLike) -> torch.Tensor:
        """Embeddings G (m, D), checked, as the kernel sees them (standardised and L2-normalised)."""
        check_is_fitted(self, ("dual_coef_",))
        G = as_float64_matrix(G, "G")
        if G.shape[1] != self.n_features_in_:
            raise CarrotError(f"G: expected {self.n_features_in_} features as in fit, got {G.shape[1]}")
        return self._standardised(G)

    def _standardised(self, G: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            return G
        Z = (G - self.scale_mean_) / self.scale_std_
        return Z / Z.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def gram(self, X: torch.Tensor, Y: torch.Tensor | None, gamma: float | None = None) -> torch.Tensor:
        """The exact kernel k(X, Y) of preprocessed rows (Y None: X itself) at ``gamma`` (default the fitted one)."""
        return kernel_matrix(self.kernel, X, Y, self.gamma_ if gamma is None else gamma, self.degree, self.coef0,
                             self._sq_norms(Y))

    def _sq_norms(self, Y: torch.Tensor | None) -> torch.Tensor | None:
        """The squared row norms of the head's own rows (training rows, landmarks), kept once per tensor: a pixel map
        asks for the kernel of a few rows against them hundreds of times. None for any other Y."""
        if Y is None or (Y is not getattr(self, "X_fit_", None) and Y is not getattr(self, "landmarks_", None)):
            return None
        kept = getattr(self, "_sq_norms_", {})
        if kept.get("of") is not Y:
            kept = self._sq_norms_ = {"of": Y, "sq": (Y * Y).sum(1)}
        return kept["sq"]

    def phi(self, Z: torch.Tensor) -> torch.Tensor:
        """Nystroem features (m, r) of preprocessed rows Z (m, D): k(Z, landmarks_) normalization_."""
        return self.gram(Z, self.landmarks_.to(Z.device)) @ self.normalization_.to(Z.device)

    def _train_features(self) -> torch.Tensor | None:
        """phi of the training rows (n, r) for a Nystroem head (computed once per fitted or loaded head), else None."""
        if self.approx_ != "nystroem":
            return None
        if getattr(self, "_phi_fit_", None) is None:
            self._phi_fit_ = self.phi(self.X_fit_)
        return self._phi_fit_

    def train_gram(self, Z: torch.Tensor | None = None) -> Gram:
        """The Gram of preprocessed training rows Z (default ``X_fit_``) under the fitted kernel: dense (n, n), or
        its Nystroem factor (:class:`~carrot.ridge.gram.LowRankGram`)."""
        if self.approx_ == "nystroem":
            return LowRankGram(self._train_features() if Z is None else self.phi(Z))
        return self.gram(self.X_fit_ if Z is None else Z, None)

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

    # fitting ----------------------------------------------------------------------------------------------
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
        Z = self._standardised(G).to(dev)
        Y = torch.nn.functional.one_hot(torch.as_tensor(y_idx), len(classes)).to(torch.float64).to(dev)
        gamma, spec, fmap, path = self._search(Z, a, Y, y_idx)
        self.gamma_ = gamma
        self.landmarks_, self.normalization_ = fmap if fmap is not None else (None, None)
        self.loo_path_ = path if (self.lam == "auto" or self.gamma == "auto") else None
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = d
        self.X_fit_ = Z.cpu()
        self.sample_weight_ = None if sample_weight is None else a
        self._set_solution(spec, Y)
        return self

    def _search(self, Z: torch.Tensor, a: torch.Tensor, Y: torch.Tensor, y_idx: np.ndarray):
        """(gamma, spectrum, Nystroem map or None, LOO path) of the best (gamma, lambda) by exact LOO accuracy (ties:
        lower LOO squared error, then larger lambda); sets ``lam_`` and keeps the best gamma's training features."""
        from carrot.progress import bar

        lams = check_lambdas(self.lam_grid or DEFAULT_LAMBDAS) if self.lam == "auto" else np.array([float(self.lam)])
        gammas = self._gammas(Z.cpu())
        best, path, fmap = None, [], None
        steps = bar(total=len(gammas) * (1 + len(lams)), desc="kernel head", unit="step")
        grams = gram_over(self.kernel, Z, gammas, self.degree, self.coef0) if self.approx_ != "nystroem" else None
        for g, gamma in enumerate(gammas):
            steps.set_description(f"kernel head: gamma {g + 1}/{len(gammas)}, factorising")
            if self.approx_ == "nystroem":
                fmap = self._nystroem_map(Z, a, gamma)
                landmarks, normalization = (v.to(Z.device) for v in fmap)
                gram: Gram = LowRankGram(self.gram(Z, landmarks, gamma) @ normalization)
            else:
                gram = next(grams)  # self.gram(Z, None, gamma), the distances shared across the gammas
            steps.update(1)
            steps.set_description(f"kernel head: gamma {g + 1}/{len(gammas)}, lambdas")
            loo, spec = loo_path(CentredGram.of(gram, a.to(Z.device)), Y, y_idx, lams, on_lambda=lambda li, acc: (
                steps.update(1), steps.set_postfix(gamma=f"{gamma:.3g}", lam=f"{lams[li]:.3g}", loo=f"{acc:.4f}",
                                                   best=f"{-best[0][0]:.4f}" if best else "-")))
            lam = loo.best_lambda
            li = int(np.flatnonzero(loo.lambdas == lam)[0])
            path.append({"gamma": gamma, "lambdas": loo.lambdas.tolist(), "loo_accuracy": loo.accuracy.tolist(),
                         "loo_mse": loo.mse.tolist()})
            key = (-loo.accuracy[li], loo.mse[li], -lam)
            if best is None or key < best[0]:
                best = (key, gamma, lam, spec, fmap, gram)
        steps.close()
        _, gamma, self.lam_, spec, fmap, gram = best
        self._phi_fit_ = gram.F.cpu() if isinstance(gram, LowRankGram) else None
        return gamma, spec, fmap, path

    def _set_solution(self, spec: "Spectrum | CholeskySolve", Y: torch.Tensor) -> None:
        cg = spec.cg
        self.spectrum_ = spec
        self.prior_ = (cg.a @ Y / cg.S).cpu()
        alpha = cg.s.unsqueeze(1) * spec.solve(cg.s.unsqueeze(1) * (Y - self.prior_.to(Y.device)), self.lam_)
        self.dual_coef_ = alpha.cpu().contiguous()  # as a loaded head holds it: the same rounding in every product
        self.row_mean_, self.total_mean_ = cg.r.cpu(), cg.t
        # f(x) = prior + (k(x) - r - k(x) a / S + t) alpha = intercept + k(x) alpha, as sum(alpha) = 0
        self.intercept_ = self.prior_ - (self.row_mean_ @ self.dual_coef_)
        self.train_targets_ = Y.cpu()
        self._system_, self._feature_coef_ = None, None

    @property
    def _a(self) -> torch.Tensor:
        return self.sample_weight_ if self.sample_weight_ is not None else torch.ones(len(self.X_fit_), dtype=torch.float64)

    def system(self, G: ArrayLike | None = None, y: ArrayLike | None = None,
               sample_weight: ArrayLike | None = None) -> DualSystem:
        """The head's exact training system (:class:`~carrot.ridge.dual.DualSystem`), built once. The head keeps its
        training rows, so ``G`` (n, D), ``y`` (n,) and ``sample_weight`` (n,), when given, are only checked against
        the ones it was fitted on (as ``RidgeHead.system``, which needs them)."""
        check_is_fitted(self, ("dual_coef_",))
        n = len(self.X_fit_)
        if G is not None and len(G) != n:
            raise CarrotError(f"G: expected the {n} training rows the head was fitted on, got {len(G)}")
        if y is not None and not np.array_equal(index_labels(self.classes_, y), self.train_targets_.argmax(1).numpy()):
            raise CarrotError("y: differs from the labels the head was fitted with")
        if sample_weight is not None and not torch.equal(as_weights(sample_weight, n), self._a):
            raise CarrotError("sample_weight: differs from the weights the head was fitted with (head.sample_weight_)")
        if getattr(self, "_system_", None) is None:
            spec = getattr(self, "spectrum_", None)
            if spec is None:  # after load: one Cholesky at the head's lambda
                dev = resolve_device(self.device)
                dev = dev if dev.type != "mps" else torch.device("cpu")
                spec = self.spectrum_ = CholeskySolve(CentredGram.of(self.train_gram().to(dev), self._a.to(dev)),
                                                      self.lam_)
            self._system_ = DualSystem(self, self.X_fit_, self.train_targets_, spec, self.lam_, self._train_features(),
                                       self.dual_coef_)
        return self._system_

    def refit(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "KernelRidgeHead":
        """The head fitted on other rows or weights with this head's feature map (its preprocessing, kernel, gamma and
        Nystroem landmarks) and lambda held, every class kept as a column: the model RRO and debug's loops step
        through, so a run they write (``--apply``) is exactly the model they scored. One Cholesky."""
        check_is_fitted(self, ("dual_coef_",))
        Z = self.preprocess(G)
        y_idx = index_labels(self.classes_, np.asarray(y), "y")
        a = as_weights(sample_weight, len(Z))
        ref = KernelRidgeHead(**{**self.get_params(), "gamma": self.gamma_, "lam": self.lam_, "approx": self.approx_})
        ref.classes_, ref.n_features_in_, ref.gamma_, ref.lam_ = self.classes_, self.n_features_in_, self.gamma_, self.lam_
        ref.approx_, ref.landmarks_, ref.normalization_ = self.approx_, self.landmarks_, self.normalization_
        if self.standardize:
            ref.scale_mean_, ref.scale_std_ = self.scale_mean_, self.scale_std_
        ref.X_fit_, ref.loo_path_, ref.sample_weight_, ref._phi_fit_ = Z, None, None if sample_weight is None else a, None
        Y = torch.nn.functional.one_hot(torch.as_tensor(y_idx), len(self.classes_)).to(torch.float64)
        ref._set_solution(CholeskySolve(CentredGram.of(ref.train_gram(), a), self.lam_), Y)
        return ref

    # predicting -------------------------------------------------------------------------------------------
    def _decision(self, Z: torch.Tensor) -> torch.Tensor:
        if self.approx_ == "nystroem":  # k(x)^T alpha = phi(x) . (Phi^T alpha), without the (m, n) kernel
            if getattr(self, "_feature_coef_", None) is None:
                self._feature_coef_ = self._train_features().T @ self.dual_coef_
            return self.phi(Z) @ self._feature_coef_.to(Z.device) + self.intercept_.to(Z.device)
        return self.gram(Z, self.X_fit_) @ self.dual_coef_ + self.intercept_

    def decision_function(self, G: ArrayLike) -> np.ndarray:
        """Logits (m, C) float64: intercept_ + k(x)^T alpha."""
        return self._decision(self.preprocess(G)).numpy()

    def torch_decision(self, G: torch.Tensor) -> torch.Tensor:
        """Logits (m, C) of float64 embeddings with autograd (the pixel split differentiates through it)."""
        check_is_fitted(self, ("dual_coef_",))
        return self._decision(self._standardised(G.to(torch.float64)))

    def predict(self, G: ArrayLike) -> np.ndarray:
        """Labels (m,) from ``classes_``."""
        return self.classes_[self.decision_function(G).argmax(1)]

    # what a run records and says ---------------------------------------------------------------------
    @property
    def similarity_words(self) -> str:
        return f"the kernel k(x, z_i) ({self.kernel}, gamma = {self.gamma_:.4g}) of the preprocessed embeddings"

    def search_space(self, G: ArrayLike) -> tuple[np.ndarray, str]:
        """Vectors (m, D) float32 and a FAISS metric under which nearest means most similar by :meth:`affinity`: the
        preprocessed embeddings under L2 (exact order for 'rbf', which decreases in the distance; candidates for the
        others, which :class:`~carrot.attribution.retrieval.SimilarIndex` re-scores exactly)."""
        return self.preprocess(G).numpy().astype(np.float32), "l2"

    def affinity(self, G: ArrayLike, G_rows: ArrayLike) -> torch.Tensor:
        """The head's own similarity (m, k): the exact kernel k(x, z_i) between embeddings G (m, D) and training
        embeddings G_rows (k, D), both preprocessed (a Nystroem head's too: its k~ approximates this)."""
        return self.gram(self.preprocess(G), self.preprocess(G_rows))

    def describe(self) -> str:
        """The head in words, as the index page names it."""
        ny = f", Nystroem with {len(self.landmarks_)} landmarks" if self.approx_ == "nystroem" else ""
        return f"kernel head ({self.kernel}, gamma = {self.gamma_:.4g}{ny})"

    def pinned(self) -> dict:
        """The run-configuration keys that pin this fitted head's choices (a derived run refits this model)."""
        return {"head.lam": self.lam_, "head.gamma": self.gamma_, "head.approx": self.approx_}

    def fit_record(self) -> dict:
        """The fitted choices a run's metrics keep."""
        return {"lam": self.lam_, "lam_path": None, "gamma": self.gamma_, "loo_path": self.loo_path_, "approx": self.approx_}

    @property
    def refit_note(self) -> str:
        """What an exact refit of this head holds fixed besides the data, in words (after 'equal to a refit')."""
        return (" with the embeddings' standardisation, gamma, lambda" + (" and the Nystroem landmarks"
                if self.approx_ == "nystroem" else "") + " held as fitted")

    def restore_weights(self, weights: np.ndarray) -> None:
        """A run's saved weights must be the ones this head was fitted with (its files always keep them)."""
        if self.sample_weight_ is None:
            raise CarrotError("the run is weighted but its kernel head has no weights")

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
        head.spectrum_, head._system_, head._phi_fit_, head._feature_coef_ = None, None, None, None
        return head
