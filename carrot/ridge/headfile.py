"""Reading a head's two files (``path`` safetensors, ``path``.json metadata), shared by every registered head:
the metadata's format and version, the settings, and the tensors, each refused with a one-line error."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from carrot.errors import CarrotError
from carrot.io import read_json

T = TypeVar("T")


def read_meta(path: Path, cls: type, newest: int) -> tuple[dict, int]:
    """The metadata of a head file of class ``cls`` and its format version (1..``newest``)."""
    meta = read_json(str(path) + ".json", "head metadata")
    if not isinstance(meta, dict) or meta.get("format") != f"carrot.{cls.__name__}":
        raise CarrotError(f"'{path}.json' is not a carrot {cls.__name__} file")
    if not path.is_file():
        raise CarrotError(f"head weights not found: '{path}'")
    version = meta.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > newest:
        raise CarrotError(f"'{path}.json': head format version {version} was written by a newer carrot "
                          f"(this one reads 1..{newest}); upgrade carrot to load it")
    if version not in range(1, newest + 1) or isinstance(version, bool):
        raise CarrotError(f"'{path}.json': expected a head format version 1..{newest}, got {version!r}")
    return meta, version


def settings(raw: Any, cls: Any, path: Path) -> dict[str, Any]:
    """Constructor settings from the metadata: only ``cls``'s own names; lists of ``*_grid`` back to tuples."""
    if not isinstance(raw, dict) or not set(raw) <= set(cls._get_param_names()):
        raise CarrotError(f"'{path}.json': params must be {cls.__name__} settings {cls._get_param_names()}, got {raw!r}")
    return {k: tuple(v) if k.endswith("_grid") and v is not None else v for k, v in raw.items()}


def load_parts(path: Path, build: Callable[[dict], T]) -> T:
    """``build(tensors)`` of the safetensors file, a missing key, a bad value or a corrupt file as a CarrotError."""
    from safetensors.torch import load_file

    try:
        return build(load_file(str(path)))
    except CarrotError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CarrotError(f"head file '{path}' is unreadable or incomplete ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); refit the run") from None
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a corrupt file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise CarrotError(f"head file '{path}' is corrupt ({str(exc).splitlines()[0]}); refit the run") from None
