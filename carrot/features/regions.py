"""RegionSet: the nodes of one or more image graphs (features, centres, grid)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from carrot.errors import CarrotError


@dataclass
class RegionSet:
    """Region features ``H`` (B, N, D) with centres ``P`` (N, 2) in [-1, 1] on an (h, w) grid, and the image's
    global tokens ``globals`` (B, G, D') (class, registers) when the embedding reads them."""

    H: torch.Tensor
    P: torch.Tensor
    grid_hw: tuple[int, int]
    globals: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.H.dim() == 2:
            self.H = self.H.unsqueeze(0)
        if self.H.dim() != 3:
            raise CarrotError(f"RegionSet.H: expected (B, N, D) or (N, D), got shape {tuple(self.H.shape)}")
        if self.P.dim() != 2 or self.P.shape != (self.H.shape[1], 2):
            raise CarrotError(
                f"RegionSet.P: expected shape ({self.H.shape[1]}, 2) to match H's N, got {tuple(self.P.shape)}"
            )
        if self.grid_hw[0] * self.grid_hw[1] != self.H.shape[1]:
            raise CarrotError(f"RegionSet.grid_hw: {self.grid_hw} does not hold N={self.H.shape[1]} regions")
        if self.globals is not None and (self.globals.dim() != 3 or self.globals.shape[0] != self.H.shape[0]):
            raise CarrotError(f"RegionSet.globals: expected ({self.H.shape[0]}, G, D), got shape {tuple(self.globals.shape)}")
        if not torch.isfinite(self.H).all():
            raise CarrotError("RegionSet.H: features contain NaN or Inf (a corrupt cache or backbone overflow)")

    @property
    def batch(self) -> int:
        return int(self.H.shape[0])

    @property
    def num_regions(self) -> int:
        return int(self.H.shape[1])

    @property
    def dim(self) -> int:
        return int(self.H.shape[2])
