"""Frozen, range-checked run configuration; YAML/dict in, ``to_dict()`` out.

Every key is checked for its type and range when the config is built, before any work starts, so a
mistake is a one-line :class:`CarrotError` naming the key, what it expects and what it got. Settings
that decide memory or time are bounded by what a workstation can do, and the bound is in the message.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carrot.errors import CarrotError

MAX_IMG_SIZE = 2048  # px; beyond it a ViT's region graph (N = (side / patch)^2 nodes) outgrows a workstation
MAX_BATCH_SIZE = 4096
MAX_WORKERS = 256  # DataLoader processes; a bound that does not depend on the machine, so a run loads anywhere
MAX_SEED = 2**32 - 1
REMOVALS = ("blur", "mean", "inpaint", "drop")  # how a pixel map removes a cell (carrot.attribution.pixels.CellGame); words: carrot.report.explanation
DEFAULT_REMOVAL = "auto"  # explain's pixel maps: drop a ViT's tokens, blur a ConvNet's pixels (bench_pixel_curve.py)
DEFAULT_BLOCK = "auto"  # the Shapley map's players: blocks of the fewest cells that make at most MAX_PLAYERS
MAX_PLAYERS = 64  # measured (bench_pixel_curve): DINOv2's 16 x 16 cells in 2 x 2 blocks, about 8 s a map on a 2-core CPU; 3 x 3 and 4 x 4 blocks delete worse under every removal
DEFAULT_PERMUTATIONS = 4  # the orders explain's Shapley pixel map samples by default (bench_pixel_curve.py: others)
PRECISIONS = ("auto", "float32", "bfloat16")  # the backbone's arithmetic (carrot.features.backbone.resolve_precision)
MAX_BLOCKS = 48  # the deepest timm ViTs have 48 blocks
MAX_CHEBYSHEV_TERMS = 20_000  # Chebyshev terms for exp(-tL); above it eigh (exact for any t) is the method
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
CLI_KINDS = ("int", "str", "bool", "choice", "dir", "file", "out_dir", "fraction", "nonneg", "auto", "auto_int", "median")


def setting(default: Any, help: str, flag: str | None = None, cli: str = "str", choices: tuple[str, ...] = ()) -> Any:
    """A config key: its ``default``, its ``help`` (the one text ``--help``, ``configs/default.yaml`` and the docs
    show), the ``carrot-run`` ``flag`` that sets it (None: YAML only) and how the flag parses (``cli``, one of
    :data:`CLI_KINDS`: a number (an integer) or 'auto' / 'median', an existing file or folder, a fraction, ``choices``...)."""
    if cli not in CLI_KINDS:
        raise ValueError(f"cli: expected one of {CLI_KINDS}, got {cli!r}")
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli, "choices": tuple(choices)})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_int(name: str, v: Any, lo: int, hi: int | None = None, null: bool = False, why: str = "") -> None:
    """``v`` is an integer in [lo, hi] (or None when ``null``), else a one-line error naming ``name``."""
    if v is None and null:
        return
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise CarrotError(f"{name}: expected {want}{' or null' if null else ''}{why}, got {v!r}")


def check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise CarrotError(f"{name}: expected true or false, got {v!r}")


def check_str(name: str, v: Any, null: bool = False) -> None:
    if v is None and null:
        return
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v.strip() or "\x00" in v:
        raise CarrotError(f"{name}: expected a non-empty string{' or null' if null else ''}, got {v!r}")


def _fspath(obj: Any, name: str) -> None:
    """A path given as ``os.PathLike`` (``pathlib.Path``) is kept as its string, as YAML and run.json hold it."""
    v = getattr(obj, name)
    if isinstance(v, os.PathLike):
        object.__setattr__(obj, name, os.fspath(v))


def median_factor(value: object, name: str) -> float | None:
    """k for 'median' (1) or 'median*k' (k > 0, else a named error); None for anything else."""
    if value == "median":
        return 1.0
    if not (isinstance(value, str) and value.startswith("median*")):
        return None
    try:
        k = float(value[len("median*"):])
    except ValueError:
        k = float("nan")
    if not (k > 0 and k != float("inf")):
        raise CarrotError(f"{name}: expected 'median', 'median*k' with k > 0, or a positive number, got {value!r}")
    return k


def chebyshev_order(t: float) -> int:
    """Terms of the Chebyshev series of exp(-tL) that reach double precision (the error decays past k ~ t)."""
    return int(math.ceil(t + 12 * math.sqrt(t + 1) + 10))


def _positive_or_median(name: str, v: Any) -> None:
    if isinstance(v, str) and median_factor(v, name) is not None:
        return
    if not _is_number(v) or not v > 0:
        raise CarrotError(f"{name}: expected 'median', 'median*k' (k > 0) or a finite number > 0, got {v!r}")
DATA_KINDS = ("elpv", "imagefolder", "cub", "nabirds", "cars", "aircraft", "flowers102", "dogs", "fashion-mnist", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    kind: str = setting("elpv", "Data set layout (default: elpv, or imagefolder when --data is given); cars, aircraft and "
                        "flowers102 are read by torchvision's loaders.", "--data-kind", "choice", DATA_KINDS)
    root: str | None = setting(None, "Data set root: an ImageFolder tree, a CUB-200-2011 / NABirds / Stanford Dogs folder, "
                               "or the folder holding a local Stanford Cars / FGVC-Aircraft / Flowers-102 copy (elpv, "
                               "synthetic: none).", "--data", "dir")
    test_fraction: float = setting(0.25, "Held-out fraction when the data has no test split of its own.", "--test-fraction",
                                   "fraction")
    split_seed: int = setting(0, "Seed of the train/test split (--seed sets it together with seed).")
    bbox_crop: bool = setting(False, "cub, nabirds, cars, aircraft, dogs: crop each image to its annotated bounding box.",
                              "--bbox-crop", "bool")
    max_per_class: int | None = setting(None, "Use at most this many images per class (elpv and root/<class> folders: "
                                        "before the split; data with its own split: in each split).", "--max-per-class",
                                        "int")

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise CarrotError(f"data.kind: expected one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        _fspath(self, "root")
        check_str("data.root", self.root, null=True)
        if not _is_number(self.test_fraction) or not 0 < self.test_fraction < 1:
            raise CarrotError(f"data.test_fraction: expected a number in (0, 1), got {self.test_fraction!r}")
        check_int("data.split_seed", self.split_seed, 0, MAX_SEED)
        check_bool("data.bbox_crop", self.bbox_crop)
        check_int("data.max_per_class", self.max_per_class, 2, null=True)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = setting("dinov2_vits14", "Built-in 'dinov2_vits14' (default) or 'efficientnet_lite0' (both offline), or any "
                        "timm model name.", "--backbone")
    img_size: int | None = setting(None, "Input image side in pixels (none: the backbone's default, 224 for the "
                                   "built-ins).", "--img-size", "int")
    checkpoint: str | None = setting(None, "Local weights file (.pth/.safetensors) for the backbone.", "--checkpoint", "file")
    pretrained: bool = setting(True, "Load timm's pretrained weights for a timm model name (its hub download when online; "
                               "the built-ins ship their weights).")
    batch_size: int = setting(32, "Images per backbone batch.", "--batch-size", "int")
    num_workers: int = setting(0, "DataLoader processes decoding images during extraction (0: in the main process).")
    cache_dtype: str = setting("float16", "dtype of the cached tokens: float16 or float32.")
    cache_tokens: bool = setting(True, "Keep backbone tokens in the on-disk cache (default), or stream images straight to "
                                 "embeddings (no cache; for data sets whose tokens do not fit on disk).", "--cache-tokens",
                                 "bool")
    precision: str = setting("auto", "Backbone arithmetic: 'auto' (bfloat16 autocast for a ViT on a CPU with "
                             "AVX512-BF16 or AMX tiles: DINOv2 extracts 1.75x faster, tokens within 0.8%; float32 "
                             "elsewhere and for ConvNets, whose tokens move 10%), 'float32' or 'bfloat16'. Pinned in the "
                             "run; every identity holds for the tokens extracted.", "--precision")
    blocks: int | str = setting("auto", "ViTs: read the last k blocks' tokens, each through the final norm, concatenated per "
                                "token (DINOv2's linear probe reads 4), or 'auto': compare the embeddings of the last "
                                "block and of the last 4 blocks by the exact LOO accuracy of their best head, from one "
                                "extraction (carrot.embed.choice; ConvNets have one embedding).", "--blocks", "auto_int")
    global_tokens: bool | str = setting("auto", "ViTs: add the class (and register) tokens to the embedding as its own "
                                        "part, as DINOv2's linear probe does; the region split covers the patch part and "
                                        "the global part is its own exact term. 'auto': chosen with backbone.blocks by "
                                        "exact LOO.", "--global-tokens", "bool")

    def __post_init__(self) -> None:
        check_str("backbone.name", self.name)
        check_int("backbone.img_size", self.img_size, 8, MAX_IMG_SIZE, null=True,
                  why=" (larger inputs make region graphs beyond a workstation's memory)")
        _fspath(self, "checkpoint")
        check_str("backbone.checkpoint", self.checkpoint, null=True)
        check_bool("backbone.pretrained", self.pretrained)
        check_int("backbone.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_int("backbone.num_workers", self.num_workers, 0, MAX_WORKERS)
        if self.cache_dtype not in ("float16", "float32"):
            raise CarrotError(f"backbone.cache_dtype: expected float16 or float32, got {self.cache_dtype!r}")
        check_bool("backbone.cache_tokens", self.cache_tokens)
        if self.precision not in PRECISIONS:
            raise CarrotError(f"backbone.precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.blocks != "auto":
            check_int("backbone.blocks", self.blocks, 1, MAX_BLOCKS, why=" or 'auto'")
        if self.global_tokens != "auto" and not isinstance(self.global_tokens, bool):
            raise CarrotError(f"backbone.global_tokens: expected true, false or auto, got {self.global_tokens!r}")


@dataclass(frozen=True)
class GraphConfig:
    sigma_space: float | str = setting("median", "Spatial kernel bandwidth: a number, 'median' or 'median*k'.",
                                       "--sigma-space", "median")
    sigma_feat: float | str = setting("median", "Feature kernel bandwidth: a number, 'median' or 'median*k'.",
                                      "--sigma-feat", "median")
    knn: int | None = setting(None, "Keep each region's k strongest edges (symmetrised); none: the dense graph.", "--knn",
                              "int")

    def __post_init__(self) -> None:
        _positive_or_median("graph.sigma_space", self.sigma_space)
        _positive_or_median("graph.sigma_feat", self.sigma_feat)
        check_int("graph.knn", self.knn, 1, null=True)


@dataclass(frozen=True)
class DiffusionConfig:
    t: float = setting(1.0, "Diffusion time t >= 0 (0 = plain mean pooling).", "--t", "nonneg")
    method: str = setting("auto", "exp(-tL) solver: eigh (eigendecomposition), chebyshev (series, exact to ~1e-14), auto "
                          "(chebyshev for one t).", "--diffusion-method", "choice", ("auto", "eigh", "chebyshev"))

    def __post_init__(self) -> None:
        if not _is_number(self.t) or not self.t >= 0:
            raise CarrotError(f"diffusion.t: expected a finite number >= 0, got {self.t!r}")
        if self.method not in ("auto", "eigh", "chebyshev"):
            raise CarrotError(f"diffusion.method: expected 'auto', 'eigh' or 'chebyshev', got {self.method!r}")
        if self.method == "chebyshev" and chebyshev_order(self.t) > MAX_CHEBYSHEV_TERMS:
            raise CarrotError(f"diffusion.t: t = {self.t:g} needs {chebyshev_order(self.t)} Chebyshev terms (at most "
                              f"{MAX_CHEBYSHEV_TERMS}); use method eigh or auto, exact for any t")


HEAD_KINDS = ("ridge", "kernel", "auto")  # carrot.ridge.heads.HEADS, named here so that a config validates without torch
KERNEL_NAMES = ("rbf", "laplacian", "poly")  # carrot.ridge.kernel.KERNELS
KERNEL_APPROXIMATIONS = ("auto", "exact", "nystroem")  # carrot.ridge.kernel.APPROXIMATIONS
MAX_LANDMARKS = 65_536  # the Nystroem head's n x m features and m x m solve grow with it


@dataclass(frozen=True)
class HeadConfig:
    kind: str = setting("auto", "auto (default): fit the ridge and the kernel head, keep the one with the higher exact "
                        "leave-one-out accuracy (ties: ridge). ridge: linear ridge on the embedding, every exact identity, "
                        "the region split included. kernel: kernel ridge (dual), often more accurate with many classes; "
                        "exact training-image terms, LOO, removal, RRO and the audits, no additive region split.",
                        "--head", "choice", HEAD_KINDS)
    lam: float | str = setting("auto", "Ridge strength lambda > 0, or 'auto' (best exact leave-one-out accuracy on the "
                               "training set).", "--lam", "auto")
    fit_intercept: bool = setting(True, "Fit an unpenalised intercept by weighted centring (the prior term of every "
                                  "explanation); false keeps the ridge head.")
    solver: str = setting("auto", "The ridge head's solve: primal (D x D), dual (n x n), auto (primal when n >= D).",
                          cli="choice", choices=("auto", "primal", "dual"))
    kernel: str = setting("rbf", "The kernel head's kernel, on standardised, L2-normalised embeddings.", "--kernel",
                          "choice", KERNEL_NAMES)
    gamma: float | str = setting("auto", "The kernel's gamma > 0, or 'auto' (chosen with lambda by exact leave-one-out, one "
                                 "eigendecomposition per gamma).", "--gamma", "auto")
    approx: str = setting("auto", "The kernel head's solve: exact (the n x n dual), nystroem (the Nystroem kernel of "
                          "head.landmarks training images, explained exactly as that model), auto (exact up to 8192 "
                          "training images when it fits in half the memory, nystroem above).", "--kernel-approx", "choice",
                          KERNEL_APPROXIMATIONS)
    landmarks: int = setting(2048, "Landmarks m (training images) of the Nystroem kernel head.", "--landmarks", "int")

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise CarrotError(f"head.kind: expected {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        if self.kernel not in KERNEL_NAMES:
            raise CarrotError(f"head.kernel: expected {', '.join(KERNEL_NAMES)}, got {self.kernel!r}")
        for name in ("lam", "gamma"):
            v = getattr(self, name)
            if v != "auto" and (not _is_number(v) or not v > 0):
                raise CarrotError(f"head.{name}: expected 'auto' or a finite number > 0, got {v!r}")
        check_bool("head.fit_intercept", self.fit_intercept)
        if self.kind == "kernel" and self.fit_intercept is not True:  # auto then keeps ridge (carrot.ridge.heads.fit_head)
            raise CarrotError(f"head.fit_intercept: the kernel head always fits an unpenalised intercept; expected "
                              f"true, got {self.fit_intercept!r}")
        if self.solver not in ("auto", "primal", "dual"):
            raise CarrotError(f"head.solver: expected auto, primal or dual, got {self.solver!r}")
        if self.approx not in KERNEL_APPROXIMATIONS:
            raise CarrotError(f"head.approx: expected {', '.join(KERNEL_APPROXIMATIONS)}, got {self.approx!r}")
        check_int("head.landmarks", self.landmarks, 1, MAX_LANDMARKS)


TOKEN_MAP_KINDS = ("none", "rff", "nystroem")  # carrot.embed.tokenmap.TOKEN_MAPS
MAX_TOKEN_MAP_DIM = 16_384  # features per token; the (B, N, m) batch of mapped tokens and the m x m head grow with it


@dataclass(frozen=True)
class TokenMapConfig:
    kind: str = setting("none", "A feature map of each region token before the readout: nystroem or rff approximate an "
                        "RBF kernel on the standardised tokens, so the linear head on g = sum_j w_j phi(h_j) is kernel "
                        "ridge on the images' region sets, and the region split and pairs stay exact.", "--token-map",
                        "choice", TOKEN_MAP_KINDS)
    dim: int = setting(1024, "Features per token m of the token map.", "--token-map-dim", "int")
    gamma: float | str = setting("auto", "The token map's RBF parameter on standardised tokens, or 'auto' (1 / the median "
                                 "squared token distance).")

    def __post_init__(self) -> None:
        if self.kind not in TOKEN_MAP_KINDS:
            raise CarrotError(f"token_map.kind: expected {', '.join(TOKEN_MAP_KINDS)}, got {self.kind!r}")
        check_int("token_map.dim", self.dim, 1, MAX_TOKEN_MAP_DIM)
        if self.gamma != "auto" and (not _is_number(self.gamma) or not self.gamma > 0):
            raise CarrotError(f"token_map.gamma: expected 'auto' or a finite number > 0, got {self.gamma!r}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    token_map: TokenMapConfig = field(default_factory=TokenMapConfig)
    device: str = setting("auto", "auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps.", "--device")
    seed: int = setting(0, "Seed for splits and sampling (same seed, same results).", "--seed", "int")
    cache_dir: str | None = setting(None, "Token cache root (none: the user cache folder's tokens/, "
                                    "~/.cache/carrot/tokens).", "--cache-dir", "out_dir")

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise CarrotError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        check_int("seed", self.seed, 0, MAX_SEED)
        _fspath(self, "cache_dir")
        check_str("cache_dir", self.cache_dir, null=True)

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
    "diffusion": DiffusionConfig, "head": HeadConfig, "token_map": TokenMapConfig,
}


def config_keys() -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, its dataclass field) of every config key, in the dataclasses' order: the single source that
    ``configs/default.yaml`` (:func:`default_yaml`) and the ``carrot-run`` flags (:func:`carrot.cli.run_options`) are
    generated from."""
    out = []
    for f in dataclasses.fields(RunConfig):
        sub = _SECTIONS.get(f.name)
        out += [(f.name, f)] if sub is None else [(f"{f.name}.{g.name}", g) for g in dataclasses.fields(sub)]
    return out


def default_yaml(width: int = 100) -> str:
    """The text of ``configs/default.yaml``: every key with its default and its help as a comment (``make config``)."""
    import textwrap

    import yaml

    lines = ["# Defaults of every carrot-run command, generated from carrot/config.py by `make config`; flags override",
             "# (--config FILE merges a file), unknown keys are errors."]
    section = None
    for key, f in config_keys():
        head, _, leaf = key.rpartition(".")
        if head != section:
            section = head
            if head:
                lines.append(f"{head}:")
        indent = "  " if head else ""
        flag = f" ({f.metadata['flag']})" if f.metadata.get("flag") else ""
        lines += textwrap.wrap(f.metadata["help"] + flag, width - len(indent) - 2, initial_indent=f"{indent}# ",
                               subsequent_indent=f"{indent}# ", break_on_hyphens=False)
        lines.append(indent + yaml.safe_dump({leaf: f.default}, default_flow_style=False, sort_keys=False).strip())
    return "\n".join(lines) + "\n"


def _unique_keys_loader() -> type:
    """PyYAML's SafeLoader refusing a mapping that names a key twice (it would keep the last one silently)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if dup is not None:
                raise yaml.constructor.ConstructorError(None, None, f"key {dup!r} appears twice", node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def load_config(path: str | Path | None) -> RunConfig:
    """Defaults merged with a YAML file (if given)."""
    if path is None:
        return RunConfig()
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CarrotError(f"config: file not found: '{p}'")
    try:
        d = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_keys_loader()) or {}
    except UnicodeDecodeError:
        raise CarrotError(f"config: '{p}' is not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        raise CarrotError(f"config: '{p}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    return RunConfig.from_dict(d)
