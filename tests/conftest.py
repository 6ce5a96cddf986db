from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session gets its own carrot cache dir (weights, tokens, synthetic data)."""
    os.environ["CARROT_CACHE_DIR"] = str(tmp_path_factory.mktemp("carrot-cache"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from carrot.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), num_classes=3, per_class=6, size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_vit():
    """A randomly initialised tiny ViT with 4 register tokens at 32 px (no download)."""
    from carrot.features.backbone import create_backbone

    return create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


TINY_BACKBONE = {"name": "vit_tiny_patch16_224", "img_size": 32, "pretrained": False, "batch_size": 8}


@pytest.fixture(scope="session")
def fit_tiny(synthetic_root):
    """fit_tiny(out, **config sections) -> out: `carrot-run fit` on the synthetic set with a random-init tiny ViT."""
    import yaml
    from click.testing import CliRunner

    from carrot.cli import cli

    def fit(out: Path, **sections) -> Path:
        cfg = out.parent / f"{out.name}.yaml"
        cfg.write_text(yaml.safe_dump({"backbone": TINY_BACKBONE, **sections}))
        r = CliRunner().invoke(cli, ["fit", "--config", str(cfg), "--data", str(synthetic_root), "--out", str(out), "--quiet"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return out

    return fit


@pytest.fixture(scope="session")
def explain_json():
    """explain_json(run, image, out, *flags) -> the one explanation `carrot-run explain RUN IMAGE --top-k 2 --json`
    prints (pages written under ``out``), the command's exit code checked."""
    import json

    from click.testing import CliRunner

    from carrot.cli import cli

    def explain(run: Path, image: str, out: Path, *flags: str) -> dict:
        r = CliRunner().invoke(cli, ["explain", str(run), str(image), "--top-k", "2", "--out", str(out), "--json", *flags])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)[0]

    return explain
