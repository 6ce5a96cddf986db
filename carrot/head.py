"""Closed-form weighted ridge head with exact representer form.

W*(a) = argmin_W sum_i a_i ||W^T (g_i - mu) - (y_i - ybar)||^2 + lam ||W||^2
      = (Gc^T A Gc + lam I)^-1 Gc^T A Yc          (primal, D x D Cholesky)
      = Gc^T beta,  (A^1/2 Kc A^1/2 + lam I) u = A^1/2 Yc,  beta = A^1/2 u   (dual, n x n)
with a-weighted means mu, ybar; the intercept is ybar - W^T mu. At the optimum
beta_i = a_i (y_i - f(g_i)) / lam, so f_c(x) = ybar_c + sum_i beta_ic <g_i - mu, g_x - mu> exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from .devices import resolve_device
from .errors import CarrotError, check_is_fitted
from .io import atomic_path, read_json, write_json
from .validation import ArrayLike, as_float64_matrix, as_weights, encode_labels, index_labels, one_hot

HEAD_FORMAT_VERSION = 2  # 2: all constructor settings saved ("params"); 1: lam, fit_intercept, solver


class RidgeHead(ClassifierMixin, BaseEstimator):
    """Multi-class ridge classifier in closed form, with exact representer attribution.

    Parameters: ``lam`` (> 0) L2 strength, or ``'auto'``: the value of ``lam_grid`` with the best
    exact leave-one-out accuracy on the training set (:func:`carrot.loo.ridge_loo_path`); ``fit_intercept`` (weighted centring, the intercept
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
        """Fit on embeddings G (n, D) and labels y (n,), optional weights (n,) >= 0.

        G may be a numpy memmap: the primal solve (and its 'auto' lambda) streams it in ``chunk_size``
        rows with float64 accumulation, so only D x D, D x C and n x C arrays are held; the dual solve loads G.
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
        y_t = torch.as_tensor(y_idx, dtype=torch.long)
        solver = self.solver if self.solver != "auto" else ("primal" if n >= d else "dual")
        if solver == "dual":
            G = as_float64_matrix(G, "G")
        if self.fit_intercept:
            mu = sum(a[sl] @ self._rows(G, sl) for sl in self._chunks(n)) / a.sum()
            ybar = torch.zeros(C, dtype=torch.float64).index_add(0, y_t, a) / a.sum()
        else:
            mu, ybar = torch.zeros(d, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
        if solver == "primal":
            M, B = self._gram(G, y_t, C, a, mu, ybar, dev)
        if self.lam == "auto":
            from .loo import DEFAULT_LAMBDAS, ridge_loo_path, ridge_loo_scores

            grid = self.lam_grid or DEFAULT_LAMBDAS
            if solver == "primal":
                chunks = ((sl, (self._rows(G, sl) - mu).to(dev)) for sl in self._chunks(n))
                path = ridge_loo_scores(M, B, chunks, y_idx, a, ybar, grid, self.fit_intercept)
            else:
                path = ridge_loo_path(G, y, grid, a, self.fit_intercept)
            self.lam_ = path.best_lambda
            self.lam_path_ = {"lambdas": path.lambdas.tolist(), "loo_accuracy": path.accuracy.tolist(),
                              "loo_mse": path.mse.tolist()}
        else:
            self.lam_, self.lam_path_ = float(self.lam), None
        if solver == "primal":
            M.diagonal().add_(self.lam_)
            W = torch.cholesky_solve(B, _cholesky(M)).cpu()
        else:
            W = self._solve_dual(G, one_hot(y_idx, C), a, mu, ybar, dev)
        self.classes_ = classes
        self.coef_ = W
        self.feature_mean_ = mu
        self.prior_ = ybar
        self.intercept_ = ybar - W.T @ mu
        self.solver_ = solver
        self.n_features_in_ = d
        self.dual_coef_ = self.dual_coef(G, classes[y_idx], a)
        return self

    def fit_moments(self, moments, classes: ArrayLike) -> "RidgeHead":
        """Fit from summed Gram moments (see :class:`carrot.distributed.GramMoments`), e.g. after an
        all_reduce across ranks: Gc^T A Gc = G^T A G - S mu mu^T. ``dual_coef_`` needs the rows and is
        left unset; use :meth:`dual_coef` on each shard."""
        self._check_settings()
        if self.lam == "auto":
            raise CarrotError("lam: 'auto' needs the training rows (exact LOO); give a number when fitting from moments")
        m = moments
        S = m.S.cpu()
        d, C = m.GtAY.shape
        if self.fit_intercept:
            mu, ybar = m.s1.cpu() / S, m.sy.cpu() / S
            M = m.GtAG.cpu() - S * torch.outer(mu, mu)
            B = m.GtAY.cpu() - S * torch.outer(mu, ybar)
        else:
            mu, ybar = torch.zeros(d, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
            M, B = m.GtAG.cpu().clone(), m.GtAY.cpu()
        M = 0.5 * (M + M.T)
        M.diagonal().add_(float(self.lam))
        W = torch.cholesky_solve(B, _cholesky(M))
        self.lam_, self.lam_path_ = float(self.lam), None
        self.classes_ = np.asarray(classes)
        self.coef_, self.feature_mean_, self.prior_ = W, mu, ybar
        self.intercept_ = ybar - W.T @ mu
        self.solver_, self.n_features_in_ = "moments", d
        self.dual_coef_ = None
        return self

    def dual_coef(self, G: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> torch.Tensor:
        """beta = a (Y - f(G)) / lam for rows G (n, D) with labels y: the representer values of those rows."""
        check_is_fitted(self)
        n = int(G.shape[0])
        idx = index_labels(self.classes_, y)
        a = as_weights(sample_weight, n)
        out = torch.empty(n, len(self.classes_), dtype=torch.float64)
        for sl in self._chunks(n):
            out[sl] = a[sl].unsqueeze(1) * (one_hot(idx[sl], len(self.classes_)) - self._decision(self._rows(G, sl))) / self.lam_
        return out

    def _chunks(self, n: int):
        for s in range(0, n, self.chunk_size):
            yield slice(s, min(n, s + self.chunk_size))

    @staticmethod
    def _rows(G: ArrayLike, sl: slice) -> torch.Tensor:
        """Rows ``sl`` of G as a finite float64 tensor (G: tensor, array or memmap)."""
        block = G[sl]
        block = block.to(torch.float64) if torch.is_tensor(block) else torch.from_numpy(np.array(block, dtype=np.float64))
        if not torch.isfinite(block).all():
            bad = int((~torch.isfinite(block)).any(1).sum())
            raise CarrotError(f"G: features must be finite, found NaN/Inf in {bad} row(s)")
        return block

    def _gram(self, G, y_t, C, a, mu, ybar, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """Streamed Gc^T A Gc (D, D) and Gc^T A (Y - ybar) (D, C), float64 on ``dev``."""
        d = G.shape[1]
        M = torch.zeros(d, d, dtype=torch.float64, device=dev)
        B = torch.zeros(d, C, dtype=torch.float64, device=dev)
        for sl in self._chunks(G.shape[0]):
            Gc = (self._rows(G, sl) - mu).to(dev)
            aG = Gc * a[sl].to(dev).unsqueeze(1)
            M += aG.T @ Gc
            B += aG.T @ (one_hot(y_t[sl], C) - ybar).to(dev)
        return M, B

    def _solve_dual(self, G, Y, a, mu, ybar, dev) -> torch.Tensor:
        Gc = (G - mu).to(dev)
        s = a.sqrt().to(dev)
        K = (s.unsqueeze(1) * Gc) @ (Gc.T * s.unsqueeze(0))
        K.diagonal().add_(self.lam_)
        Lc = _cholesky(K)
        u = torch.cholesky_solve(s.unsqueeze(1) * (Y - ybar).to(dev), Lc)
        return (Gc.T @ (s.unsqueeze(1) * u)).cpu()

    def _decision(self, G: torch.Tensor) -> torch.Tensor:
        return G @ self.coef_ + self.intercept_

    def decision_function(self, G: ArrayLike) -> np.ndarray:
        """Logits (m, C) for embeddings G (m, D)."""
        check_is_fitted(self)
        G = as_float64_matrix(G, "G")
        if G.shape[1] != self.n_features_in_:
            raise CarrotError(f"G: expected {self.n_features_in_} features as in fit, got {G.shape[1]}")
        return self._decision(G).numpy()

    def predict(self, G: ArrayLike) -> np.ndarray:
        """Predicted class labels (m,)."""
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
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        params = self.get_params()
        if params["lam_grid"] is not None:
            params["lam_grid"] = [float(v) for v in params["lam_grid"]]
        write_json(str(path) + ".json", {
            "format": "carrot.RidgeHead", "version": HEAD_FORMAT_VERSION, "params": params,
            "lam_": self.lam_, "lam_path_": self.lam_path_, "solver_": self.solver_, "classes": self.classes_.tolist(),
            "n_features": self.n_features_in_, "n_train": int(self.dual_coef_.shape[0]),
        })

    @classmethod
    def load(cls, path: str | Path) -> "RidgeHead":
        """Read a head written by :meth:`save`, checking that tensors and metadata agree."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_json(str(path) + ".json", "head metadata")
        if meta.get("format") != "carrot.RidgeHead":
            raise CarrotError(f"'{path}.json' is not a carrot RidgeHead file")
        if not path.is_file():
            raise CarrotError(f"head weights not found: '{path}'")
        version = meta.get("version")
        if isinstance(version, int) and version > HEAD_FORMAT_VERSION:
            raise CarrotError(f"'{path}.json': head format version {version} was written by a newer carrot "
                              f"(this one reads 1..{HEAD_FORMAT_VERSION}); upgrade carrot to load it")
        if version not in range(1, HEAD_FORMAT_VERSION + 1):
            raise CarrotError(f"'{path}.json': expected a head format version 1..{HEAD_FORMAT_VERSION}, got {version!r}")
        # version 2 saves every constructor setting, so a loaded head clones like the fitted one
        raw = meta.get("params") if version >= 2 else {k: meta[k] for k in ("lam", "fit_intercept", "solver") if k in meta}
        if not isinstance(raw, dict) or not set(raw) <= set(cls._get_param_names()):
            raise CarrotError(f"'{path}.json': params must be RidgeHead settings {cls._get_param_names()}, got {raw!r}")
        params = dict(raw)
        if params.get("lam_grid") is not None:
            params["lam_grid"] = tuple(params["lam_grid"])
        t = load_file(str(path))
        head = cls(**params)
        head.classes_ = np.asarray(meta["classes"])
        head.coef_, head.intercept_ = t["coef"], t["intercept"]
        head.feature_mean_, head.prior_, head.dual_coef_ = t["feature_mean"], t["prior"], t["dual_coef"]
        head.solver_, head.n_features_in_ = meta["solver_"], meta["n_features"]
        head.lam_, head.lam_path_ = meta["lam_"], meta.get("lam_path_")
        c, d, n = len(head.classes_), head.n_features_in_, meta["n_train"]
        if head.coef_.shape != (d, c) or head.dual_coef_.shape != (n, c) or head.intercept_.shape != (c,):
            raise CarrotError(f"head file '{path}' is inconsistent with its metadata (shapes differ)")
        return head


def _cholesky(M: torch.Tensor) -> torch.Tensor:
    Lc, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise CarrotError("ridge system is not positive definite (features overflow?); increase lam")
    return Lc
