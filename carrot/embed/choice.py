"""The embedding ``backbone.blocks`` and ``backbone.global_tokens`` 'auto' keep: candidate embeddings of one token cache
compared by the exact leave-one-out accuracy of their best head, as ``head.kind`` auto compares heads.

A candidate (k, c) is the diffusion readout g = H_k^T exp(-tL_k) 1 / N of the last k blocks' patch tokens H_k (each
block through the model's final norm, concatenated per token; the graph L_k is built on them), with the class and
register tokens of those blocks appended as the embedding's own exact part when c (issue 13). One extraction reads the
last K = max k blocks; a candidate of fewer blocks reads the last k K-th of each token's features from the same cache
(:meth:`~carrot.features.cache.TokenStore.last_blocks`), the tokens a k-block extraction writes. Every candidate is
embedded in one pass over the cached tokens (one graph per image and distinct k), each is fitted with the configured
head (``head.kind`` auto: the best head of each, its own settings by exact LOO), and the candidate whose head has the
highest exact LOO accuracy on the training set is kept (ties: the smaller embedding, listed first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from carrot.embed.embedder import Embedder

if TYPE_CHECKING:
    from carrot.config import RunConfig
    from carrot.features.backbone import TokenBackbone
    from carrot.features.cache import TokenStore
    from carrot.run.pipeline import Carrot

AUTO_BLOCKS = 4  # the deepest candidate: DINOv2's linear probe reads the last 4 blocks (Oquab et al. 2023, sec. 7)


@dataclass(frozen=True)
class Candidate:
    """One embedding of the backbone's tokens: the last ``blocks`` blocks' patch readout, with their class and register
    tokens appended when ``global_tokens``."""

    blocks: int
    global_tokens: bool

    @property
    def name(self) -> str:
        patches = "last block" if self.blocks == 1 else f"last {self.blocks} blocks"
        return patches + (" + class tokens" if self.global_tokens else "")

    def settings(self) -> dict[str, Any]:
        """The config keys that pin this candidate in a run."""
        return {"backbone.blocks": self.blocks, "backbone.global_tokens": self.global_tokens}


def is_auto(config: "RunConfig") -> bool:
    """Whether the run chooses its embedding (``backbone.blocks`` or ``backbone.global_tokens`` is 'auto')."""
    return config.backbone.blocks == "auto" or config.backbone.global_tokens == "auto"


def read_blocks(config: "RunConfig", backbone: "TokenBackbone") -> int:
    """Blocks one extraction reads so that every candidate of ``config`` is served from its cache: the configured k,
    or for 'auto' min(:data:`AUTO_BLOCKS`, the model's depth) (1 for a ConvNet, and with a token map, whose features
    are fitted on the tokens of one block width)."""
    blocks = config.backbone.blocks
    if blocks != "auto":
        return int(blocks)
    return 1 if config.token_map.kind != "none" else min(AUTO_BLOCKS, backbone.depth)


def candidates(config: "RunConfig", backbone: "TokenBackbone") -> tuple[list[Candidate], str]:
    """The embeddings 'auto' compares for this backbone, smallest first, and one line saying what they are or why
    there is only one. ``backbone.blocks`` is the K the cache was extracted with (:func:`read_blocks`, or fewer when
    the cache of K would not fit: :func:`carrot.run.commands.extract_splits`)."""
    b = config.backbone
    K, prefix = backbone.blocks, backbone.num_prefix_tokens > 0
    ks = [int(b.blocks)] if b.blocks != "auto" else sorted({1, K})
    cs = [bool(b.global_tokens)] if b.global_tokens != "auto" else ([False, True] if prefix else [False])
    pairs = [Candidate(k, c) for k in ks for c in cs]
    if b.blocks == "auto" and b.global_tokens == "auto" and len(ks) > 1 and prefix:
        pairs.remove(Candidate(K, False))  # the deeper readout is compared with its class tokens, as DINOv2 reads it
    limits = []
    if b.blocks == "auto" and K == 1:
        limits.append("a ConvNet's tokens are its last feature map only" if backbone.depth == 1 and backbone.patch_size is None
                      else "a token map is fitted on one block's tokens" if config.token_map.kind != "none"
                      else "the model has one block" if backbone.depth == 1 else "the cache of more blocks would not fit")
    if b.global_tokens == "auto" and not prefix:
        limits.append(f"'{backbone.name}' has no class or register tokens")
    what = ", ".join(c.name for c in pairs)
    line = (f"compared by exact LOO: {what}" if len(pairs) > 1 else f"one embedding ({what})")
    return pairs, line + (f" ({'; '.join(limits)})" if limits else "")


def embedders(config: "RunConfig", cands: Sequence[Candidate], token_map: Any = None) -> dict[Candidate, Embedder]:
    """Each candidate's embedder: the run's graph, diffusion, device and token map, its own global part."""
    return {c: Embedder(config.graph, config.diffusion, config.device, token_map, c.global_tokens) for c in cands}


def embed_batch(H: torch.Tensor, P: torch.Tensor, globals: torch.Tensor | None, K: int,
                embs: dict[Candidate, Embedder]) -> dict[Candidate, torch.Tensor]:
    """Every candidate's embeddings of one batch: one graph per image and distinct k.

    Parameters
    ----------
    H : (B, N, K F) float64 patch tokens of the last K blocks (the last block last); P : (N, 2) centres.
    globals : (B, G, K F) global tokens, or None when no candidate reads them.
    embs : :func:`embedders` of the candidates.

    Returns
    -------
    {candidate: (B, D_c) float64}, D_c = k F (or the token map's m) plus G k F with its global part.
    """
    F = H.shape[-1] // K
    out = {}
    for k in sorted({c.blocks for c in embs}):
        Hk = H[..., -k * F:]
        group = [c for c in embs if c.blocks == k]
        w = embs[group[0]].weights(Hk, P)[0]
        for c in group:
            out[c] = embs[c].readout(Hk, w, None if not c.global_tokens else globals[..., -k * F:])
    return out


def embed_store(store: "TokenStore", embs: dict[Candidate, Embedder], progress: bool = False,
                graph_bytes: int = 1 << 30) -> dict[Candidate, np.ndarray]:
    """Every candidate's embeddings (n, D_c) float64 of a token cache, in one pass over its tokens (batches keep the
    float64 graph arrays of every distinct k within ``graph_bytes``, as :meth:`Embedder.embed_store`)."""
    from tqdm.auto import tqdm

    N = store.tokens.shape[1]
    ks = {c.blocks for c in embs}
    batch = int(max(1, min(64, graph_bytes // (6 * 8 * N * N * len(ks)))))
    reads_globals = any(c.global_tokens for c in embs)
    out: dict[Candidate, np.ndarray] = {}
    P = store.positions.to(torch.float64)
    for s in tqdm(range(0, len(store), batch), desc=f"diffuse {len(embs)} embeddings", disable=not progress, unit="batch"):
        H = torch.from_numpy(np.asarray(store.tokens[s : s + batch], dtype=np.float64))
        C = torch.from_numpy(np.asarray(store.globals[s : s + batch], dtype=np.float64)) if reads_globals else None
        store.release()
        for c, g in embed_batch(H, P, C, store.blocks, embs).items():
            if c not in out:
                out[c] = np.empty((len(store), g.shape[1]))
            out[c][s : s + batch] = g.numpy()
    return out


def embed_inputs(model: "Carrot", batches: Iterator[torch.Tensor], n: int, embs: dict[Candidate, Embedder],
                 where: str) -> dict[Candidate, np.ndarray]:
    """Every candidate's embeddings (n, D_c) of model-input batches streamed through the backbone (no token cache),
    the tokens rounded as the cache rounds them (so equal to :func:`embed_store` of the same images' cache)."""
    out: dict[Candidate, np.ndarray] = {}
    done = 0
    for x in batches:
        regions, _ = model._regions(x, f"{where} rows {done}..{done + len(x)}", globals_too=True)
        for c, g in embed_batch(regions.H, regions.P, regions.globals, model.backbone.blocks, embs).items():
            if c not in out:
                out[c] = np.empty((n, g.shape[1]))
            out[c][done : done + len(x)] = g.numpy()
        done += len(x)
    return out


@dataclass
class Choice:
    """What 'auto' kept: the candidate, its fitted head, and the record (every candidate's exact LOO accuracy)."""

    candidate: Candidate
    head: Any
    record: dict[str, Any]


def choose(config: "RunConfig", train: dict[Candidate, np.ndarray], y: np.ndarray, line: str,
           sample_weight: np.ndarray | None = None) -> Choice:
    """Fit the configured head on every candidate's training embeddings (``head.kind`` auto: the best head of each)
    and keep the candidate with the highest exact LOO accuracy (ties: the first, the smaller embedding). Only the
    best head so far is kept alive, so the peak memory is one candidate's search plus the embeddings."""
    from carrot.progress import note
    from carrot.ridge.heads import fit_head, kind_of, loo_accuracy

    rows, best, best_acc, best_head = [], None, -1.0, None
    for i, (c, G) in enumerate(train.items()):
        if len(train) > 1:
            note(f"embedding auto ({i + 1}/{len(train)}): {c.name}, {G.shape[1]} features")
        head = fit_head(config, G, y, sample_weight)
        acc = loo_accuracy(head, G, y)
        rows.append({"embedding": c.name, "blocks": c.blocks, "global_tokens": c.global_tokens,
                     "features": int(G.shape[1]), "head": kind_of(head).name, "loo_accuracy": acc})
        if acc > best_acc:
            best, best_acc, best_head = c, acc, head
        del head
    if len(train) > 1:
        note(f"embedding auto: kept the {best.name} (exact LOO accuracy: "
             + ", ".join(f"{r['embedding']} {r['loo_accuracy']:.4f}" for r in rows) + ")")
    return Choice(best, best_head, {"chosen": best.name, "candidates": rows, "note": line})


def embedding_line(choice: dict[str, Any] | None, config: "RunConfig") -> str:
    """The run's embedding in words, with every candidate's exact LOO accuracy when 'auto' chose it."""
    b = config.backbone
    name = Candidate(int(b.blocks), bool(b.global_tokens)).name if b.blocks != "auto" and b.global_tokens != "auto" else "?"
    if not choice:
        return f"embedding: {name}"
    scores = ", ".join(f"{r['embedding']} {r['loo_accuracy']:.4f} ({r['head']})" for r in choice["candidates"])
    if len(choice["candidates"]) == 1:
        return f"embedding: {name}, the only one ({choice['note']})"
    return f"embedding: {name}, chosen by backbone auto (exact LOO accuracy: {scores})"
