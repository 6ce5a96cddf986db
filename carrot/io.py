"""Atomic file writes, hashing and the user cache directory."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from carrot.errors import CarrotError


def user_cache_dir() -> Path:
    """``$CARROT_CACHE_DIR``, else ``$XDG_CACHE_HOME/carrot``, else ``~/.cache/carrot``; an error naming the
    variable when that path exists and is not a folder."""
    env = os.environ.get("CARROT_CACHE_DIR")
    if env:
        return check_dir(Path(env).expanduser(), "CARROT_CACHE_DIR")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return check_dir(base / "carrot", "XDG_CACHE_HOME" if xdg else "the user cache folder")


def check_dir(path: Path, name: str) -> Path:
    """``path`` if it is a folder or does not exist yet (no part of it a file); else a one-line error naming ``name``."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise CarrotError(f"{name}: expected a folder, but '{p}' is a file")
            break
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600, and some writers (safetensors) replace the file
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def save_npy(path: str | os.PathLike[str], arr: Any) -> None:
    """Write a .npy file atomically."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically, every text cell made safe for a spreadsheet (:func:`carrot.text.for_csv`)."""
    import csv

    from carrot.text import for_csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([for_csv(h) for h in header])
        w.writerows([for_csv(c) for c in row] for row in rows)


def human_size(n: float) -> str:
    """A byte count as a person reads it: '850 B', '2.0 MiB', '1.37 GiB' (never '0.00 GiB' for a small one)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or corrupt file into a :class:`CarrotError`."""
    path = Path(path)
    if not path.is_file():
        raise CarrotError(f"{what} not found: expected a file at '{path}'")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CarrotError(f"{what} '{path}' is not valid JSON ({exc})") from None


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(state: dict[str, Any]) -> str:
    """Hex SHA-256 of a state dict: names, shapes, dtypes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
