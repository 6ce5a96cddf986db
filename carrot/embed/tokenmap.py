"""Token feature maps: a fixed nonlinear map phi applied to every region token before the readout.

g = sum_j w_j phi(h_j) is still linear in the regions' features, so with a linear head every exact identity
holds unchanged: the region split r_jc = W_c . (w_j phi(h_j) - mu / N), the region pairs, LOO, Woodbury.
With phi(h) . phi(h') ~ k(h, h') the head is kernel ridge on the mean-embedding (set) kernel
K(x, x') = sum_jk w_j w'_k k(h_j, h'_k) of the two images' regions, and the approximate model is explained
exactly. Tokens are standardised (each dimension by the training tokens' mean and standard deviation) and
k(h, h') = exp(-gamma |h - h'|^2):

* ``rff``: random Fourier features, phi(h) = sqrt(2 / m) cos(h W + b) (Rahimi & Recht 2007; sklearn RBFSampler);
* ``nystroem``: phi(h) = k(h, C) M with m training tokens C as landmarks and M = K_CC^(-1/2)
  (Williams & Seeger 2001; sklearn Nystroem).

The map is fitted once on a seeded sample of training tokens and saved with the run (:class:`TokenMap`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carrot.errors import CarrotError

TOKEN_MAPS = ("none", "rff", "nystroem")  # carrot.config.TOKEN_MAP_KINDS names them for a torch-free config
TOKEN_MAP_FORMAT = "carrot.TokenMap"
TOKEN_MAP_FORMAT_VERSION = 1
MAX_FIT_TOKENS = 50_000  # tokens sampled to fit the map (landmarks, scaling); more changes nothing measurable
MEDIAN_PAIRS = 20_000  # token pairs whose median squared distance sets gamma = 1 / median


class TokenMap:
    """phi: R^D -> R^m on each region token, fitted on training tokens.

    Parameters
    ----------
    kind : 'rff' or 'nystroem'.
    dim : m, the number of features per token.
    gamma : RBF parameter on standardised tokens, or 'auto' (1 / the median squared distance between tokens).
    seed : seeds the token sample, the landmarks and the random features.

    Attributes (after :meth:`fit`)
    ------------------------------
    mean_, scale_ : (D,) standardisation; gamma_ : float.
    weights_ (D, m), offset_ (m,) for 'rff'; landmarks_ (m, D) (standardised), normalization_ (m, m) for 'nystroem'.
    """

    def __init__(self, kind: str = "nystroem", dim: int = 1024, gamma: float | str = "auto", seed: int = 0) -> None:
        self.kind, self.dim, self.gamma, self.seed = kind, dim, gamma, seed

    def __repr__(self) -> str:
        return f"TokenMap(kind={self.kind!r}, dim={self.dim}, gamma={self.gamma!r}, seed={self.seed})"

    def _check(self) -> None:
        from carrot.config import TokenMapConfig

        TokenMapConfig(self.kind, self.dim, self.gamma)  # the config's own checks, one place
        if self.kind == "none":
            raise CarrotError("token_map.kind: 'none' has no map to fit; expected rff or nystroem")

    def fit(self, tokens: np.ndarray) -> "TokenMap":
        """Fit on training tokens (M, D) (any float dtype; a seeded sample of at most MAX_FIT_TOKENS is used)."""
        from sklearn.kernel_approximation import Nystroem, RBFSampler

        self._check()
        X = np.asarray(tokens)
        if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
            raise CarrotError(f"tokens: expected a (M, D) array of M >= 2 training tokens, got shape {X.shape}")
        if self.kind == "nystroem" and X.shape[0] < self.dim:
            raise CarrotError(f"token_map.dim: the Nystroem map needs at least dim = {self.dim} training tokens as "
                              f"landmarks, got {X.shape[0]}; expected dim <= {X.shape[0]}")
        rng = np.random.default_rng(self.seed)
        if X.shape[0] > MAX_FIT_TOKENS:
            X = X[np.sort(rng.choice(X.shape[0], MAX_FIT_TOKENS, replace=False))]
        X = X.astype(np.float64)
        if not np.isfinite(X).all():
            raise CarrotError("tokens: the training tokens hold NaN or Inf")
        self.mean_ = X.mean(0)
        std = X.std(0)
        self.scale_ = np.where(std > 0, std, 1.0)
        Z = (X - self.mean_) / self.scale_
        if self.gamma == "auto":
            i, j = rng.integers(0, len(Z), (2, MEDIAN_PAIRS))
            d2 = ((Z[i[i != j]] - Z[j[i != j]]) ** 2).sum(1)
            med = float(np.median(d2)) if len(d2) else 0.0
            if not med > 0:
                raise CarrotError("tokens: every sampled pair of training tokens is identical; gamma 'auto' needs "
                                  "distinct tokens (set token_map.gamma to a number)")
            self.gamma_ = 1.0 / med
        else:
            self.gamma_ = float(self.gamma)
        state = int(rng.integers(0, 2**31 - 1))
        if self.kind == "rff":
            rff = RBFSampler(gamma=self.gamma_, n_components=self.dim, random_state=state).fit(Z)
            self.weights_, self.offset_ = rff.random_weights_, rff.random_offset_
        else:
            ny = Nystroem(kernel="rbf", gamma=self.gamma_, n_components=self.dim, random_state=state).fit(Z)
            self.landmarks_, self.normalization_ = np.ascontiguousarray(ny.components_), np.ascontiguousarray(ny.normalization_.T)
        self._tensors = None
        return self

    @property
    def n_features_in_(self) -> int:
        return int(self.mean_.shape[0])

    def _torch(self) -> dict[str, torch.Tensor]:
        if getattr(self, "_tensors", None) is None:
            self._tensors = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in self.state().items()}
        return self._tensors

    def __call__(self, H: torch.Tensor) -> torch.Tensor:
        """phi of tokens H (..., D) -> (..., m) float64, differentiable in H."""
        if not hasattr(self, "mean_"):
            raise CarrotError("TokenMap: not fitted; call fit(tokens) first")
        if H.shape[-1] != self.n_features_in_:
            raise CarrotError(f"tokens: expected {self.n_features_in_} features per token (the map was fitted on "
                              f"them), got shape {tuple(H.shape)}")
        t = {k: v.to(H.device) for k, v in self._torch().items()}
        Z = (H.to(torch.float64) - t["mean"]) / t["scale"]
        if self.kind == "rff":
            return np.sqrt(2.0 / self.dim) * torch.cos(Z @ t["weights"] + t["offset"])
        C = t["landmarks"]
        d2 = ((Z * Z).sum(-1, keepdim=True) - 2 * Z @ C.T + (C * C).sum(-1)).clamp_min(0)
        return torch.exp(-self.gamma_ * d2) @ t["normalization"]

    # persistence -----------------------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        s = {"mean": self.mean_, "scale": self.scale_}
        if self.kind == "rff":
            s.update(weights=self.weights_, offset=self.offset_)
        else:
            s.update(landmarks=self.landmarks_, normalization=self.normalization_)
        return s

    def save(self, path: str | Path) -> None:
        """One safetensors file: the fitted arrays, and the settings with gamma_ in its metadata."""
        from safetensors.torch import save_file

        from carrot.io import atomic_path

        meta = {"format": TOKEN_MAP_FORMAT, "version": TOKEN_MAP_FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "gamma": self.gamma, "seed": self.seed, "gamma_": self.gamma_}
        with atomic_path(Path(path)) as tmp:
            save_file({k: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float64) for k, v in self.state().items()},
                      str(tmp), metadata={"carrot": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "TokenMap":
        """Read a map written by :meth:`save`; a missing, corrupt or inconsistent file is a one-line error."""
        from safetensors import safe_open

        path = Path(path)
        bad = f"token map file '{path}'"
        if not path.is_file():
            raise CarrotError(f"{bad} not found; refit the run")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta: Any = json.loads((f.metadata() or {}).get("carrot", "null"))
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a corrupt file
            raise CarrotError(f"{bad} is corrupt ({type(exc).__name__}); refit the run") from None
        if not isinstance(meta, dict) or meta.get("format") != TOKEN_MAP_FORMAT:
            raise CarrotError(f"{bad} is not a carrot token map; refit the run")
        if meta.get("version") != TOKEN_MAP_FORMAT_VERSION:
            raise CarrotError(f"{bad}: expected format version {TOKEN_MAP_FORMAT_VERSION}, got {meta.get('version')!r}")
        try:
            tm = cls(meta["kind"], meta["dim"], meta["gamma"], meta["seed"])
            tm._check()
            tm.gamma_ = float(meta["gamma_"])
            names = ("weights", "offset") if tm.kind == "rff" else ("landmarks", "normalization")
            arrays = {k: t[k].numpy() for k in ("mean", "scale", *names)}
        except (KeyError, TypeError, ValueError, CarrotError) as exc:
            raise CarrotError(f"{bad} is incomplete ({type(exc).__name__}: {exc}); refit the run") from None
        d, m = arrays["mean"].shape[0] if arrays["mean"].ndim == 1 else -1, tm.dim
        want = {"mean": (d,), "scale": (d,), **({"weights": (d, m), "offset": (m,)} if tm.kind == "rff"
                                                 else {"landmarks": (m, d), "normalization": (m, m)})}
        for k, shape in want.items():
            a = arrays[k]
            if d < 1 or a.shape != shape or a.dtype != np.float64 or not np.isfinite(a).all():
                raise CarrotError(f"{bad}: {k} is not a finite float64 array of shape {shape}; refit the run")
        if not (tm.gamma_ > 0 and np.isfinite(tm.gamma_)) or not (arrays["scale"] > 0).all():
            raise CarrotError(f"{bad}: gamma_ or the scales are not positive; refit the run")
        tm.mean_, tm.scale_ = arrays["mean"], arrays["scale"]
        if tm.kind == "rff":
            tm.weights_, tm.offset_ = arrays["weights"], arrays["offset"]
        else:
            tm.landmarks_, tm.normalization_ = arrays["landmarks"], arrays["normalization"]
        tm._tensors = None
        return tm


def sample_images(n: int, n_regions: int, seed: int = 0, limit: int = MAX_FIT_TOKENS) -> list[int]:
    """The training images (sorted indices into n) whose tokens fit a token map: enough for ``limit`` tokens."""
    k = min(n, max(1, -(-limit // n_regions)))
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False)).tolist()


def thin_tokens(tokens: np.ndarray, seed: int = 0, limit: int = MAX_FIT_TOKENS) -> np.ndarray:
    """Tokens (k, N, D) of the :func:`sample_images` as (M, D) float32, a seeded ``limit`` of them at most."""
    flat = np.asarray(tokens, dtype=np.float32).reshape(-1, tokens.shape[-1])
    if len(flat) > limit:
        flat = flat[np.sort(np.random.default_rng([seed, 1]).choice(len(flat), limit, replace=False))]
    return flat


def sample_tokens(tokens: np.ndarray, seed: int = 0, limit: int = MAX_FIT_TOKENS) -> np.ndarray:
    """The token sample (M, D) of a split's token array (n, N, D) (a memmap is read at the sampled images only):
    the same tokens a fit without a token cache computes for those images."""
    return thin_tokens(tokens[sample_images(tokens.shape[0], tokens.shape[1], seed, limit)], seed, limit)
