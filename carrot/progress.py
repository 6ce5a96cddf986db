"""Progress of every step that can take more than a couple of seconds: tqdm bars and one-line stage notes on
stderr. ``carrot-run``'s ``--quiet`` silences all of them for the whole command through one switch
(:func:`set_quiet`), so library functions need no progress argument of their own."""
from __future__ import annotations

import io
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

_quiet = False
_watch = threading.local()  # a list collecting this thread's bars while :func:`watched` is on


def set_quiet(quiet: bool) -> None:
    """Silence (True) or show (False) every bar and note from here on."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


@contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Bars and notes silenced (``on``) for the duration, then as they were."""
    before = _quiet
    set_quiet(on or before)
    try:
        yield
    finally:
        set_quiet(before)


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
        leave: bool = False, disable: bool = False, **kwargs: Any):
    """A tqdm bar on stderr (silenced by :func:`set_quiet`, or ``disable``); ``leave`` False: it disappears when
    done, so the terminal keeps only the results and the stage notes."""
    from tqdm.auto import tqdm

    bars = getattr(_watch, "bars", None)
    if bars is not None and not disable:  # read by whoever watches this thread (the studio's job page), not printed
        b = tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=io.StringIO(), mininterval=0.5, **kwargs)
        bars.append(b)
        return b
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=_quiet or disable, file=sys.stderr,
                dynamic_ncols=True, **kwargs)


@contextmanager
def watched(bars: list) -> Iterator[None]:
    """While on, every bar this thread opens is appended to ``bars`` (its ``n``, ``total``, ``desc`` and ``postfix``
    stay live) and writes nowhere: progress a web page can show."""
    before = getattr(_watch, "bars", None)
    _watch.bars = bars
    try:
        yield
    finally:
        _watch.bars = before


def note(message: str) -> None:
    """A one-line stage note on stderr ("carrot: fitting the head ..."), silenced by :func:`set_quiet`."""
    if not _quiet:
        from carrot.text import for_terminal

        print(f"carrot: {for_terminal(message)}", file=sys.stderr, flush=True)
