"""Region maps faithful to the pixels: exact cell occlusion through the whole model, and the pixel
deletion / insertion protocol every map is measured by.

A *cell* is one region of the backbone's grid in input pixels: a ViT patch (14 x 14 px for DINOv2 at
224), a ConvNet's feature cell (32 x 32 px for EfficientNet-Lite0). Occluding a set of cells replaces
their pixels by those of the Gaussian-blurred image. Three maps are exact for the pixels:

- *Shapley* (:func:`shapley_map`, the default): each cell's Shapley value in the game "blur a set of cells",
  sampled over random orders in antithetic pairs; the values sum to f_c(x) - f_c(blurred x) exactly for any
  number of orders, and each cell's standard error is reported;
- the *pixel split* (:func:`path_split`): the cells' shares of f_c(x) - f_c(blurred x), the whole model's gradient
  integrated along the path from the blurred image (equal to Captum's IntegratedGradients with that baseline;
  they sum to the difference up to a reported quadrature error);
- *occlusion* (:func:`occlusion_map`): f_c(x) - f_c(x with cell j blurred), each an exact re-run of the whole
  model, backbone included (a counterfactual per cell; the drops do not add up).

The token split (:func:`carrot.attribution.representer.region_contributions`) is exact for the tokens, but a ViT
token is computed from the whole image, so it does not say which pixels matter.

The protocol (deletion / insertion, Petsiuk et al. 2018, "RISE"): cells are blurred (deletion) or revealed
onto the blurred image (insertion) in map order over ``steps`` steps, the model re-run at each step; the
curve of the logit, scaled so that the image is 1 and the blurred image 0, is integrated over the share
of cells, and pooled over images weighted by how much blurring changes each one's logit (:func:`pooled`;
images whose blurred version scores the class at least as high are left out and counted). Lower deletion and higher insertion AUC mean a map more faithful to the pixels; a random order
gives about 0.5 for both.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError
from carrot.progress import bar

PIXEL_MAPS = ("shapley", "split")  # the pixel maps explain can draw (Carrot.pixel_map); their words: carrot.report.explanation

Logits = Callable[[torch.Tensor], np.ndarray]  # (B, 3, H, W) model input -> (B, C) float64 logits


def cell_boxes(grid: tuple[int, int], size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The pixel box (y0, y1, x0, x1) of each cell of a ``grid`` (gh, gw) over an input of ``size`` (H, W), in
    row-major order (the order of the backbone's tokens); edges at round(k H / gh)."""
    gh, gw = grid
    H, W = size
    if not (0 < gh <= H and 0 < gw <= W):
        raise CarrotError(f"grid: expected 1..{H} x 1..{W} cells for a {H}x{W} input, got {gh}x{gw}")
    ys = np.linspace(0, H, gh + 1).round().astype(int)
    xs = np.linspace(0, W, gw + 1).round().astype(int)
    return [(int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1])) for i in range(gh) for j in range(gw)]


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of model inputs (B, 3, H, W) or (3, H, W) with standard deviation ``sigma`` px (reflect
    padding; linear, so blurring the normalised input equals normalising the blurred image)."""
    from torchvision.transforms.functional import gaussian_blur

    H, W = x.shape[-2:]
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(H, W) - 1) // 2) + 1)
    return gaussian_blur(x, [k, k], [float(sigma), float(sigma)])


def removed_masks(order: np.ndarray, counts: Sequence[int], boxes: list[tuple[int, int, int, int]],
                  size: tuple[int, int]) -> torch.Tensor:
    """(len(counts), 1, H, W) masks, 1 on the pixels of the first ``k`` cells of ``order`` for each k in counts."""
    out = torch.zeros(len(counts), 1, *size)
    for r, k in enumerate(counts):
        for j in order[:k]:
            y0, y1, x0, x1 = boxes[int(j)]
            out[r, :, y0:y1, x0:x1] = 1.0
    return out


def _batched(logits: Logits, x: torch.Tensor, batch: int, desc: str = "") -> np.ndarray:
    """The logits of inputs x (B, ...) ``batch`` at a time; with ``desc``, a progress bar over the runs."""
    out = []
    with bar(total=len(x), desc=desc, unit="run", disable=not desc) as runs:
        for s in range(0, len(x), batch):
            out.append(logits(x[s : s + batch]))
            runs.update(len(x[s : s + batch]))
    return np.concatenate(out)


def occlusion_map(logits: Logits, x: torch.Tensor, c: int, grid: tuple[int, int], sigma: float | None = None,
                  batch: int = 32) -> np.ndarray:
    """Exact cell occlusion of one image: f_c(x) - f_c(x with cell j blurred) for every cell j.

    Parameters
    ----------
    logits : the whole model, (B, 3, H, W) input -> (B, C) logits.
    x : (3, H, W) one model input.
    c : the class whose logit is explained.
    grid : (gh, gw) the backbone's cell grid.
    sigma : blur standard deviation in px (default: one cell's side).
    batch : images per forward pass.

    Returns
    -------
    (gh, gw) float64: the logit drop of blurring each cell alone (N + 1 forward passes).
    """
    size = tuple(x.shape[-2:])
    boxes = cell_boxes(grid, size)
    sigma = sigma if sigma is not None else default_sigma(grid, size)
    xb = blur(x[None], sigma)[0]
    masks = torch.zeros(len(boxes), 1, *size)
    for j, (y0, y1, x0, x1) in enumerate(boxes):  # mask j holds cell j only
        masks[j, :, y0:y1, x0:x1] = 1.0
    inputs = torch.cat([x[None], x[None] * (1 - masks) + xb[None] * masks])
    out = _batched(logits, inputs, batch, desc="occlusion map")[:, c]
    return (out[0] - out[1:]).reshape(grid)


def _pair_values(vals: np.ndarray, orders: list[np.ndarray]) -> np.ndarray:
    """Each antithetic pair's estimate of every cell's Shapley value (K / 2, N), from the logits along the orders
    (``vals[k, r]``: order k with its first r cells blurred)."""
    n = vals.shape[1] - 1
    phi = np.empty((len(vals), n))
    for k, p in enumerate(orders[: len(vals)]):
        phi[k, p] = vals[k, :-1] - vals[k, 1:]
    return (phi[0::2] + phi[1::2]) / 2


def _typical_sem(vals: np.ndarray, orders: list[np.ndarray]) -> float:
    """The root-mean-square over cells of the estimates' standard error, from the pairs complete so far."""
    pairs = _pair_values(vals, orders)
    return float(np.sqrt(np.mean(pairs.var(0, ddof=1) / len(pairs))))


def cell_blocks(grid: tuple[int, int], block: int) -> np.ndarray:
    """The block (b x b cells, row-major; edge blocks smaller) each cell of a ``grid`` (gh, gw) belongs to, (N,)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise CarrotError(f"block: expected an integer >= 1 (cells per block side), got {block!r}")
    gh, gw = grid
    i, j = np.divmod(np.arange(gh * gw), gw)
    return (i // block) * (-(-gw // block)) + j // block


def shapley_map(logits: Logits, x: torch.Tensor, c: int, grid: tuple[int, int], permutations: int = 4,
                sigma: float | None = None, batch: int = 32, seed: int = 0,
                block: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Shapley values of the cells in the deletion game v(S) = f_c(x) - f_c(x with the cells S blurred), sampled
    over ``permutations`` random orders in antithetic pairs (each order and its reverse; Castro et al. 2009,
    Mitchell et al. 2022). Each order's marginal drops telescope to f_c(x) - f_c(blurred x), so the map sums to it
    exactly for any number of orders (efficiency); for a model additive over the cells it equals occlusion.

    Parameters
    ----------
    logits : the whole model, (B, 3, H, W) input -> (B, C) logits.
    x : (3, H, W) one model input; c : the class; grid : (gh, gw) the backbone's cell grid.
    permutations : even number of sampled orders (K); cost K (P - 1) + 2 forward passes for P players.
    sigma : blur standard deviation in px (default: one cell's side); batch : images per pass.
    seed : with the image's bytes, seeds the orders (reproducible per image, independent across images).
    block : the players are blocks of block x block cells (:func:`cell_blocks`; 1: every cell, P = N); a block's
        Shapley value is split evenly over its cells, so the map still sums to f_c(x) - f_c(blurred x) exactly.

    Returns
    -------
    (gh, gw) float64 Shapley estimates summing to f_c(x) - f_c(blurred x); and {"full", "blurred",
    "completeness_error" (|sum - (f_c(x) - f_c(blurred x))|, floating point only), "permutations", "sem" ((gh, gw)
    standard error of each cell's estimate over the K / 2 antithetic pairs; nan for one pair)}.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 2 or permutations % 2:
        raise CarrotError(f"permutations: expected an even integer >= 2 (antithetic pairs), got {permutations!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CarrotError(f"batch: expected an integer >= 1, got {batch!r}")
    size = tuple(x.shape[-2:])
    boxes = cell_boxes(grid, size)
    owner = cell_blocks(grid, block)
    n = int(owner.max()) + 1  # players
    sigma = sigma if sigma is not None else default_sigma(grid, size)
    xb = blur(x[None], sigma)[0]
    cell = torch.empty(size, dtype=torch.long, device=x.device)  # the player each pixel belongs to
    for j, (y0, y1, x0, x1) in enumerate(boxes):
        cell[y0:y1, x0:x1] = int(owner[j])
    # the orders depend on the seed and the image, so sampling errors are independent across images
    rng = np.random.default_rng([seed, zlib.crc32(x.detach().cpu().contiguous().numpy().tobytes())])
    orders = []
    for _ in range(permutations // 2):
        p = rng.permutation(n)
        orders += [p, p[::-1].copy()]
    ranks = torch.empty(permutations, n, dtype=torch.long, device=x.device)
    for k, p in enumerate(orders):
        ranks[k, torch.as_tensor(p, device=x.device)] = torch.arange(n, device=x.device)
    ends = np.asarray(logits(torch.stack([x, xb])), dtype=np.float64)[:, c]
    vals = np.full((permutations, n + 1), np.nan)  # vals[k, r]: logit with the first r cells of order k blurred
    vals[:, 0], vals[:, n] = ends
    jobs = [(k, r) for k in range(permutations) for r in range(1, n)]  # order by order: pairs complete in turn
    with bar(total=len(jobs) + 2, initial=2, desc="pixel map (Shapley)", unit="run") as runs:
        for s in range(0, len(jobs), batch):
            chunk = jobs[s : s + batch]
            m = torch.stack([ranks[k][cell] < r for k, r in chunk])[:, None].to(x.dtype)
            out = np.asarray(logits(x[None] * (1 - m) + xb[None] * m), dtype=np.float64)[:, c]
            for (k, r), v in zip(chunk, out):
                vals[k, r] = v
            runs.update(len(chunk))
            done = (chunk[-1][0] + (chunk[-1][1] == n - 1)) // 2  # antithetic pairs complete so far
            if done >= 2:
                runs.set_postfix(pairs=f"{done}/{permutations // 2}", se=f"{_typical_sem(vals[: 2 * done], orders):.2g}")
    pairs = _pair_values(vals, orders)
    share = np.bincount(owner, minlength=n)[owner]  # cells in each cell's block
    est = pairs.mean(0)[owner] / share
    sem = (pairs.std(0, ddof=1) / np.sqrt(len(pairs)))[owner] / share if len(pairs) > 1 else np.full(len(owner), np.nan)
    info = {"full": float(ends[0]), "blurred": float(ends[1]), "permutations": permutations, "block": block,
            "completeness_error": float(abs(est.sum() - (ends[0] - ends[1]))), "sem": sem.reshape(grid)}
    return est.reshape(grid), info


def path_split(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, c: int, grid: tuple[int, int],
               sigma: float | None = None, nodes: int = 32, batch: int = 8) -> tuple[np.ndarray, dict[str, float]]:
    """Split f_c(x) - f_c(blurred x) over the cells: the gradient of the whole model integrated along the straight
    path from the blurred image to the image (Gauss-Legendre quadrature, ``nodes`` nodes), times the pixel change,
    summed per cell (path-integrated gradients, Sundararajan et al. 2017; the blurred image as baseline).

    Parameters
    ----------
    logits : the whole model with autograd, (B, 3, H, W) input -> (B, C) float64 tensor.
    x : (3, H, W) one model input; c : the class; grid : (gh, gw) the backbone's cell grid.
    sigma : blur standard deviation in px (default: one cell's side); nodes : quadrature nodes; batch : per pass.

    Returns
    -------
    (gh, gw) float64 cell shares, which sum to f_c(x) - f_c(blurred x) up to the quadrature error; and
    {"full", "blurred", "completeness_error"} (|sum of the shares - (f_c(x) - f_c(blurred x))|).
    """
    size = tuple(x.shape[-2:])
    sigma = sigma if sigma is not None else default_sigma(grid, size)
    xb = blur(x[None], sigma)[0]
    d = (x - xb).to(torch.float32)
    a, wts = np.polynomial.legendre.leggauss(int(nodes))
    a, wts = (a + 1) / 2, wts / 2
    grad = torch.zeros_like(x, dtype=torch.float64)
    for s in bar(range(0, len(a), batch), desc="pixel map (path split)", unit="batch"):
        alpha = torch.as_tensor(a[s : s + batch], dtype=torch.float32).view(-1, 1, 1, 1)
        inp = (xb[None] + alpha * d[None]).detach().requires_grad_(True)
        out = logits(inp)[:, c]
        g = torch.autograd.grad(out.sum(), inp)[0].to(torch.float64)
        grad += (torch.as_tensor(wts[s : s + batch]).view(-1, 1, 1, 1) * g).sum(0)
    share = (grad * d.to(torch.float64)).sum(0).numpy()
    cells = np.array([share[y0:y1, x0:x1].sum() for y0, y1, x0, x1 in cell_boxes(grid, size)])
    with torch.no_grad():
        ends = logits(torch.stack([x, xb]))[:, c].detach().cpu().numpy()
    info = {"full": float(ends[0]), "blurred": float(ends[1]),
            "completeness_error": float(abs(cells.sum() - (ends[0] - ends[1])))}
    return cells.reshape(grid), info


def default_sigma(grid: tuple[int, int], size: tuple[int, int]) -> float:
    """The protocol's blur: one cell's side (px), so a blurred cell keeps none of its own detail."""
    return float(max(size[0] / grid[0], size[1] / grid[1]))


def deletable(full: float, blurred: float) -> bool:
    """Whether blurring the whole image lowers the logit (f_c(x) - f_c(blurred x) > 0 beyond rounding): an image
    where it does not has nothing to delete, and every map's AUC is nan (left out of the pooled numbers)."""
    return bool(full - blurred > 1e-9 * max(1.0, abs(full)))


def blur_ends(logits: Logits, x: torch.Tensor, c: int, grid: tuple[int, int], sigma: float | None = None) -> tuple[float, float]:
    """(f_c(x), f_c(blurred x)) of one image (3, H, W): the two ends of every deletion curve (2 forward passes)."""
    size = tuple(x.shape[-2:])
    sigma = sigma if sigma is not None else default_sigma(grid, size)
    out = np.asarray(logits(torch.stack([x, blur(x[None], sigma)[0]])), dtype=np.float64)[:, c]
    return float(out[0]), float(out[1])


@dataclass
class PixelCurves:
    """Deletion and insertion of one image in one map's order."""

    fractions: np.ndarray  # (S,) share of cells blurred (deletion) or revealed (insertion)
    deletion: np.ndarray  # (S,) logit of class c
    insertion: np.ndarray  # (S,)
    full: float  # f_c(x)
    blurred: float  # f_c(blurred x)

    @property
    def span(self) -> float:
        """f_c(x) - f_c(blurred x): how much blurring the whole image changes the logit (the pooling weight)."""
        return self.full - self.blurred

    def auc(self, which: str) -> float:
        """Area under the curve scaled to 1 at the image and 0 at the blurred image; nan where the blurred image
        scores the class as high as the image (nothing to delete: the image is left out of the means)."""
        if not deletable(self.full, self.blurred):
            return float("nan")
        v = (getattr(self, which) - self.blurred) / (self.full - self.blurred)
        return float(np.trapezoid(v, self.fractions))


def pixel_curves(logits: Logits, x: torch.Tensor, c: int, grid: tuple[int, int], order: Sequence[int],
                 steps: int = 16, sigma: float | None = None, batch: int = 34) -> PixelCurves:
    """Deletion and insertion of one image (3, H, W) in ``order`` (cell indices, most important first) over
    ``steps`` steps: 2 (steps + 1) forward passes of the whole model."""
    size = tuple(x.shape[-2:])
    boxes = cell_boxes(grid, size)
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(len(boxes))):
        raise CarrotError(f"order: expected a permutation of the {len(boxes)} cells")
    if not isinstance(steps, int) or steps < 1:
        raise CarrotError(f"steps: expected an integer >= 1, got {steps!r}")
    sigma = sigma if sigma is not None else default_sigma(grid, size)
    xb = blur(x[None], sigma)[0]
    counts = np.unique(np.linspace(0, len(boxes), steps + 1).round().astype(int))
    m = removed_masks(order, counts.tolist(), boxes, size)
    deleted = x[None] * (1 - m) + xb[None] * m
    inserted = xb[None] * (1 - m) + x[None] * m
    out = _batched(logits, torch.cat([deleted, inserted]), batch)[:, c]
    k = len(counts)
    return PixelCurves(counts / len(boxes), out[:k], out[k:], float(out[0]), float(out[k]))


def pooled(values: Sequence[float], spans: Sequence[float], seed: int = 0, resamples: int = 2000) -> dict[str, float]:
    """The protocol's number over images: sum_i span_i auc_i / sum_i span_i, span_i = f_c(x_i) - f_c(blurred x_i),
    so each image weighs by how much blurring changes its logit (an image whose logit barely moves would
    otherwise dominate with a huge scaled curve; the graph-side deletion audit pools the same way); its standard
    error from ``resamples`` bootstrap resamples of the images. Images with span <= 0 are left out and counted."""
    v, w = np.asarray(values, dtype=np.float64), np.asarray(spans, dtype=np.float64)
    keep = np.isfinite(v) & (w > 0)
    v, w = v[keep], w[keep]
    if not len(v):
        return {"mean": float("nan"), "sem": float("nan"), "n": 0, "left_out": int((~keep).sum())}
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    boot = (w[idx] * v[idx]).sum(1) / w[idx].sum(1)
    return {"mean": float((w * v).sum() / w.sum()), "sem": float(boot.std(ddof=1)) if len(v) > 1 else float("nan"),
            "n": int(len(v)), "left_out": int((~keep).sum())}


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean and standard error of the mean over images; nan values (the blurred image scores the class at least
    as high as the image) are left out and counted in ``left_out``."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()) if len(v) else float("nan"), "sem": sem, "n": int(len(v)),
            "left_out": int(len(values) - len(v))}
