"""Text that a user's data puts into a file or a terminal, made safe for the reader of each.

File and class names come from the file system as Python strings; bytes that are not UTF-8 arrive as lone
surrogates (PEP 383). They stay exact wherever carrot reads the name back (paths to open, run.json and other JSON,
whose escapes round-trip), and are shown as U+FFFD wherever a person reads them:

* :func:`shown`: any text for a person (HTML pages, PNG titles);
* :func:`for_terminal`: one line for a terminal: no control characters (escape sequences could rewrite the screen);
* :func:`for_csv`: one spreadsheet cell: a text cell that a spreadsheet would run as a formula (OWASP: a leading
  ``=``, ``+``, ``-``, ``@``, tab or carriage return) is prefixed with ``'``; numbers stay numbers;
* matplotlib titles are drawn with mathtext off (:func:`carrot.report.pages.plain_text`), so ``$...$`` is literal.
"""
from __future__ import annotations

import re
from typing import Any

_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")  # C0, C1, bidi overrides
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def shown(text: str) -> str:
    """``text`` with the characters no file can hold as UTF-8 (undecodable bytes of a name) as U+FFFD."""
    return _SURROGATES.sub("\ufffd", text)


def for_terminal(text: str) -> str:
    """``text`` for one terminal line: undecodable bytes as U+FFFD, control characters (newlines, escape sequences)
    and bidirectional overrides (which reorder what a terminal shows) as ``\\xNN`` / ``\\uNNNN``."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                         shown(text))


def for_csv(cell: Any) -> Any:
    """One CSV cell for a spreadsheet: text shown (:func:`shown`) and, when a spreadsheet would take it as a formula,
    prefixed with ``'``; numbers, None and booleans as they are."""
    if not isinstance(cell, str):
        return cell
    cell = shown(cell)
    return "'" + cell if cell.startswith(FORMULA_START) else cell
