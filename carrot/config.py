"""Frozen, range-checked run configuration; YAML/dict in, ``to_dict()`` out."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carrot.errors import CarrotError


def _positive_or_median(name: str, v: Any) -> None:
    from carrot.embed.graph import median_factor

    if median_factor(v, name) is not None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise CarrotError(f"{name}: expected 'median', 'median*k' (k > 0) or a number > 0, got {v!r}")


DATA_KINDS = ("elpv", "imagefolder", "cub", "nabirds", "cars", "aircraft", "flowers102", "dogs", "fashion-mnist", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "elpv"  # one of DATA_KINDS
    root: str | None = None
    test_fraction: float = 0.25
    split_seed: int = 0
    bbox_crop: bool = False
    max_per_class: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise CarrotError(f"data.kind: expected one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        if not 0 < float(self.test_fraction) < 1:
            raise CarrotError(f"data.test_fraction: expected a number in (0, 1), got {self.test_fraction!r}")
        if self.max_per_class is not None and (not isinstance(self.max_per_class, int) or self.max_per_class < 2):
            raise CarrotError(f"data.max_per_class: expected an integer >= 2 or null, got {self.max_per_class!r}")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "dinov2_vits14"
    img_size: int | None = None
    checkpoint: str | None = None
    pretrained: bool = True
    batch_size: int = 32
    num_workers: int = 0
    cache_dtype: str = "float16"
    cache_tokens: bool = True

    def __post_init__(self) -> None:
        if self.img_size is not None and (not isinstance(self.img_size, int) or self.img_size < 1):
            raise CarrotError(f"backbone.img_size: expected a positive integer or null, got {self.img_size!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CarrotError(f"backbone.batch_size: expected a positive integer, got {self.batch_size!r}")
        if not isinstance(self.cache_tokens, bool):
            raise CarrotError(f"backbone.cache_tokens: expected true or false, got {self.cache_tokens!r}")
        if self.cache_dtype not in ("float16", "float32"):
            raise CarrotError(f"backbone.cache_dtype: expected float16 or float32, got {self.cache_dtype!r}")


@dataclass(frozen=True)
class GraphConfig:
    sigma_space: float | str = "median"
    sigma_feat: float | str = "median"
    knn: int | None = None

    def __post_init__(self) -> None:
        _positive_or_median("graph.sigma_space", self.sigma_space)
        _positive_or_median("graph.sigma_feat", self.sigma_feat)
        if self.knn is not None and (isinstance(self.knn, bool) or not isinstance(self.knn, int) or self.knn < 1):
            raise CarrotError(f"graph.knn: expected a positive integer or null, got {self.knn!r}")


@dataclass(frozen=True)
class DiffusionConfig:
    t: float = 1.0
    method: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.t, bool) or not isinstance(self.t, (int, float)) or not self.t >= 0:
            raise CarrotError(f"diffusion.t: expected a number >= 0, got {self.t!r}")
        if self.method not in ("auto", "eigh", "chebyshev"):
            raise CarrotError(f"diffusion.method: expected 'auto', 'eigh' or 'chebyshev', got {self.method!r}")


@dataclass(frozen=True)
class HeadConfig:
    lam: float | str = "auto"
    fit_intercept: bool = True
    solver: str = "auto"

    def __post_init__(self) -> None:
        if self.lam != "auto" and (isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam > 0):
            raise CarrotError(f"head.lam: expected 'auto' or a number > 0, got {self.lam!r}")
        if self.solver not in ("auto", "primal", "dual"):
            raise CarrotError(f"head.solver: expected auto, primal or dual, got {self.solver!r}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    device: str = "auto"
    seed: int = 0
    cache_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from a nested dict; unknown sections or keys are errors that name them."""
        if not isinstance(d, dict):
            raise CarrotError(f"config: expected a mapping, got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in sections:
                raise CarrotError(f"config: unknown key {key!r}; expected one of {sorted(sections)}")
            sub = _SECTIONS.get(key)
            if sub is None:
                kwargs[key] = value
                continue
            if value is None:
                continue
            if not isinstance(value, dict):
                raise CarrotError(f"config.{key}: expected a mapping, got {value!r}")
            names = {f.name for f in dataclasses.fields(sub)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise CarrotError(f"config.{key}: unknown key(s) {unknown}; expected some of {sorted(names)}")
            kwargs[key] = sub(**value)
        return cls(**kwargs)

    def merged(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted-key overrides applied (``{'head.lam': 2.0}``); ``None`` values skipped."""
        d = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = d
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return RunConfig.from_dict(d)


_SECTIONS = {
    "data": DataConfig, "backbone": BackboneConfig, "graph": GraphConfig,
    "diffusion": DiffusionConfig, "head": HeadConfig,
}


def load_config(path: str | Path | None) -> RunConfig:
    """Defaults merged with a YAML file (if given)."""
    if path is None:
        return RunConfig()
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CarrotError(f"config: file not found: '{p}'")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CarrotError(f"config: '{p}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    return RunConfig.from_dict(d)
