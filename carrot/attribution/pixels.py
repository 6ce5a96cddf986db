"""Region maps faithful to the pixels: exact cell occlusion through the whole model, and the pixel
deletion / insertion protocol every map is measured by.

A *cell* is one region of the backbone's grid in input pixels: a ViT patch (14 x 14 px for DINOv2 at
224), a ConvNet's feature cell (32 x 32 px for EfficientNet-Lite0). Occluding a set of cells replaces
their pixels by those of the Gaussian-blurred image. The occlusion map of cell j is

    f_c(x) - f_c(x with cell j blurred),

each an exact re-run of the whole model, backbone included: the number is what blurring that cell does to
the logit. The token split (:func:`carrot.attribution.representer.region_contributions`) is exact for the
tokens, but a ViT token is computed from the whole image, so it does not say which pixels matter.

The protocol (deletion / insertion, Petsiuk et al. 2018, "RISE"): cells are blurred (deletion) or revealed
onto the blurred image (insertion) in map order over ``steps`` steps, the model re-run at each step; the
curve of the logit, scaled so that the image is 1 and the blurred image 0, is integrated over the share
of cells (images whose blurred version scores the class at least as high are left out and counted). Lower deletion and higher insertion AUC mean a map more faithful to the pixels; a random order
gives about 0.5 for both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from carrot.errors import CarrotError

REGION_MEANING = {
    "pixel_map": "f(x) - f(x with this cell blurred): the logit drop when only this cell's pixels are blurred, the "
                 "whole model re-run (exact for the pixels; the cells' drops do not add up to the logit)",
    "region_contributions": "w_j W_c (h_j - mu/N): the exact split of the logit over the backbone's tokens (they sum "
                            "to logit - prior); a ViT token sees the whole image, so it says which tokens matter, "
                            "not which pixels",
}

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


def _batched(logits: Logits, x: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([logits(x[s : s + batch]) for s in range(0, len(x), batch)])


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
    out = _batched(logits, inputs, batch)[:, c]
    return (out[0] - out[1:]).reshape(grid)


def default_sigma(grid: tuple[int, int], size: tuple[int, int]) -> float:
    """The protocol's blur: one cell's side (px), so a blurred cell keeps none of its own detail."""
    return float(max(size[0] / grid[0], size[1] / grid[1]))


@dataclass
class PixelCurves:
    """Deletion and insertion of one image in one map's order."""

    fractions: np.ndarray  # (S,) share of cells blurred (deletion) or revealed (insertion)
    deletion: np.ndarray  # (S,) logit of class c
    insertion: np.ndarray  # (S,)
    full: float  # f_c(x)
    blurred: float  # f_c(blurred x)

    def auc(self, which: str) -> float:
        """Area under the curve scaled to 1 at the image and 0 at the blurred image; nan where the blurred image
        scores the class as high as the image (nothing to delete: the image is left out of the means)."""
        span = self.full - self.blurred
        if not span > 1e-9 * max(1.0, abs(self.full)):
            return float("nan")
        v = (getattr(self, which) - self.blurred) / span
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


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean and standard error of the mean over images; nan values (the blurred image scores the class at least
    as high as the image) are left out and counted in ``left_out``."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()) if len(v) else float("nan"), "sem": sem, "n": int(len(v)),
            "left_out": int(len(values) - len(v))}
