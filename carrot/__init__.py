"""carrot: fine-grained image classification with exact training-data and region attribution."""
__version__ = "0.1.0"

from .errors import CarrotError, NotFittedError, StaleCacheError  # noqa: E402

__all__ = ["__version__", "CarrotError", "NotFittedError", "StaleCacheError"]
