"""Multi-process / multi-node work on torch.distributed (torchrun sets the environment).

* Ridge moments: :meth:`carrot.ridge.core.CentredMoments.accumulate` with ``distributed=True`` all-reduces
  the weighted sums (pass 1: the global means), then the centred products (pass 2); every rank then solves
  the same D x D system (:meth:`RidgeHead.fit_moments`).
* Sharded extraction: rank r extracts rows r, r + world, ... of each split into its own token cache.
Works with the gloo backend on CPUs (tested with 2 processes) and nccl on GPUs.
"""
from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed if initialised, else from torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_from_env() -> bool:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
