"""Region maps faithful to the pixels: exact cell removal through the whole model, and the deletion / insertion
protocol every map is measured by.

A *cell* is one region of the backbone's grid in input pixels: a ViT patch (14 x 14 px for DINOv2 at 224), a
ConvNet's feature cell (32 x 32 px for EfficientNet-Lite0). A *removal* takes a set of cells out of the image
(:class:`CellGame`, one of :data:`~carrot.config.REMOVALS`): their pixels blurred, filled with the image's mean colour,
or inpainted from the kept pixels around them, or (ViTs) their tokens dropped so the model never sees them. Each map is exact for the removal it is built on:

- *Shapley* (:func:`shapley_map`, the default): each cell's Shapley value in the game "remove a set of cells",
  sampled over random orders in antithetic pairs; the values sum to f_c(x) - f_c(x with every cell removed) exactly
  for any number of orders, and each cell's standard error is reported;
- the *pixel split* (:func:`path_split`): the cells' shares of f_c(x) - f_c(fill), the whole model's gradient
  integrated along the path from the fill image (blurred or mean colour; equal to Captum's IntegratedGradients with
  that baseline; they sum to the difference up to a reported quadrature error);
- *occlusion* (:func:`occlusion_map`): f_c(x) - f_c(x with cell j removed), each an exact re-run of the whole
  model, backbone included (a counterfactual per cell; the drops do not add up).

The token split (:func:`carrot.attribution.representer.region_contributions`) is exact for the tokens, but a ViT
token is computed from the whole image, so it does not say which pixels matter.

The protocol (deletion / insertion, Petsiuk et al. 2018, "RISE"), under any removal: cells are removed (deletion) or
kept with the rest removed (insertion) in map order over ``steps`` steps, the model re-run at each step. Two
numbers per curve: the raw area under the logit curve (:meth:`PixelCurves.raw_auc`, every image counts), and the
area of the curve scaled so that the image is 1 and the image with every cell removed 0, pooled over images weighted
by how much removal changes each one's logit (:func:`pooled`; images whose fully removed version scores the class at
least as high are left out and counted). Lower deletion and higher insertion AUC mean a map more faithful to the
pixels under that removal; a random order gives about 0.5 for both (scaled). A map is faithful to the removal it is
measured with: score it under several.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from carrot.config import MAX_PLAYERS, REMOVALS
from carrot.errors import CarrotError
from carrot.progress import bar

PIXEL_REMOVALS = tuple(r for r in REMOVALS if r != "drop")  # the removals that change pixels (PixelFill)
SPLIT_REMOVALS = ("blur", "mean")  # the removals whose fill is one image, the end of the pixel split's path

PIXEL_MAPS = ("shapley", "split")  # the pixel maps explain can draw (Carrot.pixel_map); their words: carrot.report.explanation

Logits = Callable[[torch.Tensor], np.ndarray]  # (B, 3, H, W) model input -> (B, C) float64 logits
KeptLogits = Callable[[torch.Tensor, torch.Tensor], np.ndarray]  # inputs (B, 3, H, W), kept cells (B, N) -> (B, C)


class CellGame:
    """One image's game over its cells: ``game(removed)`` is the whole model's logits with the cells ``removed``
    (B, N) bool taken out of the image, in one of the :data:`REMOVALS` ways; every pixel map and the deletion /
    insertion protocol are written against this, so none of them asks how a cell is removed.

    - ``blur``: the cells' pixels are replaced by those of the Gaussian-blurred image (sigma one cell's side);
    - ``mean``: the cells' pixels are replaced by the image's mean colour;
    - ``inpaint``: the cells' pixels are filled in from the kept pixels around them (:func:`inpaint`);
    - ``drop`` (ViTs): the cells' tokens are dropped after the patch embedding, so the model never sees them
      (:class:`TokenDrop`); with every cell dropped the logits are the head's prior (no evidence).
    """

    removal: str
    batch: int = 32  # runs per forward pass by default (the fastest measured on a 2-core CPU)

    def __init__(self, x: torch.Tensor, grid: tuple[int, int]) -> None:
        if x.dim() != 3:
            raise CarrotError(f"x: expected one model input (3, H, W), got shape {tuple(x.shape)}")
        self.x, self.grid = x, (int(grid[0]), int(grid[1]))
        self.boxes = cell_boxes(self.grid, tuple(x.shape[-2:]))
        self._ends: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Cells N."""
        return len(self.boxes)

    def __call__(self, removed: torch.Tensor) -> np.ndarray:
        """Logits (B, C) float64 with the cells ``removed`` (B, N) bool taken out."""
        raise NotImplementedError

    def ends(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits of the image, logits with every cell removed), each (C,): the two ends of every curve and the total
        every exact map splits (2 runs, once per game)."""
        if self._ends is None:
            self._ends = self.values(torch.tensor([[False] * self.n, [True] * self.n]))
        return self._ends[0], self._ends[1]

    def values(self, removed: torch.Tensor, batch: int | None = None, desc: str = "") -> np.ndarray:
        """:meth:`__call__` ``batch`` rows at a time (default :attr:`batch`); with ``desc``, a progress bar over the runs."""
        removed = torch.as_tensor(removed, dtype=torch.bool).reshape(-1, self.n)
        batch = self.batch if batch is None else batch
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise CarrotError(f"batch: expected an integer >= 1, got {batch!r}")
        out = []
        with bar(total=len(removed), desc=desc, unit="run", disable=not desc) as runs:
            for s in range(0, len(removed), batch):
                out.append(np.asarray(self(removed[s : s + batch]), dtype=np.float64))
                runs.update(len(removed[s : s + batch]))
        return np.concatenate(out)


class PixelFill(CellGame):
    """Removal by replacing the cells' pixels: with those of the blurred image (``blur``), with the image's mean colour
    (``mean``), or filled in from the kept pixels around them (``inpaint``, :func:`inpaint`: a fill that depends on
    which cells are kept, closer to a natural image); the whole model re-run on the mixed image."""

    def __init__(self, logits: Logits, x: torch.Tensor, grid: tuple[int, int], removal: str = "blur",
                 sigma: float | None = None) -> None:
        super().__init__(x, grid)
        if removal not in PIXEL_REMOVALS:
            raise CarrotError(f"removal: expected {', '.join(PIXEL_REMOVALS)} for a pixel fill, got {removal!r}")
        self.sigma = sigma if sigma is not None else default_sigma(self.grid, tuple(x.shape[-2:]))
        self.fill = None if removal == "inpaint" else fill_image(x, self.grid, removal, self.sigma)
        self.logits, self.removal = logits, removal
        self.cell = torch.empty(tuple(x.shape[-2:]), dtype=torch.long, device=x.device)  # the cell of each pixel
        for j, (y0, y1, x0, x1) in enumerate(self.boxes):
            self.cell[y0:y1, x0:x1] = j

    def __call__(self, removed: torch.Tensor) -> np.ndarray:
        m = torch.as_tensor(removed, dtype=torch.bool).to(self.x.device)[:, self.cell][:, None].to(self.x.dtype)
        mixed = inpaint(self.x, m, self.sigma) if self.fill is None else self.x[None] * (1 - m) + self.fill[None] * m
        return np.asarray(self.logits(mixed), dtype=np.float64)


class TokenDrop(CellGame):
    """Removal by dropping the cells' tokens (ViTs): ``kept_logits(inputs, keep)`` runs the model on the kept
    cells' tokens only (:meth:`carrot.features.backbone.TokenBackbone.kept_tokens`) and reads them out on the graph
    of the kept cells; it answers the head's prior for a row that keeps nothing."""

    removal = "drop"
    batch = 8  # the Shapley map's 8 rows (4 ranks x 2 orders) are one padded pass of kept_tokens (padded_passes)

    def __init__(self, kept_logits: KeptLogits, x: torch.Tensor, grid: tuple[int, int]) -> None:
        super().__init__(x, grid)
        self.kept_logits = kept_logits

    def __call__(self, removed: torch.Tensor) -> np.ndarray:
        keep = ~torch.as_tensor(removed, dtype=torch.bool)
        return np.asarray(self.kept_logits(self.x[None].expand(len(keep), *self.x.shape), keep), dtype=np.float64)


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


def occlusion_map(game: CellGame, c: int, batch: int | None = None) -> np.ndarray:
    """Exact cell occlusion of one image: f_c(x) - f_c(x with cell j removed) for every cell j.

    Parameters
    ----------
    game : the image and how a cell is removed (:class:`CellGame`).
    c : the class whose logit is explained.
    batch : runs per forward pass (default: the game's).

    Returns
    -------
    (gh, gw) float64: the logit drop of removing each cell alone (N + 1 runs of the whole model).
    """
    full = game.ends()[0][c]
    out = game.values(torch.eye(game.n, dtype=torch.bool), batch, desc=f"occlusion map ({game.removal})")[:, c]
    return (full - out).reshape(game.grid)


def _pair_values(vals: np.ndarray, orders: list[np.ndarray]) -> np.ndarray:
    """Each antithetic pair's estimate of every cell's Shapley value (K / 2, N), from the logits along the orders
    (``vals[k, r]``: order k with its first r players removed)."""
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


def auto_block(grid: tuple[int, int], players: int = MAX_PLAYERS) -> int:
    """The smallest block side b whose blocks of b x b cells of a ``grid`` (gh, gw) are at most ``players`` players
    (block "auto": 1 for EfficientNet's 7 x 7 cells, 2 for DINOv2's 16 x 16)."""
    if isinstance(players, bool) or not isinstance(players, int) or players < 1:
        raise CarrotError(f"players: expected an integer >= 1, got {players!r}")
    gh, gw = grid
    b = 1
    while -(-gh // b) * -(-gw // b) > players:
        b += 1
    return b


def shapley_map(game: CellGame, c: int, permutations: int = 4, batch: int | None = None, seed: int = 0,
                block: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Shapley values of the cells in the deletion game v(S) = f_c(x) - f_c(x with the cells S removed), sampled
    over ``permutations`` random orders in antithetic pairs (each order and its reverse; Castro et al. 2009,
    Mitchell et al. 2022). Each order's marginal drops telescope to f_c(x) - f_c(x with every cell removed), so the
    map sums to it exactly for any number of orders (efficiency); for a model additive over the cells it equals
    occlusion.

    Parameters
    ----------
    game : the image and how a cell is removed (:class:`CellGame`); c : the class.
    permutations : even number of sampled orders (K); cost K (P - 1) + 2 runs of the whole model for P players.
    batch : runs per forward pass (default: the game's).
    seed : with the image's bytes, seeds the orders (reproducible per image, independent across images).
    block : the players are blocks of block x block cells (:func:`cell_blocks`; 1: every cell, P = N); a block's
        Shapley value is split evenly over its cells, so the map still sums to the total exactly.

    Returns
    -------
    (gh, gw) float64 Shapley estimates summing to f_c(x) - f_c(x with every cell removed); and {"full", "removed"
    (f_c with every cell removed), "removal", "completeness_error" (|sum - (full - removed)|, floating point only),
    "permutations", "block", "sem" ((gh, gw) standard error of each cell's estimate over the K / 2 antithetic pairs;
    nan for one pair)}.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 2 or permutations % 2:
        raise CarrotError(f"permutations: expected an even integer >= 2 (antithetic pairs), got {permutations!r}")
    batch = game.batch if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CarrotError(f"batch: expected an integer >= 1, got {batch!r}")
    owner = torch.as_tensor(cell_blocks(game.grid, block))
    n = int(owner.max()) + 1  # players
    # the orders depend on the seed and the image, so sampling errors are independent across images
    rng = np.random.default_rng([seed, zlib.crc32(game.x.detach().cpu().contiguous().numpy().tobytes())])
    orders = []
    for _ in range(permutations // 2):
        p = rng.permutation(n)
        orders += [p, p[::-1].copy()]
    ranks = torch.empty(permutations, n, dtype=torch.long)
    for k, p in enumerate(orders):
        ranks[k, torch.as_tensor(p)] = torch.arange(n)
    ends = np.array([e[c] for e in game.ends()])
    vals = np.full((permutations, n + 1), np.nan)  # vals[k, r]: logit with the first r players of order k removed
    vals[:, 0], vals[:, n] = ends
    # pair by pair, so the standard error is known as pairs complete; an order and its reverse side by side, as at
    # the same rank they remove as many players (a pass that drops tokens pads least)
    jobs = [(k, r) for q in range(0, permutations, 2) for r in range(1, n) for k in (q, q + 1)]
    with bar(total=len(jobs) + 2, initial=2, desc=f"pixel map (Shapley, {game.removal})", unit="run") as runs:
        for s in range(0, len(jobs), batch):
            chunk = jobs[s : s + batch]
            out = game(torch.stack([ranks[k][owner] < r for k, r in chunk]))[:, c]
            for (k, r), v in zip(chunk, out):
                vals[k, r] = v
            runs.update(len(chunk))
            done = (chunk[-1][0] + 1) // 2 if chunk[-1][1] == n - 1 else chunk[-1][0] // 2  # pairs complete so far
            if done >= 2:
                runs.set_postfix(pairs=f"{done}/{permutations // 2}", se=f"{_typical_sem(vals[: 2 * done], orders):.2g}")
    pairs = _pair_values(vals, orders)
    owner = owner.numpy()
    share = np.bincount(owner, minlength=n)[owner]  # cells in each cell's block
    est = pairs.mean(0)[owner] / share
    sem = (pairs.std(0, ddof=1) / np.sqrt(len(pairs)))[owner] / share if len(pairs) > 1 else np.full(len(owner), np.nan)
    info = {"full": float(ends[0]), "removed": float(ends[1]), "removal": game.removal, "permutations": permutations,
            "block": block, "completeness_error": float(abs(est.sum() - (ends[0] - ends[1]))), "sem": sem.reshape(game.grid)}
    return est.reshape(game.grid), info


def _separable_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with zero padding, as two 1-D convolutions (sigma in px, kernel 6 sigma + 1)."""
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, r), groups=C)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(r, 0), groups=C)


def inpaint(x: torch.Tensor, m: torch.Tensor, sigma: float, eps: float = 1e-3) -> torch.Tensor:
    """The image x (3, H, W) with the pixels under masks m (B, 1, H, W) (1 = removed) filled from the kept pixels
    around them: normalised convolution, fill = (G * (x (1 - m)) + eps mean) / (G * (1 - m) + eps) with a Gaussian G
    of ``sigma`` px (Knutsson & Westin 1993), so a removed pixel takes the colour of the kept pixels near it, and the
    image's mean colour where none are (every cell removed: the mean colour exactly). (B, 3, H, W)."""
    keep = 1 - m
    mean = x.mean((1, 2)).view(1, 3, 1, 1)
    num = _separable_blur(torch.cat([x[None] * keep, keep], 1), sigma)
    fill = (num[:, :3] + eps * mean) / (num[:, 3:] + eps)
    return x[None] * keep + fill * m


def fill_image(x: torch.Tensor, grid: tuple[int, int], removal: str = "blur", sigma: float | None = None) -> torch.Tensor:
    """The image (3, H, W) a pixel removal puts in place of the removed cells: ``blur`` the Gaussian-blurred image
    (sigma: one cell's side unless given), ``mean`` the image's mean colour."""
    if removal == "blur":
        return blur(x[None], sigma if sigma is not None else default_sigma(grid, tuple(x.shape[-2:])))[0]
    if removal == "mean":
        return x.mean((1, 2), keepdim=True).expand_as(x).clone()
    raise CarrotError(f"removal: expected blur or mean for a path's end image, got {removal!r}")


def path_split(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, c: int, grid: tuple[int, int],
               removal: str = "blur", nodes: int = 32, batch: int = 8) -> tuple[np.ndarray, dict[str, Any]]:
    """Split f_c(x) - f_c(fill) over the cells: the gradient of the whole model integrated along the straight path
    from the fill image (:func:`fill_image`) to the image (Gauss-Legendre quadrature, ``nodes`` nodes), times the
    pixel change, summed per cell (path-integrated gradients, Sundararajan et al. 2017, with that baseline).

    Parameters
    ----------
    logits : the whole model with autograd, (B, 3, H, W) input -> (B, C) float64 tensor.
    x : (3, H, W) one model input; c : the class; grid : (gh, gw) the backbone's cell grid.
    removal : the baseline, blur or mean (a path needs one image at its end: inpainting's depends on the cells kept,
        token dropping has none).
    nodes : quadrature nodes; batch : per pass.

    Returns
    -------
    (gh, gw) float64 cell shares, which sum to f_c(x) - f_c(fill) up to the quadrature error; and
    {"full", "removed", "removal", "completeness_error"} (|sum of the shares - (f_c(x) - f_c(fill))|).
    """
    xb = fill_image(x, grid, removal)
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
    cells = np.array([share[y0:y1, x0:x1].sum() for y0, y1, x0, x1 in cell_boxes(grid, tuple(x.shape[-2:]))])
    with torch.no_grad():
        ends = logits(torch.stack([x, xb]))[:, c].detach().cpu().numpy()
    info = {"full": float(ends[0]), "removed": float(ends[1]), "removal": removal,
            "completeness_error": float(abs(cells.sum() - (ends[0] - ends[1])))}
    return cells.reshape(grid), info


def default_sigma(grid: tuple[int, int], size: tuple[int, int]) -> float:
    """The protocol's blur: one cell's side (px), so a blurred cell keeps none of its own detail."""
    return float(max(size[0] / grid[0], size[1] / grid[1]))


def deletable(full: float, removed: float) -> bool:
    """Whether removing every cell lowers the logit (f_c(x) - f_c(x with every cell removed) > 0 beyond rounding): an
    image where it does not has nothing to delete, and every map's normalised AUC is nan (left out of the pooled
    numbers)."""
    return bool(full - removed > 1e-9 * max(1.0, abs(full)))


@dataclass
class PixelCurves:
    """Deletion and insertion of one image in one map's order, under one removal."""

    fractions: np.ndarray  # (S,) share of cells removed (deletion) or kept (insertion)
    deletion: np.ndarray  # (S,) logit of class c
    insertion: np.ndarray  # (S,)
    full: float  # f_c(x)
    removed: float  # f_c(x with every cell removed)

    @property
    def span(self) -> float:
        """f_c(x) - f_c(x with every cell removed): how much removing the whole image changes the logit (the
        pooling weight)."""
        return self.full - self.removed

    def auc(self, which: str) -> float:
        """Area under the curve scaled to 1 at the image and 0 with every cell removed; nan where removing every
        cell scores the class as high as the image (nothing to delete: the image is left out of the means)."""
        if not deletable(self.full, self.removed):
            return float("nan")
        v = (getattr(self, which) - self.removed) / (self.full - self.removed)
        return float(np.trapezoid(v, self.fractions))

    def raw_auc(self, which: str) -> float:
        """Area under the raw logit curve (no scaling, defined for every image): the issue-31 number that a few images
        with a tiny span cannot dominate."""
        return float(np.trapezoid(getattr(self, which), self.fractions))


def pixel_curves(game: CellGame, c: int, order: Sequence[int], steps: int = 16, batch: int | None = None) -> PixelCurves:
    """Deletion and insertion of one image in ``order`` (cell indices, most important first) over ``steps`` steps:
    cells removed (deletion) or kept (insertion, the rest removed) in that order, 2 (steps - 1) runs of the whole
    model beside the game's two ends (:meth:`CellGame.ends`, run once per game)."""
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(game.n)):
        raise CarrotError(f"order: expected a permutation of the {game.n} cells")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CarrotError(f"steps: expected an integer >= 1, got {steps!r}")
    counts = np.unique(np.linspace(0, game.n, steps + 1).round().astype(int))
    removed = torch.zeros(len(counts), game.n, dtype=torch.bool)
    for r, k in enumerate(counts):
        removed[r, torch.as_tensor(order[:k], dtype=torch.long)] = True
    full, gone = (float(e[c]) for e in game.ends())  # the first and last row of each curve
    out = game.values(torch.cat([removed[1:-1], ~removed[1:-1]]), batch)[:, c] if len(counts) > 2 else np.empty(0)
    k = len(counts) - 2
    return PixelCurves(counts / game.n, np.r_[full, out[:k], gone], np.r_[gone, out[k:], full], full, gone)


def pooled(values: Sequence[float], spans: Sequence[float], seed: int = 0, resamples: int = 2000) -> dict[str, float]:
    """The protocol's number over images: sum_i span_i auc_i / sum_i span_i, span_i = f_c(x_i) - f_c(x_i with every
    cell removed), so each image weighs by how much removal changes its logit (an image whose logit barely moves would
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
    """Mean and standard error of the mean over images; nan values (removing every cell scores the class at least
    as high as the image) are left out and counted in ``left_out``."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()) if len(v) else float("nan"), "sem": sem, "n": int(len(v)),
            "left_out": int(len(values) - len(v))}
