"""Audits of a fitted run. Importing the package registers every audit (:mod:`carrot.audit.registry`), in the order
the index page shows them."""
from carrot.audit import evaluate  # noqa: I001  (the import order is the registry's order)
from carrot.audit import tracin
from carrot.audit import reweight
from carrot.audit import debugging
from carrot.audit import sweep
from carrot.audit import compare

__all__ = ["evaluate", "tracin", "reweight", "debugging", "sweep", "compare"]
