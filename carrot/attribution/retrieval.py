"""Attribution at scale: FAISS retrieves the top-M kernel neighbours, exact beta scores them.

Contributions are beta_ic <g_i - mu, g_x - mu>; the candidates are the M training images with the
largest and the M with the most negative kernel value (two inner-product searches), scored exactly,
and the top-K of the candidates returned. It equals the exact top-K whenever the exact top-K lie in
the candidates; :func:`recall_at_k` measures how often they do.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu and gpus == 0:
            raise CarrotError("use_gpu: a GPU index was requested but this FAISS build sees no GPU (faiss-cpu, or no CUDA device)")
        if use_gpu or (use_gpu is None and gpus > 0):
            index = faiss.index_cpu_to_all_gpus(index)
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


def exact_top_k(head: RidgeHead, G_train: ArrayLike, G_test: ArrayLike, classes: np.ndarray, k: int) -> np.ndarray:
    """Reference: exact top-k supporters by full kernel product, (q, k)."""
    K = centred_kernel(head, G_train, G_test)
    contrib = K * head.dual_coef_.T[torch.as_tensor(classes)]
    return torch.topk(contrib, k, dim=1).indices.numpy()


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found by the approximate top-k."""
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))
