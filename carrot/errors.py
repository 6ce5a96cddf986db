"""User-facing errors: the CLI prints them on one line, never as a traceback."""
from __future__ import annotations


class CarrotError(ValueError):
    """A mistake in the user's input or environment, with a message that says how to fix it.

    A ``ValueError``, so code that handles bad values generically (sklearn's model selection,
    ``except ValueError``) handles carrot's too.
    """


class NotFittedError(CarrotError, AttributeError):
    """Raised when a fitted-only method is called before ``fit`` (a ValueError and AttributeError, as sklearn's)."""


class CarrotWarning(UserWarning):
    """Something the user should know that does not stop the work (skipped files, duplicates, a cache rebuilt);
    ``carrot-run`` prints it on one line."""


def warn(message: str) -> None:
    """Issue a :class:`CarrotWarning` (one line on the command line; filterable in Python)."""
    import warnings

    warnings.warn(message, CarrotWarning, stacklevel=2)


class StaleCacheError(CarrotError):
    """A cache on disk does not match what the current run would write."""


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message for a one-line error (its type's name when it has none);
    ``with_type``: prefixed with the type's name."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if with_type:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


def check_is_fitted(obj: object, attrs: tuple[str, ...] = ("coef_",)) -> None:
    """Raise :class:`NotFittedError` unless every attribute in ``attrs`` is set (sklearn-style)."""
    if not all(getattr(obj, a, None) is not None for a in attrs):
        raise NotFittedError(
            f"This {type(obj).__name__} instance is not fitted yet. "
            "Call 'fit' with appropriate arguments before using this estimator."
        )
