"""Region attribution beyond the exact linear split: node removal and deletion / insertion curves.

Removing regions S deletes those nodes from the graph (bandwidths kept at the full graph's values,
so the kernel of the remaining nodes is unchanged), re-runs diffusion on the smaller graph and
mean-reads out the remaining nodes; the logit drop is f_c(full) - f_c(without S) (the seed's
"remove node -> logit drop"). User segments come as an integer mask mapped onto the patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from carrot.embed.embedder import Embedder
from carrot.errors import CarrotError


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Integer segment mask (H, W), already in the model's input geometry -> segment id per patch (N,).

    Each patch takes the segment covering most of its cell.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise CarrotError(f"region mask: expected a 2-D integer array, got {mask.dtype} with shape {mask.shape}")
    gh, gw = grid
    if mask.shape[0] < gh or mask.shape[1] < gw:
        raise CarrotError(f"region mask: {mask.shape} is smaller than the {gh}x{gw} patch grid")
    ys = np.linspace(0, mask.shape[0], gh + 1).astype(int)
    xs = np.linspace(0, mask.shape[1], gw + 1).astype(int)
    out = np.empty(gh * gw, dtype=np.int64)
    for i in range(gh):
        for j in range(gw):
            vals, counts = np.unique(mask[ys[i] : ys[i + 1], xs[j] : xs[j + 1]], return_counts=True)
            out[i * gw + j] = vals[np.argmax(counts)]
    return out


def segment_sum(contributions: np.ndarray, segments: np.ndarray) -> dict[int, float]:
    """Exact per-segment contribution: sum of the region contributions of each segment's patches."""
    return {int(s): float(contributions[segments == s].sum()) for s in np.unique(segments)}


def node_removal(head: Any, H: torch.Tensor, P: torch.Tensor, c: int, embedder: Embedder,
                 groups: np.ndarray | None = None, globals: torch.Tensor | None = None) -> dict[int, float]:
    """Logit drop f_c(full) - f_c(without group) for every group (default: every single region) of a fitted head of
    any kind; ``globals``
    (G, D'): the image's global tokens when the embedding reads them (they stay)."""
    n = H.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise CarrotError(f"groups: expected one id per region ({n}), got shape {groups.shape}")
    ids = np.unique(groups)
    keep = torch.as_tensor(np.stack([np.ones(n, dtype=bool)] + [groups != g for g in ids]))
    nonempty = keep.any(1)
    kept = embedder.embed_kept(H, P, keep[nonempty], globals=globals)
    G = torch.zeros(len(keep), kept.shape[1], dtype=torch.float64)
    G[nonempty] = kept
    logits = _logits(head, G, c)
    return {int(g): float(logits[0] - logits[1 + j]) if nonempty[1 + j] else float("nan") for j, g in enumerate(ids)}


@dataclass
class Curve:
    fractions: np.ndarray  # share of regions removed (deletion) or present (insertion)
    logits: np.ndarray
    auc: float  # trapezoid area under logits vs fraction


def deletion_insertion(head: Any, H: torch.Tensor, P: torch.Tensor, c: int, order: Sequence[int],
                       embedder: Embedder, steps: int = 16, globals: torch.Tensor | None = None) -> tuple[Curve, Curve]:
    """Deletion (remove regions in ``order``, most important first) and insertion (add them in that
    order) curves of logit c, each at ``steps`` + 1 evenly spaced fractions (``globals``: as :func:`node_removal`)."""
    n = H.shape[0]
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise CarrotError(f"order: expected a permutation of the {n} regions")
    ks = np.unique(np.linspace(0, n, steps + 1).round().astype(int))
    removed = torch.zeros(len(ks), n, dtype=torch.bool)
    for r, k in enumerate(ks):
        removed[r, torch.as_tensor(order[:k], dtype=torch.long)] = True
    # the empty graph has no embedding: its logit is the prior (the prediction from no evidence)
    prior = float(head.prior_[c])
    curves = []
    for keep in (~removed, removed):
        vals = np.full(len(ks), prior)
        some = keep.any(1)
        vals[some.numpy()] = _logits(head, embedder.embed_kept(H, P, keep[some], globals=globals), c)
        curves.append(vals)
    frac = ks / n
    return tuple(Curve(frac, v, float(np.trapezoid(v, frac))) for v in curves)


def _logits(head: Any, G: torch.Tensor, c: int) -> np.ndarray:
    return head.decision_function(G.numpy())[:, c]


def to_input_coords(points: np.ndarray, image_size: tuple[int, int], transform) -> np.ndarray:
    """Map (x, y) pixel points of an original image through the display geometry (timm's Resize then
    CenterCrop) to pixels of the model input; points (k, 2) -> (k, 2)."""
    from torchvision import transforms as T

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
    w, h = image_size
    for step in transform.transforms:
        if isinstance(step, T.Resize):
            size = step.size
            if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
                s = size if isinstance(size, int) else size[0]
                scale = s / min(w, h)
                nw, nh = w * scale, h * scale
            else:
                nh, nw = size
            pts *= (nw / w, nh / h)
            w, h = nw, nh
        elif isinstance(step, T.CenterCrop):
            ch, cw = step.size if isinstance(step.size, (list, tuple)) else (step.size, step.size)
            pts -= ((w - cw) / 2, (h - ch) / 2)
            w, h = cw, ch
    return pts


def pointing_game(contributions: np.ndarray, box: tuple[float, float, float, float], input_size: tuple[int, int]) -> bool:
    """Hit when the centre of the most positive region lies in ``box`` (x0, y0, x1, y1, model-input
    pixels) widened by half a region on each side (the grid's own resolution)."""
    r = np.asarray(contributions, dtype=np.float64)
    gh, gw = r.shape
    W, H = input_size
    i, j = np.unravel_index(int(np.argmax(r)), r.shape)
    cx, cy = (j + 0.5) * W / gw, (i + 0.5) * H / gh
    x0, y0, x1, y1 = box
    tx, ty = W / gw / 2, H / gh / 2
    return bool(x0 - tx <= cx <= x1 + tx and y0 - ty <= cy <= y1 + ty)
