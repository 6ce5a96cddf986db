"""``Carrot``: backbone tokens -> graph -> diffusion -> readout -> closed-form head (any registered head), with exact
explanations (:mod:`carrot.run.explaining`) and a run directory (:mod:`carrot.run.persistence`)."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from carrot import __version__
from carrot.features.backbone import TokenBackbone, create_backbone, patch_centres
from carrot.features.cache import TokenStore
from carrot.config import DEFAULT_BLOCK, DEFAULT_PERMUTATIONS, DEFAULT_REMOVAL, REMOVALS, RunConfig
from carrot.data import ImageDataset, ImageRecord, load_image
from carrot.embed.embedder import Embedder
from carrot.embed.tokenmap import TokenMap, sample_tokens
from carrot.errors import CarrotError, check_is_fitted
from carrot.report.explanation import Explanation
from carrot.ridge.heads import fit_head
from carrot.ridge.system import TrainingSystem
from carrot.features.regions import RegionSet

if TYPE_CHECKING:
    from carrot.attribution.pixels import CellGame

class Carrot:
    """The whole pipeline for one configuration. Fit on a cached training split, then explain."""

    def __init__(self, config: RunConfig | None = None, backbone: TokenBackbone | None = None) -> None:
        self.config = config or RunConfig()
        self._backbone: TokenBackbone | None = backbone
        self.head_: Any = None  # a registered head (carrot.ridge.heads), once fitted
        self.token_map_: TokenMap | None = None

    @property
    def backbone(self) -> TokenBackbone:
        if self._backbone is None:
            b = self.config.backbone
            from carrot.embed.choice import read_blocks

            self._backbone = create_backbone(
                b.name, img_size=b.img_size, checkpoint=b.checkpoint, pretrained=b.pretrained, device=self.config.device,
                seed=self.config.seed, blocks=1 if b.blocks == "auto" else b.blocks, precision=b.precision,
            )
            self._backbone.blocks = read_blocks(self.config, self._backbone)  # 'auto': what every candidate reads
            if b.global_tokens is True and not self._backbone.num_prefix_tokens:
                raise CarrotError(f"backbone.global_tokens: '{b.name}' has no class or register tokens (a ConvNet or a "
                                  "ViT without them); expected false")
        return self._backbone

    def _check_pinned(self, what: str) -> None:
        """Refuse an embedding still 'auto' where one must be known (the run's choice pins it)."""
        b = self.config.backbone
        if b.blocks == "auto" or b.global_tokens == "auto":
            raise CarrotError(f"{what}: backbone.blocks / backbone.global_tokens are 'auto', chosen when a run is fitted "
                              "(carrot-run fit, carrot.run.commands.fit); pin them for the embeddings you give, e.g. "
                              "RunConfig().merged({'backbone.blocks': 1, 'backbone.global_tokens': False})")

    def use_embedding(self, candidate: Any) -> "Carrot":
        """Pin the embedding 'auto' chose (a :class:`~carrot.embed.choice.Candidate`): the config's blocks and global
        tokens, and the backbone reading that many blocks (the cache of more serves it by its last columns)."""
        self.config = self.config.merged(candidate.settings())
        if self._backbone is not None:
            self._backbone.blocks = candidate.blocks
            self._backbone_info = None
        return self

    @property
    def embedder(self) -> Embedder:
        """The configured tokens -> graph -> diffusion -> readout chain (graph, diffusion, device, token map)."""
        return Embedder.from_config(self.config, self.token_map_)

    def fit_token_map(self, tokens: np.ndarray) -> "Carrot":
        """Fit the configured token map (``token_map.kind`` rff | nystroem) on training tokens: a split's (n, N, D)
        (its seeded sample is read) or a sample (M, D); nothing to do for kind 'none'. Precedes the embeddings."""
        tm = self.config.token_map
        if tm.kind == "none":
            self.token_map_ = None
            return self
        tokens = sample_tokens(tokens, seed=self.config.seed) if np.ndim(tokens) == 3 else np.asarray(tokens)
        self.token_map_ = TokenMap(tm.kind, tm.dim, tm.gamma, self.config.seed).fit(tokens)
        return self

    def embed_regions(self, regions: RegionSet) -> tuple[torch.Tensor, torch.Tensor]:
        """RegionSet -> g = H^T exp(-tL) 1 / N (B, D) and w (B, N), float64; t = 0 is mean pooling."""
        return self.embedder.embed(regions)

    def region_weights(self, H: torch.Tensor, P: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
        """Readout weights w(t) (T, B, N) float64 on the CPU (see :meth:`Embedder.weights`)."""
        return self.embedder.weights(H, P, ts)

    def embed_store(self, store: TokenStore, batch: int | None = None, progress: bool = False,
                    graph_bytes: int = 1 << 30, ts: Sequence[float] | None = None) -> np.ndarray:
        """Embeddings of a cached split (see :meth:`Embedder.embed_store`)."""
        return self.embedder.embed_store(store, batch, progress, graph_bytes, ts)

    def embed_dataset(self, dataset: ImageDataset, progress: bool = False) -> np.ndarray:
        """Embeddings (n, D) float64 of a data set streamed straight from the images (no token cache);
        tokens are rounded to the cache dtype first, so with the same backbone batches the result equals the
        cached path's."""
        out, done = None, 0
        for x in self.input_batches(dataset, progress):
            G = self.embed_regions(self._regions(x, f"{dataset.name} rows {done}..{done + len(x)}")[0])[0].numpy()
            out = np.empty((len(dataset), G.shape[1])) if out is None else out
            out[done : done + len(x)] = G
            done += len(x)
        return out

    def input_batches(self, dataset: ImageDataset, progress: bool = False) -> Iterator[torch.Tensor]:
        """A data set's images as model-input batches (B, 3, H, W) of ``backbone.batch_size``, decoded by
        ``backbone.num_workers`` DataLoader processes, with a bar in images (a worker's error in one line)."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from carrot.features.cache import RecordImages, worker_errors

        bb, b = self.backbone, self.config.backbone
        loader = DataLoader(RecordImages(dataset, bb.transform(), bb.min_side), batch_size=b.batch_size,
                            num_workers=b.num_workers, shuffle=False)
        with worker_errors(), tqdm(total=len(dataset), desc=f"embed {dataset.name}", unit="img", disable=not progress) as bar:
            for x in loader:
                yield x
                bar.update(len(x))

    def sample_tokens(self, dataset: ImageDataset) -> np.ndarray:
        """The token-map sample (M, D) of a split computed by the backbone, rounded as the cache rounds them: the
        tokens :func:`~carrot.embed.tokenmap.sample_tokens` reads from a cache of the split (a fit without one)."""
        from carrot.embed.tokenmap import sample_images, thin_tokens
        from carrot.features.cache import _probe_grid

        bb = self.backbone
        (gh, gw), _, _ = _probe_grid(bb)
        idx = sample_images(len(dataset), gh * gw, self.config.seed)
        b = self.config.backbone.batch_size
        H = np.concatenate([self._as_cached(bb(self.inputs([dataset.records[i] for i in idx[s : s + b]]))[0],
                                            f"{dataset.name} token sample").numpy() for s in range(0, len(idx), b)])
        return thin_tokens(H, self.config.seed)

    def fit(self, G: np.ndarray, y: np.ndarray, records: Sequence[ImageRecord], classes: Sequence[str],
            sample_weight: np.ndarray | None = None, head: Any = None) -> "Carrot":
        """Fit the configured head and keep what explanations need.

        Parameters
        ----------
        G : (n, D) training embeddings (e.g. :meth:`embed_store` of the training cache).
        y : (n,) class indices into ``classes``; records : the n training ImageRecords; classes : C class names.
        sample_weight : (n,) example weights >= 0 (e.g. learned by RRO), or None.
        head : a head already fitted on (G, y, sample_weight) to keep instead of fitting the configured one.

        Returns
        -------
        self, with ``head_``, ``train_embeddings_``, ``train_records_``, ``classes_``, ``sample_weight_``.
        """
        if (self.config.token_map.kind != "none") != (self.token_map_ is not None):
            raise CarrotError(f"token_map.kind is {self.config.token_map.kind!r}: fit_token_map(training tokens) "
                              "comes before the embeddings and the head")
        self._check_pinned("Carrot.fit")
        self.head_ = fit_head(self.config, G, y, sample_weight) if head is None else head
        self.sample_weight_ = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.train_embeddings_ = np.asarray(G, dtype=np.float64)
        self.train_records_ = list(records)
        self.classes_ = list(classes)
        self.test_embeddings_, self.test_records_, self.metrics_, self.derived_from_ = None, None, {}, None
        return self

    def score(self, G: np.ndarray, y: np.ndarray) -> float:
        check_is_fitted(self, ("head_",))
        return float((self.head_.predict(G) == np.asarray(y)).mean())

    def inputs(self, paths: Sequence[str]) -> torch.Tensor:
        """Image files as model inputs (m, 3, H, W): decoded, resized, cropped and normalised as the backbone expects."""
        bb = self.backbone
        tf = bb.transform()
        return torch.stack([tf(load_image(p, bb.min_side)) for p in paths])

    @torch.no_grad()
    def pixel_logits(self, x: torch.Tensor) -> np.ndarray:
        """The whole fitted model on model inputs (B, 3, H, W): backbone, tokens rounded as the cache rounds
        them, graph, diffusion, readout, head; (B, C) float64 logits (what the pixel maps and protocol re-run)."""
        check_is_fitted(self, ("head_",))
        return self.head_.decision_function(self.embed_regions(self._regions(x, "model inputs")[0])[0].numpy())

    def torch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`pixel_logits` with autograd (tokens not rounded to the cache dtype): (B, C) float64 tensor, the
        function whose gradient the pixel split integrates."""
        check_is_fitted(self, ("head_",))
        H, glob, grid = self.backbone.tokens(x, globals_too=True)
        H = H.cpu().to(torch.float64)
        emb = self.embedder
        w = emb.weights(H, patch_centres(grid, torch.float64))[0]
        return self.head_.torch_decision(emb.readout(H, w, glob.cpu() if emb.global_tokens else None))

    @torch.no_grad()
    def kept_logits(self, x: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
        """The whole fitted model on the kept cells of model inputs only (removed cells' tokens dropped, ViTs):
        x (B, 3, H, W), keep (B, N) bool -> (B, C) float64 logits. The kept tokens are rounded as the cache rounds
        them and read out on the graph of the kept cells (its bandwidths its own); a row that keeps nothing gets the
        head's prior (no evidence)."""
        check_is_fitted(self, ("head_",))
        keep = torch.as_tensor(keep, dtype=torch.bool)
        out = np.tile(np.asarray(self.head_.prior_, dtype=np.float64), (len(keep), 1))
        rows = torch.nonzero(keep.any(1)).flatten()
        if not len(rows):
            return out
        H, idx, glob = self.backbone.kept_tokens(x[rows], keep[rows])
        H = self._as_cached(H, "model inputs").to(torch.float64).cpu()
        glob = self._as_cached(glob, "model inputs").cpu() if self.config.backbone.global_tokens is True else None
        idx, counts = idx.cpu(), keep[rows].sum(1)
        ps = self.backbone.patch_size
        P = patch_centres((x.shape[-2] // ps[0], x.shape[-1] // ps[1]), torch.float64)
        G = None
        for k in torch.unique(counts).tolist():
            sel = torch.nonzero(counts == k).flatten()
            g = self.embedder.embed_subsets(H[sel, :k], P[idx[sel, :k]], None if glob is None else glob[sel])
            G = torch.empty(len(rows), g.shape[1], dtype=torch.float64) if G is None else G
            G[sel] = g
        out[rows.numpy()] = self.head_.decision_function(G.numpy())  # one product with the training rows per batch
        return out

    def cell_game(self, x: torch.Tensor, grid: tuple[int, int], removal: str = DEFAULT_REMOVAL) -> "CellGame":
        """One model input x (3, H, W) as a game over its cells under ``removal`` ("auto": :meth:`pixel_removal`, or
        one of :data:`~carrot.config.REMOVALS`: blur, mean, inpaint, or drop for a ViT): what every pixel map and the
        pixel protocol re-run."""
        from carrot.attribution.pixels import PixelFill, TokenDrop

        removal = self.pixel_removal(removal)
        if removal == "drop":
            return TokenDrop(self.kept_logits, x, grid)
        return PixelFill(self.pixel_logits, x, grid, removal)

    def pixel_removal(self, removal: str = DEFAULT_REMOVAL, method: str = "shapley") -> str:
        """The removal a pixel map of ``method`` uses for ``removal``, checked: "auto" is "drop" for a backbone that
        can leave tokens out (a ViT) and "blur" otherwise, and "blur" for the split (its path needs one image at its
        end); "drop" needs a ViT, and the split blur or mean."""
        from carrot.attribution.pixels import SPLIT_REMOVALS

        if removal == "auto":
            return "drop" if method != "split" and self.backbone.drops_tokens else "blur"
        if removal not in REMOVALS:
            raise CarrotError(f"removal: expected auto or one of {', '.join(REMOVALS)}, got {removal!r}")
        if removal == "drop" and not self.backbone.drops_tokens:
            raise CarrotError(f"removal: 'drop' needs a ViT (tokens that can be left out); backbone "
                              f"'{self.backbone.timm_name}' is not one, expected auto, blur, mean or inpaint")
        if method == "split" and removal not in SPLIT_REMOVALS:
            raise CarrotError(f"removal: the pixel split integrates along a straight path from one fill image; "
                              f"expected {' or '.join(SPLIT_REMOVALS)}, got {removal!r}")
        return removal

    def pixel_map(self, x: torch.Tensor, c: int, grid: tuple[int, int], method: str = "shapley",
                  permutations: int = DEFAULT_PERMUTATIONS, removal: str = DEFAULT_REMOVAL,
                  block: int | str = DEFAULT_BLOCK) -> tuple[np.ndarray, dict[str, Any]]:
        """One pixel map of a model input x (3, H, W) for class c over the backbone's ``grid`` of cells, cells removed
        by ``removal`` (:meth:`pixel_removal`): "shapley" (:func:`~carrot.attribution.pixels.shapley_map`, players
        blocks of ``block`` x ``block`` cells, "auto": :func:`~carrot.attribution.pixels.auto_block`), "split"
        (:func:`~carrot.attribution.pixels.path_split`, blur or mean) or "occlusion"
        (:func:`~carrot.attribution.pixels.occlusion_map`); (gh, gw) float64 values and their info (with the removal
        and block used)."""
        from carrot.attribution.pixels import auto_block, occlusion_map, path_split, shapley_map

        if method not in ("shapley", "split", "occlusion"):
            raise CarrotError(f"pixel map: expected shapley, split or occlusion, got {method!r}")
        removal = self.pixel_removal(removal, method)
        if method == "split":
            return path_split(self.torch_logits, x, c, grid, removal)
        game = self.cell_game(x, grid, removal)
        if method == "shapley":
            block = auto_block(grid) if block == "auto" else block
            return shapley_map(game, c, permutations, seed=self.config.seed, block=block)
        return occlusion_map(game, c), {"removal": removal}

    def embed_images(self, paths: Sequence[str]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, tuple[int, int], list,
                                                           torch.Tensor | None]:
        """Run the backbone on image files: embeddings (m, D), tokens (m, N, D), w (m, N), grid, PIL images, and the
        global tokens (m, G, D') when the embedding reads them (else None)."""
        bb = self.backbone
        tf = bb.transform()
        imgs = [load_image(p, bb.min_side) for p in paths]
        x = torch.stack([tf(im) for im in imgs])
        geo = bb.display_transform()
        imgs = [geo(im) for im in imgs]
        regions, grid = self._regions(x, "the images to explain")
        G, w = self.embed_regions(regions)
        return G.numpy(), regions.H, w, grid, imgs, regions.globals

    def _regions(self, x: torch.Tensor, where: str, globals_too: bool = False) -> tuple[RegionSet, tuple[int, int]]:
        """The backbone on model inputs (B, 3, H, W) as a RegionSet of tokens rounded as the cache rounds them, with the
        global tokens when the embedding reads them (or ``globals_too``); and the grid."""
        H, glob, grid = self.backbone.with_globals(x)
        glob = self._as_cached(glob, where) if globals_too or self.config.backbone.global_tokens is True else None
        return RegionSet(self._as_cached(H, where), patch_centres(grid, torch.float64), grid, glob), grid

    def _as_cached(self, H: torch.Tensor, where: str) -> torch.Tensor:
        """Backbone tokens rounded to the cache dtype, as float64 on the CPU: what the token cache would give."""
        H = H.cpu().to(torch.float16 if self.cache_dtype == "float16" else torch.float32).to(torch.float64)
        if not torch.isfinite(H).all():
            raise CarrotError(f"backbone produced NaN/Inf tokens (dtype {self.cache_dtype} overflow?) for {where}")
        return H

    @property
    def cache_dtype(self) -> str:
        return self.config.backbone.cache_dtype

    def _train_store(self):
        """The run's training token cache if it is still there and matches the backbone (looked up once)."""
        if not hasattr(self, "_train_store_cache"):
            from carrot.features.cache import open_store

            store = None
            caches = getattr(self, "metrics_", {}).get("token_caches", [])
            if caches and Path(caches[0]).is_dir():
                try:
                    store = open_store(caches[0], verify=True, blocks=self.config.backbone.blocks)
                except CarrotError:
                    store = None
            if store is not None and (store.manifest["weights_id"] != self.backbone.weights_id
                                      or len(store) != len(self.train_records_)):
                store = None
            self._train_store_cache = store
        return self._train_store_cache

    def train_regions(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], list,
                                                             torch.Tensor | None]:
        """Tokens (k, N, D), readout weights (k, N), grid, display images of training images, and their global
        tokens (k, G, D') when the embedding reads them (else None).

        Tokens come from the run's token cache when it is still there and matches the backbone,
        else from the backbone (same numbers up to the cache dtype's rounding).
        """
        raw = [self.training_image(i) for i in indices]
        geo = self.backbone.display_transform()
        imgs = [geo(im) for im in raw]
        store = self._train_store()
        reads_globals = self.config.backbone.global_tokens is True
        if store is not None and (not reads_globals or store.globals.shape[1]):
            H = torch.from_numpy(np.asarray(store.tokens[np.asarray(indices)], dtype=np.float32))
            glob = (torch.from_numpy(np.asarray(store.globals[np.asarray(indices)], dtype=np.float32)) if reads_globals
                    else None)
            grid = store.grid
        else:
            tf = self.backbone.transform()
            H, glob, grid = self.backbone.with_globals(torch.stack([tf(im) for im in raw]))
            H, glob = H.cpu(), glob.cpu() if reads_globals else None
        _, w = self.embed_regions(RegionSet(H.to(torch.float64), patch_centres(grid, torch.float64), grid,
                                            None if glob is None else glob.to(torch.float64)))
        return H, w, grid, imgs, glob

    def training_image(self, i: int):
        """Training image ``i`` as the backbone sees it, or a one-line error saying the run's data has moved."""
        path = self.train_records_[i].path
        if not os.path.exists(path):
            raise CarrotError(f"training image #{i} of the run is not at '{path}' any more (the run was fitted on "
                              f"'{self.config.data.root}'); put the data back there, or refit the run on its new place")
        return load_image(self.train_records_[i], self.backbone.min_side)

    def training_system(self) -> TrainingSystem:
        """The head's exact training system on the run's training rows (``head.system``), built once per head."""
        if getattr(self, "_system", None) is None or self._system_head is not self.head_:
            labels = np.array([r.label for r in self.train_records_])
            self._system, self._system_head = self.head_.system(self.train_embeddings_, labels), self.head_
        return self._system

    def explain(self, paths: Sequence[str], k: int = 5, pairs: int = 3, node_removal: bool = False,
                masks: dict[str, np.ndarray] | None = None, certificate_limit: int = 50,
                pixel_map: str | None = "shapley", permutations: int = DEFAULT_PERMUTATIONS, occlusion: bool = False,
                removal: str = DEFAULT_REMOVAL, block: int | str = DEFAULT_BLOCK) -> list[Explanation]:
        """Explain image files with the fitted run (:mod:`carrot.run.explaining`).

        Parameters
        ----------
        paths : m image files.
        k : supporting and inhibiting training images listed per image (1 <= k <= n).
        pairs : strongest (test region, training region) pairs listed per training image.
        node_removal : also the logit drop of removing each region from the graph, and deletion / insertion curves.
        masks : {path: integer segment mask in the model's input geometry}: per-segment exact sums.
        certificate_limit : the most training images the counterfactual certificate removes (0: none).
        pixel_map : the page's pixel map, one of :data:`~carrot.attribution.pixels.PIXEL_MAPS` or None: "shapley"
            (sampled Shapley values of the cells, sum exactly f(x) - f(x with every cell removed); ``permutations``
            (P - 1) + 2 runs of the whole model for P players) or "split" (path-integrated gradients from the fill
            image, 32 forward + backward).
        permutations : the even number of random orders the Shapley map samples.
        occlusion : also the exact cell occlusion map (N + 1 runs of the whole model per image).
        removal : how the pixel maps remove a cell, "auto" (:meth:`pixel_removal`) or one of
            :data:`~carrot.config.REMOVALS` (blur, mean colour, inpaint, or drop its tokens: ViTs).
        block : the Shapley map's players are blocks of block x block cells (1: every cell; "auto": at most
            :data:`~carrot.config.MAX_PLAYERS` players).

        Returns
        -------
        m :class:`~carrot.report.explanation.Explanation`: prediction, class logits, prior, the top-k training images
        for and against the prediction ranked by their exact removal effect (each with its removal effect,
        equivalent-kernel and representer terms, and, for a head with region pairs, its pair split), the certificate,
        the token and pixel maps, and the identity errors of the exact sums.
        """
        return list(self.explain_iter(paths, k, pairs, node_removal, masks, certificate_limit, pixel_map, permutations,
                                      occlusion, removal, block))

    def explain_iter(self, paths: Sequence[str], k: int = 5, pairs: int = 3, node_removal: bool = False,
                     masks: dict[str, np.ndarray] | None = None, certificate_limit: int = 50,
                     pixel_map: str | None = "shapley", permutations: int = DEFAULT_PERMUTATIONS, occlusion: bool = False,
                     removal: str = DEFAULT_REMOVAL, block: int | str = DEFAULT_BLOCK) -> Iterator[Explanation]:
        """:meth:`explain`, one explanation at a time as each is ready (for pages written as they come)."""
        from carrot.run.explaining import ExplainOptions, iter_explanations

        check_is_fitted(self, ("head_",))
        return iter_explanations(self, paths, ExplainOptions(k, pairs, node_removal, masks, certificate_limit, pixel_map,
                                                             permutations, occlusion, removal, block))

    def mask_transform(self):
        """The display geometry for integer masks (nearest-neighbour resize, same crop)."""
        from torchvision import transforms

        steps = []
        for st in self.backbone.display_transform().transforms:
            if isinstance(st, transforms.Resize):
                steps.append(transforms.Resize(st.size, interpolation=transforms.InterpolationMode.NEAREST))
            else:
                steps.append(st)
        return transforms.Compose(steps)

    # -- persistence -------------------------------------------------------------------------
    def record_test(self, G_test: np.ndarray, test_records: Sequence[Any], metrics: dict[str, Any] | None = None,
                    derived_from: dict[str, Any] | None = None) -> "Carrot":
        """Keep the test split's embeddings (m, D) and records ([path, label] or ImageRecord), the fit's metrics and,
        for a run derived from another (reweight / debug --apply), where it came from: what a saved run holds."""
        self.test_embeddings_ = np.asarray(G_test, dtype=np.float64)
        self.test_records_ = [[r.path, r.label] if isinstance(r, ImageRecord) else [r[0], r[1]] for r in test_records]
        if len(self.test_records_) != len(self.test_embeddings_):
            raise CarrotError(f"test_records: expected {len(self.test_embeddings_)} records, one per test embedding, "
                              f"got {len(self.test_records_)}")
        self.metrics_ = dict(metrics or {})
        self.derived_from_ = derived_from
        return self

    @property
    def meta_(self) -> dict[str, Any]:
        """What run.json holds for this model (the same after fit + record_test as after load)."""
        check_is_fitted(self, ("head_",))
        meta = {
            "carrot_version": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "config": self.config.to_dict(), "backbone": self.backbone_info_, "classes": self.classes_,
            "train_records": [[r.path, r.label, r.bbox] for r in self.train_records_],
            "weighted": self.sample_weight_ is not None,
            "metrics": getattr(self, "metrics_", {}), "test_records": getattr(self, "test_records_", None),
        }
        if getattr(self, "derived_from_", None):
            meta["derived_from"] = self.derived_from_
        return meta

    @property
    def backbone_info_(self) -> dict[str, Any]:
        """The backbone's description (name, weights id, grid...) as recorded in run.json."""
        if getattr(self, "_backbone_info", None) is None:
            self._backbone_info = self.backbone.describe()
        return self._backbone_info

    def save(self, run_dir: str | Path, finish: Callable[[Path], None] | None = None, replace: str | None = "any") -> None:
        """Write the run directory as a whole (:func:`carrot.run.persistence.save_run`): head, embeddings, weights,
        metrics and run.json with the files' SHA-256, staged and swapped in once complete; ``finish(staging_path)``
        adds more (the index page) before the swap; ``replace``: the identity of the run this may replace (None:
        none; "any": whatever is there), checked under the run's lock at the swap."""
        from carrot.run.persistence import save_run

        save_run(self, run_dir, finish, replace)

    @classmethod
    def load(cls, run_dir: str | Path, backbone: TokenBackbone | None = None) -> "Carrot":
        """Load a run directory written by :meth:`save` (``backbone``: an already built one to reuse), every file
        checked against run.json (:func:`carrot.run.persistence.load_run`)."""
        from carrot.run.persistence import load_run

        return load_run(cls, run_dir, backbone)

    def check_backbone(self) -> None:
        """Refuse to explain with a backbone whose weights differ from the ones the run was fitted with."""
        want = self.backbone_info_["weights_id"]
        if self.backbone.weights_id != want:
            raise CarrotError(
                f"backbone '{self.backbone.name}' weights ({self.backbone.weights_id[:12]}) differ from the run's "
                f"({want[:12]}); explain with the same weights the run was fitted with"
            )
