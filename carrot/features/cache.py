"""On-disk token cache: one ``tokens.npy`` (n, N, D) per split, a manifest, resumable extraction.

The manifest names backbone, weights hash, image size, grid, dtype and dataset fingerprint; a
cache whose manifest differs from the current request is refused (:class:`StaleCacheError`).
Extraction writes rows into a preallocated memmap and records progress atomically after each
flushed batch, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from carrot.features.backbone import TokenBackbone, patch_centres
from carrot.data import ImageDataset, load_image
from carrot.errors import CarrotError, StaleCacheError
from carrot.io import read_json, write_json

CACHE_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class TokenStore:
    """A complete cached split: ``tokens`` memmap (n, N, D), labels (n,), centres (N, 2), grid."""

    path: Path
    manifest: dict[str, Any]
    tokens: np.ndarray
    labels: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])  # type: ignore[return-value]

    @property
    def positions(self) -> torch.Tensor:
        return patch_centres(self.grid)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _probe_grid(backbone: TokenBackbone) -> tuple[tuple[int, int], int]:
    x = torch.zeros(1, *backbone.data_config["input_size"])
    tokens, grid = backbone(x)
    return grid, int(tokens.shape[-1])


def expected_manifest(backbone: TokenBackbone, dataset: ImageDataset, dtype: str, fingerprint: str | None = None) -> dict[str, Any]:
    grid, dim = _probe_grid(backbone)
    return {
        "version": CACHE_VERSION,
        "backbone": backbone.name,
        "timm_name": backbone.timm_name,
        "weights_id": backbone.weights_id,
        "img_size": backbone.img_size,
        "input_size": list(backbone.data_config["input_size"]),
        "grid": list(grid),
        "dim": dim,
        "dtype": dtype,
        "n": len(dataset),
        "dataset_fingerprint": fingerprint or dataset.fingerprint(),
        "labels": dataset.labels.tolist(),
        "classes": list(dataset.classes),
    }


def cache_key(manifest: dict[str, Any]) -> str:
    fields = ("version", "timm_name", "weights_id", "input_size", "dtype", "dataset_fingerprint")
    return hashlib.sha256(repr([manifest[f] for f in fields]).encode()).hexdigest()[:16]


def _compare(found: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    diff = [k for k in expected if k != "complete" and found.get(k) != expected[k]]
    if diff:
        raise StaleCacheError(
            f"token cache '{where}' is stale: {', '.join(diff)} differ from this run; "
            "delete that folder or choose another --cache-dir"
        )


def open_store(path: str | Path, expected: dict[str, Any] | None = None) -> TokenStore:
    """Open a complete cache folder, validating its manifest (and against ``expected`` if given)."""
    path = Path(path)
    manifest = read_json(path / "manifest.json", "token cache manifest")
    if expected is not None:
        _compare(manifest, expected, path)
    if not manifest.get("complete"):
        raise CarrotError(f"token cache '{path}' is incomplete; run the extraction again to resume it")
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    shape = (manifest["n"], manifest["grid"][0] * manifest["grid"][1], manifest["dim"])
    if tokens.shape != shape or tokens.dtype != DTYPES[manifest["dtype"]]:
        raise StaleCacheError(f"token cache '{path}': tokens.npy {tokens.shape} {tokens.dtype} does not match its manifest {shape}")
    return TokenStore(path, manifest, tokens, np.asarray(manifest["labels"], dtype=np.int64))


def extract(
    backbone: TokenBackbone,
    dataset: ImageDataset,
    cache_root: str | Path,
    *,
    dtype: str = "float16",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    fingerprint: str | None = None,
) -> TokenStore:
    """Extract (or resume, or reuse) the tokens of ``dataset`` under ``cache_root/<key>/``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise CarrotError(f"cache dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CarrotError(f"batch_size: expected a positive integer, got {batch_size!r}")
    expected = expected_manifest(backbone, dataset, dtype, fingerprint)
    path = Path(cache_root) / cache_key(expected)
    man_path, tok_path, prog_path = path / "manifest.json", path / "tokens.npy", path / "progress.json"
    n = len(dataset)
    shape = (n, expected["grid"][0] * expected["grid"][1], expected["dim"])
    done = 0
    if man_path.is_file():
        found = read_json(man_path, "token cache manifest")
        _compare(found, expected, path)
        if found.get("complete"):
            return open_store(path, expected)
        if tok_path.is_file() and prog_path.is_file():
            done = int(read_json(prog_path, "token cache progress").get("done", 0))
    if done == 0 or not tok_path.is_file():
        path.mkdir(parents=True, exist_ok=True)
        write_json(man_path, {**expected, "complete": False})
        tokens = np.lib.format.open_memmap(tok_path, mode="w+", dtype=DTYPES[dtype], shape=shape)
        write_json(prog_path, {"done": 0})
        done = 0
    else:
        tokens = np.load(tok_path, mmap_mode="r+")
        if tokens.shape != shape:
            raise StaleCacheError(f"token cache '{path}': partial tokens.npy has shape {tokens.shape}, expected {shape}")
    if done < n:
        todo = RecordImages(dataset, backbone.transform(), backbone.min_side, start=done)
        loader = DataLoader(todo, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        bar = tqdm(total=n, initial=done, desc=f"extract {dataset.name}", unit="img", disable=not progress)
        with worker_errors(), bar:
            for x in loader:
                out, _ = backbone(x)
                tokens[done : done + len(x)] = out.cpu().numpy().astype(DTYPES[dtype])
                if not np.isfinite(tokens[done : done + len(x)]).all():
                    raise CarrotError(f"backbone produced NaN/Inf tokens (dtype {dtype} overflow?) for {dataset.name} rows {done}..{done + len(x)}")
                tokens.flush()
                done += len(x)
                write_json(prog_path, {"done": done})
                bar.update(len(x))
    del tokens
    write_json(man_path, {**expected, "complete": True})
    return open_store(path, expected)


@contextmanager
def worker_errors() -> Iterator[None]:
    """A CarrotError raised in a DataLoader worker carries the worker's traceback: keep its last line."""
    try:
        yield
    except CarrotError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) > 1:
            raise CarrotError(lines[-1].split("CarrotError: ", 1)[-1]) from None
        raise


class RecordImages(torch.utils.data.Dataset):
    """Records of a data set as preprocessed image tensors (for a DataLoader)."""

    def __init__(self, dataset: ImageDataset, transform, min_side: int, start: int = 0) -> None:
        self.records = dataset.records[start:]
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.records[i], self.min_side))
