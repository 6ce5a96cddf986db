"""Device selection: CUDA > MPS > CPU unless forced."""
from __future__ import annotations

import torch

from carrot.errors import CarrotError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return ``torch.device`` for ``'auto'``, ``'cpu'``, ``'cuda[:i]'`` or ``'mps'``; refuse unavailable ones."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CarrotError(
            f"device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CarrotError("device: 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CarrotError("device: 'mps' was requested but MPS is not available; use --device cpu or auto")
    return dev


def device_memory(dev: torch.device | None = None) -> int | None:
    """Bytes of memory on ``dev``: the GPU's for CUDA, else the machine's physical memory; None when unknown."""
    if dev is not None and dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
