"""The audit registry: the one place that names each audit of a run (timm ``_registry`` style).

An audit is what a command computes from a fitted run and keeps in the run directory: its result file,
the one-line summaries the CLI prints, and the section of ``index.html`` that shows it. The run directory
(:class:`carrot.run.rundir.RunDir`) takes file names from here, ``write_index`` renders every registered audit
present, and ``fit --overwrite`` clears them. A new audit is one :func:`register` call (plus its command).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Audit:
    """One audit: ``file`` (its JSON result, relative to the run directory), ``section`` (result -> index.html
    section), ``summary`` (result -> lines the CLI prints), ``extra`` (other files it writes beside ``file``)."""

    name: str
    file: str
    section: Callable[[Any], str]
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


def _json_lines(drop: tuple[str, ...] = ()) -> Callable[[Any], list[str]]:
    def lines(res: Any) -> list[str]:
        shown = {k: v for k, v in res.items() if k not in drop} if isinstance(res, dict) else res
        return [json.dumps(shown, indent=2)]

    return lines


def _lazy(module: str, name: str) -> Callable[[Any], Any]:
    """A function of another module, imported when first called (keeps this module import-light, no cycles)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


def _debug_lines(res: dict) -> list[str]:
    rows = [{k: v for k, v in r.items() if k != "dropped"} for r in res["rows"]]
    return [json.dumps({k: v for k, v in res.items() if k != "rows"} | {"rows": rows}, indent=2)]


def _compare_lines(res: dict) -> list[str]:
    return [f"A {res['accuracy_a']:.4f}  B {res['accuracy_b']:.4f}  on {res['n']} test images; B fixes {res['fixed_by_b']}, "
            f"breaks {res['broken_by_b']} (McNemar exact p = {res['mcnemar_exact_p']:.3g})"]


register(Audit("evaluation", "evaluation.json", _lazy("carrot.report.audits", "evaluation_html"),
               _lazy("carrot.audit.evaluate", "summary_lines"), help="carrot-run evaluate"))
register(Audit("tracin", "tracin/summary.json", _lazy("carrot.report.audits", "tracin_html"),
               _json_lines(), extra=("tracin",), help="carrot-run tracin"))
register(Audit("reweight", "reweight.json", _lazy("carrot.report.audits", "reweight_html"),
               _json_lines(("history", "weights")), help="carrot-run reweight"))
register(Audit("debug", "debug.json", _lazy("carrot.report.audits", "debug_html"), _debug_lines, help="carrot-run debug"))
register(Audit("t_sweep", "t_sweep.json", _lazy("carrot.report.audits", "t_sweep_html"), _json_lines(),
               extra=("t_sweep.csv",), help="carrot-run bench"))
register(Audit("compare", "compare.json", _lazy("carrot.report.audits", "compare_html"), _compare_lines,
               help="carrot-run compare (written into RUN_B)"))
