"""Shared by the benchmark scripts: result files and peak memory."""
from __future__ import annotations

import csv
import json
import resource
from pathlib import Path
from typing import Any


def write_results(out: str | Path, rows: list[dict[str, Any]], **meta: Any) -> Path:
    """``out``.json ({"rows": rows, **meta}) and ``out``.csv (one line a row); returns the JSON path."""
    out = Path(out).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, **meta}, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return out.with_suffix(".json")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' for a CUDA device, else the processor (for the result files)."""
    import platform

    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()
