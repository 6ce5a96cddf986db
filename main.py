"""Thin orchestration entry points (fit, explain, evaluate, ...), kept at the top level as the design card lays
out the repository; the code lives in :mod:`carrot.run.commands`, which is what the CLI and users import."""
from carrot.run.commands import bench, compare, debug, demo, evaluate, explain, extract_splits, fit, predict, reweight, tracin

__all__ = ["bench", "compare", "debug", "demo", "evaluate", "explain", "extract_splits", "fit", "predict", "reweight", "tracin"]
