"""The audit registry: the one place that names each audit of a run (timm ``_registry`` style).

An audit is what a command computes from a fitted run and keeps in the run directory: its result file and the
one-line summaries the CLI prints. Each audit registers itself where it is defined (:func:`register`, in its module
under ``carrot.audit``; the package imports them all, so the registry is complete once it is imported). The run
directory (:class:`carrot.run.rundir.RunDir`) takes file names from here, ``write_index`` shows every registered
audit present (its index section: :data:`carrot.report.audits.SECTIONS`, a plain JSON view for an audit without
one), and ``fit --overwrite`` clears them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Audit:
    """One audit: ``file`` (its JSON result, relative to the run directory), ``summary`` (result -> lines the CLI
    prints), ``extra`` (other files it writes beside ``file``), ``help`` (the command that computes it)."""

    name: str
    file: str
    summary: Callable[[Any], list[str]]
    extra: tuple[str, ...] = field(default=())
    help: str = ""


AUDITS: dict[str, Audit] = {}


def register(audit: Audit) -> Audit:
    if audit.name in AUDITS:
        raise ValueError(f"audit {audit.name!r} is already registered")
    AUDITS[audit.name] = audit
    return audit


def get(name: str) -> Audit:
    """The audit called ``name``; a KeyError names the registered ones."""
    try:
        return AUDITS[name]
    except KeyError:
        raise KeyError(f"unknown audit {name!r}; registered: {', '.join(AUDITS)}") from None


def json_lines(drop: tuple[str, ...] = ()) -> Callable[[Any], list[str]]:
    """Summary lines that print the result as indented JSON (without the keys ``drop``)."""
    def lines(res: Any) -> list[str]:
        shown = {k: v for k, v in res.items() if k not in drop} if isinstance(res, dict) else res
        return [json.dumps(shown, indent=2)]

    return lines
