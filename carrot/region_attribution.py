"""Region attribution beyond the exact linear split: node removal and deletion / insertion curves.

Removing regions S deletes those nodes from the graph (bandwidths kept at the full graph's values,
so the kernel of the remaining nodes is unchanged), re-runs diffusion on the smaller graph and
mean-reads out the remaining nodes; the logit drop is f_c(full) - f_c(without S) (the seed's
"remove node -> logit drop"). User segments come as an integer mask mapped onto the patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import DiffusionConfig, GraphConfig
from .diffusion import diffusion_weights
from .errors import CarrotError
from .graph import affinity, normalized_laplacian, pairwise_sq_dists, resolve_bandwidth
from .head import RidgeHead
from .readout import weighted_readout


def bandwidths(H: torch.Tensor, P: torch.Tensor, graph: GraphConfig) -> tuple[float, float]:
    """The (sigma_space, sigma_feat) the full graph of one image (N, D), (N, 2) uses."""
    def pick(v, X, name):
        return float(resolve_bandwidth(v, pairwise_sq_dists(X.to(torch.float64).unsqueeze(0)), name)[0])

    return pick(graph.sigma_space, P, "sigma_space"), pick(graph.sigma_feat, H, "sigma_feat")


def embed_kept(H: torch.Tensor, P: torch.Tensor, keep: torch.Tensor, graph: GraphConfig, diffusion: DiffusionConfig,
               sigmas: tuple[float, float]) -> torch.Tensor:
    """Embedding g (D,) of the graph restricted to the nodes where ``keep`` (N,) is True."""
    Hk, Pk = H[keep].to(torch.float64), P[keep].to(torch.float64)
    if Hk.shape[0] == 0:
        raise CarrotError("region removal: at least one region must remain")
    if diffusion.t == 0 or Hk.shape[0] == 1:
        return Hk.mean(0)
    knn = graph.knn if graph.knn is None or graph.knn < Hk.shape[0] - 1 else None
    L = normalized_laplacian(affinity(Hk.unsqueeze(0), Pk, sigmas[0], sigmas[1], knn))
    w = diffusion_weights(L, [diffusion.t], diffusion.method)[0]
    return weighted_readout(Hk.unsqueeze(0), w)[0]


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


def node_removal(head: RidgeHead, H: torch.Tensor, P: torch.Tensor, c: int, graph: GraphConfig,
                 diffusion: DiffusionConfig, groups: np.ndarray | None = None) -> dict[int, float]:
    """Logit drop f_c(full) - f_c(without group) for every group (default: every single region)."""
    n = H.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise CarrotError(f"groups: expected one id per region ({n}), got shape {groups.shape}")
    sig = bandwidths(H, P, graph)
    full = _logit(head, embed_kept(H, P, torch.ones(n, dtype=torch.bool), graph, diffusion, sig), c)
    out = {}
    for gid in np.unique(groups):
        keep = torch.as_tensor(groups != gid)
        out[int(gid)] = full - _logit(head, embed_kept(H, P, keep, graph, diffusion, sig), c) if keep.any() else float("nan")
    return out


@dataclass
class Curve:
    fractions: np.ndarray  # share of regions removed (deletion) or present (insertion)
    logits: np.ndarray
    auc: float  # trapezoid area under logits vs fraction


def deletion_insertion(head: RidgeHead, H: torch.Tensor, P: torch.Tensor, c: int, order: Sequence[int],
                       graph: GraphConfig, diffusion: DiffusionConfig, steps: int = 16) -> tuple[Curve, Curve]:
    """Deletion (remove regions in ``order``, most important first) and insertion (add them in that
    order) curves of logit c, each at ``steps`` + 1 evenly spaced fractions."""
    n = H.shape[0]
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise CarrotError(f"order: expected a permutation of the {n} regions")
    sig = bandwidths(H, P, graph)
    ks = np.unique(np.linspace(0, n, steps + 1).round().astype(int))
    dele, ins = [], []
    for k in ks:
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.as_tensor(order[:k])] = False
        dele.append(_logit(head, embed_kept(H, P, keep, graph, diffusion, sig), c) if keep.any() else np.nan)
        kin = ~keep
        ins.append(_logit(head, embed_kept(H, P, kin, graph, diffusion, sig), c) if kin.any() else np.nan)
    frac = ks / n
    # the empty graph has no embedding: its logit is the prior (the prediction from no evidence)
    prior = float(head.prior_[c])
    d, i = np.nan_to_num(np.array(dele), nan=prior), np.nan_to_num(np.array(ins), nan=prior)
    return Curve(frac, d, float(np.trapezoid(d, frac))), Curve(frac, i, float(np.trapezoid(i, frac)))


def _logit(head: RidgeHead, g: torch.Tensor, c: int) -> float:
    return float(head.decision_function(g.unsqueeze(0).numpy())[0, c])


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
