"""On-disk token cache: one ``tokens.npy`` (n, N, D) per split, a manifest, resumable extraction.

The manifest names backbone, weights hash, image size, grid, dtype and dataset fingerprint; a
cache whose manifest differs from the current request is refused (:class:`StaleCacheError`).
Extraction reserves the whole file on disk first (a full disk is an error at the start, not a
SIGBUS mid-way), writes rows into the memmap and records progress atomically after each flushed
batch, with the SHA-256 of each batch's rows, so an interrupted run resumes where it stopped and never blesses rows
that were changed meanwhile. One process at a time extracts a cache
(a lock file in its folder); a second waits and then reuses the result. A complete cache records the
SHA-256 of its tokens; a damaged cache is extracted again (with a warning) when a run needs it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from carrot.features.backbone import TokenBackbone, patch_centres
from carrot.data import ImageDataset, load_image
from carrot.errors import CarrotError, StaleCacheError, first_line, warn
from carrot.io import human_size, read_json, sha256_file, write_json

CACHE_VERSION = 4  # 4: colours converted to sRGB from an embedded ICC profile; 3: a ViT's global (class, register)
# tokens kept before its patch tokens, last-k blocks; 2: EXIF orientation applied, 16-bit / float images scaled
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class TokenStore:
    """A complete cached split: patch ``tokens`` (n, N, D) and ``globals`` (n, P, D) (class and register tokens;
    P = 0 for a ConvNet), views of one memmap; labels (n,), centres (N, 2), grid."""

    path: Path
    manifest: dict[str, Any]
    tokens: np.ndarray
    labels: np.ndarray
    globals: np.ndarray | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])  # type: ignore[return-value]

    @property
    def positions(self) -> torch.Tensor:
        return patch_centres(self.grid)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def blocks(self) -> int:
        """Blocks whose tokens this view holds (each ``dim / blocks`` features, the last block last)."""
        return int(self.manifest.get("view_blocks", self.manifest.get("blocks", 1)))

    def release(self) -> None:
        """Give back this process's resident pages of the cache file (they stay in the page cache): a pass over the
        whole cache then holds one batch, not the file, in its resident memory (a cache of 4 blocks is 4 times the
        file). Reading the rows again faults them back in, unchanged."""
        import mmap

        arr = self.tokens
        while arr is not None and getattr(arr, "_mmap", None) is None:
            arr = getattr(arr, "base", None)
        mm = getattr(arr, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def last_blocks(self, k: int) -> "TokenStore":
        """The view of the last ``k`` blocks' tokens (patch and global), without a copy: a cache extracted with the
        last K >= k blocks serves every embedding of fewer (``backbone.blocks`` auto extracts once for all of them).
        Bitwise the tokens a k-block extraction writes: each block's tokens are the model's, through its final norm."""
        K = self.blocks
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= K:
            raise CarrotError(f"backbone.blocks: the token cache '{self.path}' holds the last {K} blocks' tokens, "
                              f"expected 1 to {K} of them, got {k!r}")
        if k == K:
            return self
        width = self.tokens.shape[-1] // K * k
        glob = None if self.globals is None else self.globals[..., -width:]
        return TokenStore(self.path, {**self.manifest, "view_blocks": k}, self.tokens[..., -width:], self.labels, glob)


def _probe_grid(backbone: TokenBackbone) -> tuple[tuple[int, int], int, int]:
    """The backbone's grid, features per token and number of global tokens for one input."""
    x = torch.zeros(1, *backbone.data_config["input_size"])
    tokens, glob, grid = backbone.with_globals(x)
    return grid, int(tokens.shape[-1]), int(glob.shape[1])


def expected_manifest(backbone: TokenBackbone, dataset: ImageDataset, dtype: str, fingerprint: str | None = None) -> dict[str, Any]:
    grid, dim, prefix = _probe_grid(backbone)
    return {
        "version": CACHE_VERSION,
        "blocks": backbone.blocks,
        "prefix": prefix,
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
        **({"precision": backbone.precision} if backbone.precision != "float32" else {}),  # float32: as caches before it
    }


def missing_bytes(backbone: TokenBackbone, dataset: ImageDataset, cache_root: str | Path, dtype: str) -> int:
    """Bytes the token cache of ``dataset`` still needs on disk: 0 when it is complete, else its full size."""
    expected = expected_manifest(backbone, dataset, dtype)
    path = Path(cache_root) / cache_key(expected)
    try:
        if read_json(path / "manifest.json", "token cache manifest").get("complete"):
            return 0
    except (CarrotError, AttributeError):
        pass
    n_rows = expected["grid"][0] * expected["grid"][1] + expected["prefix"]
    return len(dataset) * n_rows * expected["dim"] * np.dtype(DTYPES[dtype]).itemsize


def cache_key(manifest: dict[str, Any]) -> str:
    fields = ("version", "timm_name", "weights_id", "input_size", "dtype", "dataset_fingerprint", "blocks")
    extra = [manifest["precision"]] if manifest.get("precision", "float32") != "float32" else []
    return hashlib.sha256(repr([manifest[f] for f in fields] + extra).encode()).hexdigest()[:16]


def _compare(found: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    diff = [k for k in expected if k != "complete" and found.get(k) != expected[k]]
    if diff:
        raise StaleCacheError(
            f"token cache '{where}' is stale: {', '.join(diff)} differ from this run; "
            "delete that folder or choose another --cache-dir"
        )


def open_store(path: str | Path, expected: dict[str, Any] | None = None, verify: bool = False,
               blocks: int | None = None) -> TokenStore:
    """Open a complete cache folder, validating its manifest (and against ``expected`` if given), the tokens'
    shape and dtype, and with ``verify`` their SHA-256; a damaged cache is refused saying how to rebuild it.
    ``blocks``: the view of the last that many blocks' tokens (:meth:`TokenStore.last_blocks`; None: all)."""
    path = Path(path)
    rebuild = "delete that folder and run carrot-run extract (or fit) with the run's settings to rebuild it"
    try:
        manifest = read_json(path / "manifest.json", "token cache manifest")
    except CarrotError as exc:
        raise StaleCacheError(f"token cache '{path}' is damaged ({exc}); {rebuild}") from None
    if not isinstance(manifest, dict) or not _manifest_ok(manifest):
        raise StaleCacheError(f"token cache '{path}': manifest.json lacks fields or has wrong types; {rebuild}")
    if expected is not None:
        _compare(manifest, expected, path)
    if not manifest.get("complete"):
        raise CarrotError(f"token cache '{path}' is incomplete; run the extraction again to resume it")
    prefix = manifest.get("prefix", 0)  # caches before version 3 hold patch tokens only
    shape = (manifest["n"], prefix + manifest["grid"][0] * manifest["grid"][1], manifest["dim"])
    try:
        tokens = np.load(path / "tokens.npy", mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise StaleCacheError(f"token cache '{path}': tokens.npy is unreadable or truncated ({first_line(exc)}); {rebuild}") from None
    if tokens.shape != shape or tokens.dtype != DTYPES[manifest["dtype"]]:
        raise StaleCacheError(f"token cache '{path}': tokens.npy {tokens.shape} {tokens.dtype} does not match its manifest "
                              f"{shape}; {rebuild}")
    if verify and manifest.get("sha256") is not None and not _verified_before(path, manifest["sha256"]):
        before, started = _stat_key(path), time.time_ns()
        if sha256_file(path / "tokens.npy") != manifest["sha256"]:
            raise StaleCacheError(f"token cache '{path}': tokens.npy changed since extraction (SHA-256 differs); {rebuild}")
        if _stat_key(path) == before:  # not written while it was hashed: the digest is this file's
            _stamp_verified(path, manifest["sha256"], before, started)
    store = TokenStore(path, manifest, tokens[:, prefix:], np.asarray(manifest["labels"], dtype=np.int64), tokens[:, :prefix])
    return store if blocks is None else store.last_blocks(blocks)


VERIFIED = "verified.json"  # the stat of tokens.npy when its SHA-256 last matched the manifest's
RACY_SECONDS = 2.0  # a file modified this close to its verification could change within the same timestamp


def _stat_key(path: Path) -> list[int]:
    st = (path / "tokens.npy").stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _verified_before(path: Path, digest: str) -> bool:
    """Whether tokens.npy is, by its size, modification time, inode and device, the file whose SHA-256 was last found
    to match ``digest`` (git's index does the same for its work tree): a cache is hashed in full once, not at every
    open (1.9 GiB for a 4-block cache of 2,624 images). Any write to the file changes its modification time; a stamp
    whose hash started within :data:`RACY_SECONDS` of that time is not trusted. As for git, a change that touches no
    stat field (bit rot under an unchanged file) is caught only by a full hash (a new stamp: delete verified.json)."""
    try:
        stamp = read_json(path / VERIFIED, "token cache verification")
        return (isinstance(stamp, dict) and stamp.get("sha256") == digest and stamp.get("stat") == _stat_key(path)
                and stamp.get("verified_ns", 0) - stamp["stat"][1] > RACY_SECONDS * 1e9)
    except (CarrotError, OSError, KeyError, TypeError, IndexError):
        return False


def _stamp_verified(path: Path, digest: str, stat: list[int], started_ns: int) -> None:
    try:
        write_json(path / VERIFIED, {"sha256": digest, "stat": stat, "verified_ns": started_ns})
    except OSError:  # a read-only shared cache: verified again next time
        pass


def _manifest_ok(m: dict[str, Any]) -> bool:
    ints = all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool) and m[k] >= 0 for k in ("n", "dim"))
    grid = isinstance(m.get("grid"), list) and len(m["grid"]) == 2 and all(isinstance(g, int) and g > 0 for g in m["grid"])
    prefix = m.get("prefix", 0)
    ints = ints and isinstance(prefix, int) and not isinstance(prefix, bool) and prefix >= 0
    labels = isinstance(m.get("labels"), list) and ints and len(m["labels"]) == m["n"]
    blocks = m.get("blocks", 1)
    blocks = isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1 and ints and m["dim"] % blocks == 0
    return ints and grid and labels and blocks and m.get("dtype") in DTYPES


@contextmanager
def _locked(lock_path: Path, what: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (POSIX flock); a second process waits for the first."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent extraction of one cache is then the user's to avoid
        yield
        return
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"carrot: waiting for another process extracting '{what}'", file=sys.stderr, flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _resume_point(path: Path, expected: dict[str, Any], shape: tuple[int, int, int]) -> tuple[int, list] | None:
    """None when a complete, valid cache is there; else (the row to resume from, the batches written so far with
    their SHA-256), after checking every written batch's rows against its checksum ((0, []): start afresh, after a
    warning when what was there is damaged or changed). A manifest of another request at this key is refused."""
    man_path, tok_path, prog_path = path / "manifest.json", path / "tokens.npy", path / "progress.json"
    fresh: tuple[int, list] = (0, [])
    if not man_path.is_file():
        return fresh
    try:
        found = read_json(man_path, "token cache manifest")
    except CarrotError:
        found = None
    if not isinstance(found, dict):
        warn(f"token cache '{path}': manifest.json is unreadable; extracting the tokens again")
        return fresh
    _compare(found, expected, path)
    if found.get("complete"):
        try:
            open_store(path, expected, verify=True)
            return None
        except StaleCacheError as exc:
            warn(f"{exc}; extracting the tokens again".replace(
                "; delete that folder and run carrot-run extract (or fit) with the run's settings to rebuild it", ""))
            return fresh
    try:
        progress = read_json(prog_path, "token cache progress") if prog_path.is_file() else {"done": 0}
        done, batches = progress.get("done"), progress.get("batches", [])
    except (CarrotError, AttributeError):
        done, batches = "unreadable", []
    try:
        tokens = np.load(tok_path, mmap_mode="r") if tok_path.is_file() else None
    except (ValueError, OSError, EOFError):
        tokens = "unreadable"
    valid = isinstance(done, int) and not isinstance(done, bool) and 0 <= done <= shape[0]
    if not valid or tokens is None or isinstance(tokens, str) or tokens.shape != shape:
        if done != 0 or tokens is not None:
            what = f"progress {done!r}" if not valid else "tokens.npy unreadable or of another shape"
            warn(f"token cache '{path}': the partial extraction is damaged ({what}); starting it again")
        return fresh
    changed = _changed_batch(tokens, done, batches)
    if changed:
        warn(f"token cache '{path}': the partial extraction cannot be resumed ({changed}); starting it again")
        return fresh
    return done, batches


def _changed_batch(tokens: np.ndarray, done: int, batches: Any) -> str | None:
    """Why the rows written so far (0..``done``) cannot be trusted, or None: each batch [start, stop, sha256] must
    cover them in order and hash to its checksum."""
    if done == 0:
        return None
    ok = isinstance(batches, list) and all(isinstance(b, list) and len(b) == 3 for b in batches)
    if not ok or [b[0] for b in batches] != [0, *[b[1] for b in batches[:-1]]] or batches[-1][1] != done:
        return "its batch checksums are missing or do not cover the rows written"
    for start, stop, digest in batches:
        if hashlib.sha256(np.ascontiguousarray(tokens[start:stop]).tobytes()).hexdigest() != digest:
            return f"rows {start}..{stop} changed since they were written"
    return None


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
    if dtype not in DTYPES:
        raise CarrotError(f"cache dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CarrotError(f"batch_size: expected a positive integer, got {batch_size!r}")
    expected = expected_manifest(backbone, dataset, dtype, fingerprint)
    path = Path(cache_root) / cache_key(expected)
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path / ".lock", path):
        return _extract_locked(backbone, dataset, path, expected, dtype, batch_size, num_workers, progress)


def _extract_locked(backbone: TokenBackbone, dataset: ImageDataset, path: Path, expected: dict[str, Any], dtype: str,
                    batch_size: int, num_workers: int, progress: bool) -> TokenStore:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    man_path, tok_path, prog_path = path / "manifest.json", path / "tokens.npy", path / "progress.json"
    n = len(dataset)
    shape = (n, expected["prefix"] + expected["grid"][0] * expected["grid"][1], expected["dim"])
    resume = _resume_point(path, expected, shape)
    if resume is None:
        return open_store(path, expected)
    done, batches = resume
    if done == 0:
        path.mkdir(parents=True, exist_ok=True)
        write_json(man_path, {**expected, "complete": False})
        write_json(prog_path, {"done": 0})
        tokens = np.lib.format.open_memmap(tok_path, mode="w+", dtype=DTYPES[dtype], shape=shape)
    else:
        tokens = np.load(tok_path, mmap_mode="r+")
    _reserve(tok_path)  # also on resume: a sparse file left by an older carrot or a crash
    if done < n:
        todo = RecordImages(dataset, backbone.transform(), backbone.min_side, start=done)
        loader = DataLoader(todo, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        bar = tqdm(total=n, initial=done, desc=f"extract {dataset.name}", unit="img", disable=not progress)
        started, first = time.perf_counter(), done
        with worker_errors(), bar:
            for x in loader:
                H, glob, _ = backbone.with_globals(x)
                tokens[done : done + len(x)] = torch.cat([glob, H], 1).cpu().numpy().astype(DTYPES[dtype])
                if not np.isfinite(tokens[done : done + len(x)]).all():
                    raise CarrotError(f"backbone produced NaN/Inf tokens (dtype {dtype} overflow?) for {dataset.name} rows {done}..{done + len(x)}")
                tokens.flush()
                digest = hashlib.sha256(np.ascontiguousarray(tokens[done : done + len(x)]).tobytes()).hexdigest()
                batches.append([done, done + len(x), digest])
                done += len(x)
                write_json(prog_path, {"done": done, "batches": batches})
                bar.update(len(x))
        speed = {"images_per_second": round((done - first) / max(time.perf_counter() - started, 1e-9), 3)}
    else:
        speed = {}
    del tokens
    write_json(man_path, {**expected, **speed, "complete": True, "sha256": sha256_file(tok_path)})
    return open_store(path, expected)


def _reserve(path: Path) -> None:
    """Allocate the memmap's blocks now: a disk too small for the cache is a clear error here, not a SIGBUS
    when a page is first written (the file is sparse until then)."""
    size = path.stat().st_size
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                return
            raise
        os.close(fd)
        fd = -1
        path.unlink(missing_ok=True)  # give back what was allocated; the next run starts this split afresh
        raise CarrotError(f"token cache: cannot reserve {human_size(size)} for '{path}' ({exc.strerror}); free disk "
                          "space, set --cache-dir to a larger disk, or fit with --no-cache-tokens") from None
    finally:
        if fd >= 0:
            os.close(fd)


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
