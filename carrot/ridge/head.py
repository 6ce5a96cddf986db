"""Closed-form weighted ridge head with exact representer form.

W*(a) = argmin_W sum_i a_i ||W^T (g_i - mu) - (y_i - ybar)||^2 + lam ||W||^2
      = (Gc^T A Gc + lam I)^-1 Gc^T A Yc          (primal, D x D Cholesky)
      = Gc^T beta,  (A^1/2 Kc A^1/2 + lam I) u = A^1/2 Yc,  beta = A^1/2 u   (dual, n x n)
with a-weighted means mu, ybar; the intercept is ybar - W^T mu. At the optimum
beta_i = a_i (y_i - f(g_i)) / lam, so f_c(x) = ybar_c + sum_i beta_ic <g_i - mu, g_x - mu> exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from carrot.devices import resolve_device
from carrot.errors import CarrotError, check_is_fitted
from carrot.io import atomic_path, write_json
from carrot.ridge.headfile import load_parts, read_meta, settings
from carrot.ridge.heads import PROPERTIES, register_head
from carrot.ridge.core import CentredMoments, RidgeFactor, chunks, dual_solve_coef, spectrum
from carrot.ridge.primal import PrimalSystem
from carrot.validation import ArrayLike, as_float64_matrix, as_weights, encode_labels, float64_rows, index_labels, one_hot

HEAD_FORMAT_VERSION = 3  # 3: + the solve's factor, total and sample weights; 2: every setting ("params"); 1: lam, fit_intercept, solver


@register_head("ridge", PROPERTIES.keys(),
               "linear ridge on the embedding: every exact identity, the region split included")
class RidgeHead(ClassifierMixin, BaseEstimator):
    """Multi-class ridge classifier in closed form, with exact representer attribution.

    Parameters: ``lam`` (> 0) L2 strength, or ``'auto'``: the value of ``lam_grid`` with the best
    exact leave-one-out accuracy on the training set (:func:`carrot.ridge.loo.ridge_loo_path`); ``fit_intercept`` (weighted centring, the intercept
    reported as its own term); ``solver`` 'auto' (primal when n >= D, else dual), 'primal' or
    'dual'; ``device`` for the solve; ``chunk_size`` rows per Gram accumulation chunk.
    Fitted: ``coef_`` (D, C), ``intercept_`` (C,), ``classes_`` (C,), ``feature_mean_`` (D,),
    ``prior_`` (C,) = weighted ybar, ``dual_coef_`` (n, C) = beta, ``solver_`` used, ``lam_`` used
    (and ``lam_path_`` with the LOO accuracy per candidate when ``lam='auto'``). A scikit-learn estimator:
    ``clone``, ``get_params``, ``score``, pipelines and model selection work with it.
    """

    def __init__(
        self,
        lam: float = 1.0,
        fit_intercept: bool = True,
        solver: str = "auto",
        device: str = "auto",
        chunk_size: int = 65536,
        lam_grid: tuple[float, ...] | None = None,
    ) -> None:
        self.lam = lam
        self.lam_grid = lam_grid
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.device = device
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, config: Any) -> "RidgeHead":
        """The unfitted head of a run configuration (``head.*`` keys, the run's device)."""
        h = config.head
        return cls(lam=h.lam, fit_intercept=h.fit_intercept, solver=h.solver, device=config.device)

    def search_flops(self, n: int, C: int) -> float:
        """About the floating-point operations of this head's exact lambda search (the streamed moments n D^2 with
        D unknown here: a ridge search is never the costly one, so 0, and 'auto' never narrows it)."""
        return 0.0

    def unfit_reason(self, n: int, config: Any) -> str | None:
        """Why head.kind 'auto' cannot fit this head of ``config`` on ``n`` training images (never: the primal solve
        streams)."""
        return None

    def _check_settings(self) -> None:
        if self.lam == "auto":
            return self._validate_rest()
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not np.isfinite(self.lam) or self.lam <= 0:
            raise CarrotError(f"lam: expected 'auto' or a finite number > 0, got {self.lam!r}")
        self._validate_rest()

    def _validate_rest(self) -> None:
        if self.solver not in ("auto", "primal", "dual"):
            raise CarrotError(f"solver: expected 'auto', 'primal' or 'dual', got {self.solver!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise CarrotError(f"chunk_size: expected a positive integer, got {self.chunk_size!r}")

    def fit(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "RidgeHead":
        """Fit the head in closed form.

        G may be a numpy memmap: the primal solve (and its 'auto' lambda) streams it in ``chunk_size``
        rows with float64 accumulation (:class:`~carrot.ridge.core.CentredMoments`), so only D x D, D x C
        and n x C arrays are held; the dual solve loads G. The factorisation of the solve is kept as
        ``factor_`` (saved with the head), so exact LOO, removal and reweighting never refactorise.

        Parameters
        ----------
        G : array, tensor or memmap (n, D), finite.
        y : array (n,) of labels (at least two classes).
        sample_weight : array (n,) of weights >= 0 with a positive sum, or None for ones; kept as
            ``sample_weight_``.

        Returns
        -------
        self
        """
        self._check_settings()
        if not hasattr(G, "shape") or len(G.shape) != 2:
            G = as_float64_matrix(G, "G")
        n, d = int(G.shape[0]), int(G.shape[1])
        classes, y_idx = encode_labels(y, n)
        if len(classes) < 2:
            raise CarrotError(f"y: expected at least 2 classes to fit a classifier, got {len(classes)} ({classes.tolist()})")
        C = len(classes)
        a = as_weights(sample_weight, n)
        dev = resolve_device(self.device)
        dev = dev if dev.type != "mps" else torch.device("cpu")  # MPS has no float64
        solver = self.solver if self.solver != "auto" else ("primal" if n >= d else "dual")
        if solver == "dual":
            G = as_float64_matrix(G, "G")
        m = CentredMoments.accumulate(G, y_idx, a, n_classes=C, fit_intercept=self.fit_intercept, chunk_size=self.chunk_size,
                                      device=dev, second_moments=solver == "primal")
        if solver == "dual":  # U = A^1/2 Gc (n, D), sY = A^1/2 Yc; B = U^T sY without the D x D Gram
            U = (a.sqrt().unsqueeze(1) * (G - m.mu.cpu())).to(dev)
            sY = a.sqrt().unsqueeze(1).to(dev) * (one_hot(y_idx, C).to(dev) - m.ybar)
            m.B = U.T @ sY
        if self.lam == "auto":
            from carrot.ridge.loo import DEFAULT_LAMBDAS, loo_path

            eig = spectrum(m, U if solver == "dual" else None)
            rows = ((sl, float64_rows(G, sl).to(dev) - m.mu) for sl in chunks(n, self.chunk_size))
            path = loo_path(m, eig, rows, y_idx, a, self.lam_grid or DEFAULT_LAMBDAS)
            self.lam_ = path.best_lambda
            self.lam_path_ = {"lambdas": path.lambdas.tolist(), "loo_accuracy": path.accuracy.tolist(),
                              "loo_mse": path.mse.tolist()}
        else:
            self.lam_, self.lam_path_ = float(self.lam), None
        if solver == "primal":
            factor = RidgeFactor.primal(m.M, self.lam_)
            W = factor.solve(m.B)
        else:
            factor = RidgeFactor.dual(U, self.lam_)
            W = dual_solve_coef(U, sY, factor)
        m = m.to("cpu")
        self._set_solution(classes, W.cpu(), m, factor.cpu(), solver, d, None if sample_weight is None else a)
        self.dual_coef_ = self.dual_coef(G, classes[y_idx], a)
        return self

    def _set_solution(self, classes: np.ndarray, W: torch.Tensor, m: CentredMoments, factor: RidgeFactor | None,
                      solver: str, d: int, sample_weight: torch.Tensor | None) -> None:
        self.classes_ = np.asarray(classes)
        self.coef_ = W
        self.feature_mean_ = m.mu
        self.prior_ = m.ybar
        self.intercept_ = m.ybar - W.T @ m.mu
        self.total_weight_ = float(m.S)
        self.factor_ = factor
        self.solver_ = solver
        self.n_features_in_ = d
        self.sample_weight_ = sample_weight

    def fit_moments(self, moments: CentredMoments, classes: ArrayLike) -> "RidgeHead":
        """Fit from centred moments (e.g. :meth:`CentredMoments.accumulate` with ``distributed=True``, which
        all-reduces across ranks). ``dual_coef_`` needs the rows and is left unset; use :meth:`dual_coef`
        on each shard."""
        self._check_settings()
        if self.lam == "auto":
            raise CarrotError("lam: 'auto' needs the training rows (exact LOO); give a number when fitting from moments")
        if moments.M is None:
            raise CarrotError("moments: expected second moments (accumulate with second_moments=True)")
        if moments.fit_intercept != self.fit_intercept:
            raise CarrotError(f"moments: accumulated with fit_intercept={moments.fit_intercept}, the head has {self.fit_intercept}")
        m = moments.to("cpu")
        self.lam_, self.lam_path_ = float(self.lam), None
        factor = RidgeFactor.primal(m.M, self.lam_)
        self._set_solution(classes, factor.solve(m.B), m, factor, "moments", m.M.shape[0], None)
        self.dual_coef_ = None
        return self

    def dual_coef(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> torch.Tensor:
        """Representer values beta = a (Y - f(G)) / lam of training rows (sum_i beta_i (g_i - mu) = W at the optimum).

        Parameters
        ----------
        G : array (n, D) rows (a shard of the training set, or all of it).
        y : array (n,) their labels (refused by name if the head never saw one).
        sample_weight : array (n,) their weights, or None for ones.

        Returns
        -------
        tensor (n, C) float64.
        """
        check_is_fitted(self)
        n = int(G.shape[0])
        idx = index_labels(self.classes_, y)
        a = as_weights(sample_weight, n)
        out = torch.empty(n, len(self.classes_), dtype=torch.float64)
        for sl in chunks(n, self.chunk_size):
            out[sl] = a[sl].unsqueeze(1) * (one_hot(idx[sl], len(self.classes_)) - self._decision(float64_rows(G, sl))) / self.lam_
        return out

    def _decision(self, G: torch.Tensor) -> torch.Tensor:
        return G @ self.coef_ + self.intercept_

    def system(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> PrimalSystem:
        """The head's exact training system (:class:`~carrot.ridge.primal.PrimalSystem`) on its training rows G (n, D),
        y (n,): the head's own factorisation and weights (``factor_``, ``sample_weight_``), nothing re-accumulated.
        ``sample_weight``, if given, must be the head's weights."""
        check_is_fitted(self)
        G = as_float64_matrix(G, "G")
        idx = index_labels(self.classes_, y)
        n = G.shape[0]
        if self.dual_coef_ is not None and self.dual_coef_.shape[0] != n:
            raise CarrotError(f"G: expected the {self.dual_coef_.shape[0]} training rows the head was fitted on, got {n}")
        a = as_weights(getattr(self, "sample_weight_", None), n)
        if sample_weight is not None and not torch.equal(as_weights(sample_weight, n), a):
            raise CarrotError("sample_weight: differs from the weights the head was fitted with (head.sample_weight_)")
        Y = one_hot(idx, len(self.classes_))
        factor = getattr(self, "factor_", None)
        if factor is None:  # a head from an older file, or fitted from moments: factorise once here
            return PrimalSystem.fit(G, Y, a, self.lam_, self.fit_intercept, self.device, self.chunk_size)
        if factor.kind == "dual":
            factor = RidgeFactor("dual", factor.chol, factor.lam).bind(a.sqrt().unsqueeze(1) * (G - self.feature_mean_))
        return PrimalSystem.from_solution(G, Y, a, float(self.lam_), self.fit_intercept, factor, self.feature_mean_,
                                          float(a.sum()), self.prior_, self.coef_, str(self.device), self.chunk_size)

    def refit(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> "RidgeHead":
        """This head's model fitted on other rows or weights, every setting and the chosen lambda held
        (:func:`frozen_clone`)."""
        return frozen_clone(self).fit(G, y, sample_weight)

    def describe(self) -> str:
        """The head in words, as the index page names it."""
        return "ridge head"

    similarity_words = "the centred embedding's inner product <g_x - mu, g_i - mu>"

    def search_space(self, G: ArrayLike) -> tuple[np.ndarray, str]:
        """Vectors (m, D) float32 and a FAISS metric ('ip' or 'l2') under which nearest means most similar by
        :meth:`affinity` (exactly: the centred embedding, inner product)."""
        check_is_fitted(self)
        return (as_float64_matrix(G, "G") - self.feature_mean_).numpy().astype(np.float32), "ip"

    def affinity(self, G: ArrayLike, G_rows: ArrayLike) -> torch.Tensor:
        """The head's own similarity (m, k) of embeddings G (m, D) to training embeddings G_rows (k, D):
        <g - mu, g_i - mu>."""
        check_is_fitted(self)
        return (as_float64_matrix(G, "G") - self.feature_mean_) @ (as_float64_matrix(G_rows, "G_rows") - self.feature_mean_).T

    def pinned(self) -> dict:
        """The run-configuration keys that pin this fitted head's choices (a derived run refits this model)."""
        return {"head.lam": self.lam_}

    def fit_record(self) -> dict:
        """The fitted choices a run's metrics keep."""
        return {"lam": self.lam_, "lam_path": self.lam_path_}

    refit_note = ""  # an exact refit of the ridge head holds nothing but lambda

    def restore_weights(self, weights: np.ndarray) -> None:
        """A run's saved weights, for a head read from a file written before heads kept their weights (format < 3)."""
        if self.sample_weight_ is None:
            self.sample_weight_ = torch.as_tensor(weights, dtype=torch.float64)

    def torch_decision(self, G: torch.Tensor) -> torch.Tensor:
        """Logits (m, C) of float64 embeddings with autograd (the pixel split differentiates through it)."""
        return G @ self.coef_.to(G.dtype) + self.intercept_.to(G.dtype)

    def decision_function(self, G: ArrayLike) -> np.ndarray:
        """Logits of the classes ``classes_``.

        Parameters
        ----------
        G : array (m, D).

        Returns
        -------
        ndarray (m, C) float64: G W + b.
        """
        check_is_fitted(self)
        G = as_float64_matrix(G, "G")
        if G.shape[1] != self.n_features_in_:
            raise CarrotError(f"G: expected {self.n_features_in_} features as in fit, got {G.shape[1]}")
        return self._decision(G).numpy()

    def predict(self, G: ArrayLike) -> np.ndarray:
        """Predicted labels.

        Parameters
        ----------
        G : array (m, D).

        Returns
        -------
        ndarray (m,) of labels from ``classes_``.
        """
        check_is_fitted(self)
        return self.classes_[self.decision_function(G).argmax(1)]

    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors, tensors) and ``path``.json (settings, shapes) atomically."""
        from safetensors.torch import save_file

        check_is_fitted(self)
        path = Path(path)
        tensors = {
            "coef": self.coef_, "intercept": self.intercept_, "feature_mean": self.feature_mean_,
            "prior": self.prior_, "dual_coef": self.dual_coef_,
        }
        factor = getattr(self, "factor_", None)
        if factor is not None:
            tensors["factor"] = factor.chol
        if getattr(self, "sample_weight_", None) is not None:
            tensors["sample_weight"] = self.sample_weight_
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        params = self.get_params()
        if params["lam_grid"] is not None:
            params["lam_grid"] = [float(v) for v in params["lam_grid"]]
        write_json(str(path) + ".json", {
            "format": "carrot.RidgeHead", "version": HEAD_FORMAT_VERSION, "params": params,
            "lam_": self.lam_, "lam_path_": self.lam_path_, "solver_": self.solver_, "classes": self.classes_.tolist(),
            "n_features": self.n_features_in_, "n_train": int(self.dual_coef_.shape[0]),
            "factor_kind": None if factor is None else factor.kind, "total_weight": self.total_weight_,
        })

    @classmethod
    def load(cls, path: str | Path) -> "RidgeHead":
        """Read a head written by :meth:`save`, checking that tensors and metadata agree."""
        path = Path(path)
        meta, version = read_meta(path, cls, HEAD_FORMAT_VERSION)
        # version 2 saves every constructor setting, so a loaded head clones like the fitted one
        raw = meta.get("params") if version >= 2 else {k: meta[k] for k in ("lam", "fit_intercept", "solver") if k in meta}
        head = cls(**settings(raw, cls, path))
        return load_parts(path, lambda t: cls._from_parts(head, meta, t, path, version))

    @classmethod
    def _from_parts(cls, head: "RidgeHead", meta: dict, t: dict, path: Path, version: int) -> "RidgeHead":
        head.classes_ = np.asarray(meta["classes"])
        head.coef_, head.intercept_ = t["coef"], t["intercept"]
        head.feature_mean_, head.prior_, head.dual_coef_ = t["feature_mean"], t["prior"], t["dual_coef"]
        head.solver_, head.n_features_in_ = meta["solver_"], meta["n_features"]
        head.lam_, head.lam_path_ = meta["lam_"], meta.get("lam_path_")
        c, d, n = len(head.classes_), head.n_features_in_, meta["n_train"]
        # format 3 keeps the factorisation and the weights; older heads get them from their training rows
        kind = meta.get("factor_kind") if version >= 3 else None
        head.factor_ = RidgeFactor(kind, t["factor"], head.lam_) if kind is not None and "factor" in t else None
        head.sample_weight_ = t.get("sample_weight")
        head.total_weight_ = meta.get("total_weight", float(n) if head.sample_weight_ is None else float(head.sample_weight_.sum()))
        p = {"primal": d, "dual": n}.get(kind)
        if (head.coef_.shape != (d, c) or head.dual_coef_.shape != (n, c) or head.intercept_.shape != (c,)
                or (head.factor_ is not None and head.factor_.chol.shape != (p, p))
                or (head.sample_weight_ is not None and head.sample_weight_.shape != (n,))):
            raise CarrotError(f"head file '{path}' is inconsistent with its metadata (shapes differ); refit the run")
        if not all(torch.isfinite(v).all() for v in t.values() if torch.is_tensor(v) and v.is_floating_point()):
            raise CarrotError(f"head file '{path}' holds NaN or Inf values; refit the run")
        return head


def frozen_clone(head: Any, **params: Any) -> Any:
    """An unfitted copy of ``head`` with every setting (``clone``), its 'auto' choices fixed to the fitted values
    when the head is fitted (``lam_``; the kernel head's ``gamma_`` and ``approx_`` too), so an audit refits the model the run
    chose, not a new search; then ``params``.

    Parameters
    ----------
    head : a registered head (:mod:`carrot.ridge.heads`), fitted or not.
    **params : settings to override, as for ``set_params``.

    Returns
    -------
    the same kind of head, unfitted.
    """
    from sklearn.base import clone

    fitted = {p: getattr(head, p + "_") for p in ("lam", "gamma", "approx") if p in head.get_params() and hasattr(head, p + "_")}
    return clone(head).set_params(**{**fitted, **params})


def as_head(head_or_lam: Any) -> Any:
    """A head template from a registered head (kept whole) or a bare lambda (the ridge head, defaults otherwise)."""
    return head_or_lam if hasattr(head_or_lam, "get_params") else RidgeHead(lam=head_or_lam)


def fitted_head(head_or_lam: Any, G: ArrayLike, y: ArrayLike) -> Any:
    """A fitted head: a registered head as it is, or a bare lambda's default head fitted on (G, y)."""
    return head_or_lam if hasattr(head_or_lam, "get_params") else as_head(head_or_lam).fit(G, y)
