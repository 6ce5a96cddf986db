"""Attribution at scale: FAISS retrieves the top-M kernel neighbours, exact beta scores them.

Contributions are beta_ic <g_i - mu, g_x - mu>; the candidates are the M training images with the
largest and the M with the most negative kernel value (two inner-product searches), scored exactly,
and the top-K of the candidates returned. It equals the exact top-K whenever the exact top-K lie in
the candidates; :func:`recall_at_k` measures how often they do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from carrot.attribution.representer import centred_kernel
from carrot.errors import CarrotError, check_is_fitted
from carrot.ridge.head import RidgeHead
from carrot.validation import ArrayLike, as_float64_matrix


@dataclass
class KernelIndex:
    """FAISS inner-product index over centred training embeddings of a fitted head."""

    head: RidgeHead
    index: object
    train_centred: torch.Tensor  # (n, D) float64, for exact scoring of the candidates

    @property
    def n(self) -> int:
        return int(self.train_centred.shape[0])

    @classmethod
    def build(cls, head: RidgeHead, G_train: ArrayLike, kind: str = "flat", nlist: int = 256, nprobe: int = 16,
              use_gpu: bool | None = None) -> "KernelIndex":
        """``kind``: 'flat' (exact search) or 'ivf' (inverted lists, ``nlist`` cells, ``nprobe`` probed)."""
        try:
            import faiss
        except ImportError:
            raise CarrotError("FAISS is not installed; pip install faiss-cpu (or faiss-gpu)") from None
        check_is_fitted(head)
        Xc = as_float64_matrix(G_train, "G_train") - head.feature_mean_
        X = Xc.numpy().astype(np.float32)
        n, d = X.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            if not 1 <= nlist <= n:
                raise CarrotError(f"nlist: expected 1..{n} (training size), got {nlist}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(X)
            index.nprobe = nprobe
        else:
            raise CarrotError(f"index kind: expected 'flat' or 'ivf', got {kind!r}")
        index = on_gpus(faiss, index, use_gpu)
        index.add(X)
        return cls(head, index, Xc)

    def top_k(self, G_test: ArrayLike, classes: np.ndarray, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k supporting training indices and their exact contributions for each test row's class: (q, k)."""
        if not 1 <= k <= m <= self.n:
            raise CarrotError(f"k, m: expected 1 <= k <= m <= {self.n}, got k={k}, m={m}")
        Gq = as_float64_matrix(G_test, "G_test") - self.head.feature_mean_
        Q = Gq.numpy().astype(np.float32)  # the search runs in float32; candidates are scored in float64
        _, pos = self.index.search(Q, m)
        _, neg = self.index.search(-Q, m)
        cand = np.concatenate([pos, neg], axis=1)
        cand_t = torch.as_tensor(np.where(cand < 0, 0, cand))
        Gc = self.train_centred
        kern = torch.einsum("qd,qmd->qm", Gq, Gc[cand_t])
        beta = self.head.dual_coef_[cand_t, torch.as_tensor(classes).unsqueeze(1)]
        contrib = torch.where(torch.as_tensor(cand) < 0, torch.tensor(-torch.inf, dtype=torch.float64), kern * beta)
        # a training index can appear in both lists: keep the first occurrence only
        order = torch.argsort(contrib, dim=1, descending=True)
        idx_sorted = torch.gather(cand_t, 1, order)
        val_sorted = torch.gather(contrib, 1, order)
        out_i, out_v = np.zeros((len(Q), k), dtype=np.int64), np.zeros((len(Q), k))
        for r in range(len(Q)):
            _, first = np.unique(idx_sorted[r].numpy(), return_index=True)
            keep = np.sort(first)[:k]
            out_i[r], out_v[r] = idx_sorted[r, keep].numpy(), val_sorted[r, keep].numpy()
        return out_i, out_v


def on_gpus(faiss: Any, index: Any, use_gpu: bool | None) -> Any:
    """``index`` on every GPU FAISS sees when ``use_gpu`` (None: when it sees one), else as it is; refused by name when
    a GPU is asked for and none is seen."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and gpus == 0:
        raise CarrotError("use_gpu: a GPU index was requested but this FAISS build sees no GPU (faiss-cpu, or no CUDA device)")
    return faiss.index_cpu_to_all_gpus(index) if use_gpu or (use_gpu is None and gpus > 0) else index


def exact_top_k(head: RidgeHead, G_train: ArrayLike, G_test: ArrayLike, classes: np.ndarray, k: int) -> np.ndarray:
    """Reference: exact top-k supporters by full kernel product, (q, k)."""
    K = centred_kernel(head, G_train, G_test)
    contrib = K * head.dual_coef_.T[torch.as_tensor(classes)]
    return torch.topk(contrib, k, dim=1).indices.numpy()


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found by the approximate top-k."""
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


@dataclass
class SimilarIndex:
    """The training images nearest to any image by a fitted head's own similarity (``head.affinity``: the centred
    embedding for the ridge head, the kernel for the kernel head), through a FAISS index over ``head.search_space``
    built once: candidates found in float32, re-scored exactly in float64. Exact search ('flat') below
    :data:`IVF_ABOVE` training images, inverted lists above (GPU where FAISS sees one); without FAISS, an exact
    product in torch. :func:`recall_at_k` against ``kind='flat'`` measures what 'ivf' misses."""

    head: object
    G_train: np.ndarray
    index: object | None
    kind: str

    @classmethod
    def build(cls, head: object, G_train: ArrayLike, kind: str = "auto", nprobe: int = 32,
              use_gpu: bool | None = None) -> "SimilarIndex":
        """``kind``: 'auto', 'flat' (exact), 'ivf' (4 sqrt(n) lists, ``nprobe`` probed) or 'torch' (no FAISS)."""
        G = np.asarray(G_train, dtype=np.float64)
        n = len(G)
        if kind not in ("auto", "flat", "ivf", "torch"):
            raise CarrotError(f"index kind: expected 'auto', 'flat', 'ivf' or 'torch', got {kind!r}")
        try:
            import faiss
        except ImportError:
            if kind in ("flat", "ivf"):
                raise CarrotError("FAISS is not installed; pip install faiss-cpu (or faiss-gpu)") from None
            return cls(head, G, None, "torch")
        if kind == "torch":
            return cls(head, G, None, "torch")
        kind = kind if kind != "auto" else ("ivf" if n > IVF_ABOVE else "flat")
        X, metric = head.search_space(G)
        d = X.shape[1]
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        flat = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        if kind == "flat":
            index = flat
        else:
            index = faiss.IndexIVFFlat(flat, d, max(1, min(n, int(4 * np.sqrt(n)))), faiss_metric)
            index.train(X)
            index.nprobe = nprobe
        index = on_gpus(faiss, index, use_gpu)
        index.add(X)
        return cls(head, G, index, kind)

    @property
    def n(self) -> int:
        return len(self.G_train)

    def search(self, G: ArrayLike, k: int, candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar training images to each row of G (m, D), most similar first: indices (m, k) and the
        head's exact similarity (m, k). ``candidates``: how many FAISS returns before the exact re-scoring (default
        max(4k, 32))."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
            raise CarrotError(f"k: expected 1..{self.n} (training images), got {k!r}")
        G = as_float64_matrix(G, "G")
        if self.index is None:
            S = torch.cat([self.head.affinity(G, self.G_train[s : s + 8192]) for s in range(0, self.n, 8192)], 1)
            val, idx = torch.topk(S, k, dim=1)
            return idx.numpy(), val.numpy()
        M = min(self.n, candidates or max(4 * k, 32))
        X, _ = self.head.search_space(G)
        _, cand = self.index.search(X, M)
        out_i, out_v = np.zeros((len(G), k), dtype=np.int64), np.full((len(G), k), -np.inf)
        for r in range(len(G)):
            c = cand[r][cand[r] >= 0]
            s = self.head.affinity(G[r : r + 1], self.G_train[c])[0]
            top = torch.topk(s, min(k, len(c))).indices.numpy()
            out_i[r, : len(top)], out_v[r, : len(top)] = c[top], s.numpy()[top]
        return out_i, out_v


IVF_ABOVE = 50_000  # training images above which SimilarIndex(kind='auto') uses inverted lists instead of exact search
