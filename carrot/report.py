"""Explanation artefacts: region heatmap PNGs and per-image JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_path, write_json


def heatmap_png(image, contributions: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Overlay an (h, w) region-contribution grid on ``image`` (PIL) and write a PNG atomically.

    Red regions raise the explained logit, blue ones lower it; the colour scale is symmetric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.asarray(contributions, dtype=np.float64)
    vmax = float(np.abs(r).max()) or 1.0
    img = np.asarray(image.convert("RGB"))
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), dpi=100)
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(img)
    im = axes[1].imshow(
        r, cmap="bwr", vmin=-vmax, vmax=vmax, alpha=0.55, interpolation="bilinear",
        extent=(0, img.shape[1], img.shape[0], 0),
    )
    axes[1].set_title(title or "region contributions", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_explanation(exp: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write ``heatmap.png`` and ``explanation.json`` for one explained image into ``out_dir``."""
    out_dir = Path(out_dir)
    image = exp.pop("_image")
    png = heatmap_png(
        image, np.asarray(exp["region_contributions"]), out_dir / "heatmap.png",
        title=f"regions -> {exp['predicted']}",
    )
    exp["heatmap"] = str(png)
    write_json(out_dir / "explanation.json", exp)
    return exp
