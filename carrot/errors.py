"""User-facing errors: the CLI prints them on one line, never as a traceback."""
from __future__ import annotations


class CarrotError(Exception):
    """A mistake in the user's input or environment, with a message that says how to fix it."""


class NotFittedError(CarrotError, ValueError):
    """Raised when a fitted-only method is called before ``fit``."""


class StaleCacheError(CarrotError):
    """A cache on disk does not match what the current run would write."""


def check_is_fitted(obj: object, attrs: tuple[str, ...] = ("coef_",)) -> None:
    """Raise :class:`NotFittedError` unless every attribute in ``attrs`` is set (sklearn-style)."""
    if not all(getattr(obj, a, None) is not None for a in attrs):
        raise NotFittedError(
            f"This {type(obj).__name__} instance is not fitted yet. "
            "Call 'fit' with appropriate arguments before using this estimator."
        )
