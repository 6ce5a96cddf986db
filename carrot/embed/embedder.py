"""The embedder: tokens -> graph -> heat diffusion -> readout, the one owner of that chain.

g = H^T w,  w = exp(-tL) 1 / N  (L the normalised Laplacian of the Gaussian space x feature graph of
one image's regions); t = 0 is mean pooling (w = 1 / N exactly). The same object gives one t, many t
from one graph (one eigendecomposition or one Chebyshev recurrence), and the graph with nodes removed
(bandwidths kept at the full graph's values, so the kernel between the remaining nodes is unchanged),
on the configured device and diffusion method. Fit, explain, predict, node removal, deletion curves and
the t sweep all go through it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from carrot.config import DiffusionConfig, GraphConfig, RunConfig
from carrot.devices import resolve_device
from carrot.embed.diffusion import _check_t, diffusion_weights, kept_readout_weights, resolve_method
from carrot.errors import CarrotError
from carrot.embed.graph import affinity, normalized_laplacian, pairwise_sq_dists, resolve_bandwidth
from carrot.embed.readout import weighted_readout
from carrot.embed.tokenmap import TokenMap
from carrot.features.regions import RegionSet


class Embedder:
    """Diffusion readout of region tokens for one graph and diffusion configuration.

    Parameters
    ----------
    graph : GraphConfig (bandwidths, kNN).
    diffusion : DiffusionConfig (t, method).
    device : 'auto', 'cpu', 'cuda[:i]' or 'mps'; graphs are built and diffused in float64 on a CUDA
        device when one is chosen, else on the CPU (MPS has no float64). Results come back on the CPU.
    token_map : a fitted :class:`~carrot.embed.tokenmap.TokenMap` phi, or None. The graph is built on the tokens
        h_j; the readout is g = sum_j w_j phi(h_j), linear in the mapped tokens (:meth:`features`).
    global_tokens : append the image's global tokens (class, registers), flattened, to the readout:
        g = [sum_j w_j phi(h_j) ; c]. They are not graph nodes: removing regions leaves them as they are.
    """

    def __init__(self, graph: GraphConfig | None = None, diffusion: DiffusionConfig | None = None, device: str = "auto",
                 token_map: TokenMap | None = None, global_tokens: bool = False) -> None:
        self.graph = graph or GraphConfig()
        self.diffusion = diffusion or DiffusionConfig()
        self.device = device
        self.token_map = token_map
        self.global_tokens = global_tokens

    @classmethod
    def from_config(cls, config: RunConfig, token_map: TokenMap | None = None) -> "Embedder":
        if (config.token_map.kind != "none") != (token_map is not None):
            raise CarrotError(f"token_map: the config's token_map.kind is {config.token_map.kind!r} but "
                              f"{'no' if token_map is None else 'a'} fitted token map was given")
        if config.backbone.global_tokens == "auto":
            raise CarrotError("backbone.global_tokens: 'auto' is chosen when a run is fitted (carrot-run fit, "
                              "carrot.embed.choice); expected true or false here (pin it for the Python API: "
                              "RunConfig().merged({'backbone.blocks': 1, 'backbone.global_tokens': False})), got 'auto'")
        return cls(config.graph, config.diffusion, config.device, token_map, config.backbone.global_tokens)

    def __repr__(self) -> str:
        return (f"Embedder(graph={self.graph!r}, diffusion={self.diffusion!r}, device={self.device!r}"
                f"{'' if self.token_map is None else f', token_map={self.token_map!r}'}"
                f"{', global_tokens=True' if self.global_tokens else ''})")

    # -- what the readout sums ------------------------------------------------------------------------
    def features(self, H: torch.Tensor) -> torch.Tensor:
        """The per-region vectors the readout sums: phi(H) (..., m) with a token map, else H, as float64."""
        H = H.to(torch.float64)
        return H if self.token_map is None else self.token_map(H)

    def readout(self, H: torch.Tensor, w: torch.Tensor, globals: torch.Tensor | None = None) -> torch.Tensor:
        """g = features(H)^T w (B, D or m), then the global tokens (B, G, D') flattened when the embedding reads
        them; differentiable in H and the globals."""
        return self.with_globals(weighted_readout(self.features(H), w), globals)

    def with_globals(self, g: torch.Tensor, globals: torch.Tensor | None) -> torch.Tensor:
        """The patch part g (..., B, D) with the global part appended (as is without global tokens)."""
        if not self.global_tokens:
            return g
        if globals is None or globals.shape[-2] == 0:
            raise CarrotError("backbone.global_tokens is true but no global (class / register) tokens were given; "
                              "the backbone has none or the token cache predates them (re-extract it)")
        c = globals.to(torch.float64).reshape(globals.shape[0], -1)
        return torch.cat([g, c.expand(*g.shape[:-1], c.shape[-1])], -1)

    @property
    def compute_device(self) -> torch.device:
        dev = resolve_device(self.device)
        return dev if dev.type == "cuda" else torch.device("cpu")

    # -- readout weights ---------------------------------------------------------------------------
    def weights(self, H: torch.Tensor, P: torch.Tensor, ts: Sequence[float] | None = None,
                sigmas: tuple[float, float] | None = None) -> torch.Tensor:
        """Readout weights w(t) = exp(-tL) 1 / N for every t.

        Parameters
        ----------
        H : (B, N, D) region tokens; P : (N, 2) or (B, N, 2) region centres.
        ts : diffusion times (default: the configured t).
        sigmas : fixed (sigma_space, sigma_feat) instead of the configured ones (node removal).

        Returns
        -------
        (T, B, N) float64 on the CPU; rows for t = 0 are exactly 1 / N.
        """
        ts = [self.diffusion.t] if ts is None else _check_t(ts)
        B, N = int(H.shape[0]), int(H.shape[1])
        out = torch.full((len(ts), B, N), 1.0 / N, dtype=torch.float64)
        positive = [i for i, t in enumerate(ts) if t > 0]
        if positive and N > 1:
            dev = self.compute_device
            ss, sf = sigmas if sigmas is not None else (self.graph.sigma_space, self.graph.sigma_feat)
            knn = self.graph.knn if self.graph.knn is None or self.graph.knn < N - 1 else None
            W = affinity(H.to(dev, torch.float64), P.to(dev, torch.float64), ss, sf, knn)
            out[positive] = self._diffused(W, [ts[i] for i in positive])
        return out

    def _diffused(self, W: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
        """exp(-tL) 1 / N (T, B, N) on the CPU of affinities W (B, N, N), every t > 0."""
        return diffusion_weights(normalized_laplacian(W), ts, self.diffusion.method).cpu()

    # -- embeddings --------------------------------------------------------------------------------
    def embed(self, regions: RegionSet) -> tuple[torch.Tensor, torch.Tensor]:
        """RegionSet -> g = H^T w (B, D) (with the global part) and w (B, N) at the configured t, float64 on the CPU."""
        H = regions.H.to(torch.float64).cpu()
        w = self.weights(H, regions.P)[0]
        return self.readout(H, w, None if regions.globals is None else regions.globals.cpu()), w

    def embed_subsets(self, H: torch.Tensor, P: torch.Tensor, globals: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (B, D) float64 of B images each made of its own k regions: tokens H (B, k, D) at centres
        P (B, k, 2), each read out on its own graph (bandwidths from its own regions, as for a whole image), with
        the global tokens (B, G, D') when the embedding reads them (the model run on the kept cells only)."""
        H = H.to(torch.float64).cpu()
        return self.readout(H, self.weights(H, P.to(torch.float64).cpu())[0], None if globals is None else globals.cpu())

    def embed_many(self, H: torch.Tensor, P: torch.Tensor, ts: Sequence[float],
                   globals: torch.Tensor | None = None) -> torch.Tensor:
        """(T, B, D) embeddings of tokens H (B, N, D) (and global tokens (B, G, D')) for every t, one graph per image."""
        H = H.to(torch.float64).cpu()
        return self.with_globals(torch.einsum("bnd,tbn->tbd", self.features(H), self.weights(H, P, ts)), globals)

    def embed_store(self, store, batch: int | None = None, progress: bool = False, graph_bytes: int = 1 << 30,
                    ts: Sequence[float] | None = None) -> np.ndarray:
        """Embeddings (n, D) float64 of every image of a token cache, streamed in batches; with ``ts``,
        (T, n, D) for every diffusion time from one graph per image. The default batch keeps the float64
        (B, N, N) graph arrays (about six alive at once) and the mapped tokens (B, N, m) within ``graph_bytes``."""
        from tqdm.auto import tqdm

        n_regions = store.tokens.shape[1]
        mapped = 0 if self.token_map is None else 3 * 8 * n_regions * self.token_map.dim  # phi(H) and its temporaries
        per_image = 6 * 8 * n_regions * n_regions + mapped
        batch = batch or int(max(1, min(64, graph_bytes // per_image)))
        P = store.positions.to(torch.float64)
        times = [self.diffusion.t] if ts is None else _check_t(ts)
        dim = store.tokens.shape[-1] if self.token_map is None else self.token_map.dim
        glob = store.globals if self.global_tokens else None
        dim += 0 if glob is None else glob.shape[1] * glob.shape[2]
        out = np.empty((len(times), len(store), dim), dtype=np.float64)
        for s in tqdm(range(0, len(store), batch), desc="diffuse", disable=not progress, unit="batch"):
            H = torch.from_numpy(np.asarray(store.tokens[s : s + batch], dtype=np.float64))
            C = None if glob is None else torch.from_numpy(np.asarray(glob[s : s + batch], dtype=np.float64))
            if hasattr(store, "release"):
                store.release()
            out[:, s : s + batch] = self.embed_many(H, P, times, C).numpy()
        return out if ts is not None else out[0]

    # -- graphs with nodes removed ---------------------------------------------------------------------
    def bandwidths(self, H: torch.Tensor, P: torch.Tensor) -> tuple[float, float]:
        """The (sigma_space, sigma_feat) of the full graph of one image, H (N, D), P (N, 2)."""
        def pick(v, X, name):
            return float(resolve_bandwidth(v, pairwise_sq_dists(X.to(torch.float64).unsqueeze(0)), name)[0])

        return pick(self.graph.sigma_space, P, "sigma_space"), pick(self.graph.sigma_feat, H, "sigma_feat")

    def embed_kept(self, H: torch.Tensor, P: torch.Tensor, keep: torch.Tensor,
                   sigmas: tuple[float, float] | None = None, globals: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of the graph restricted to kept nodes, for several kept sets at once.

        Parameters
        ----------
        H : (N, D) tokens and P : (N, 2) centres of one image.
        keep : (K, N) or (N,) bool, the nodes each graph keeps (each at least one).
        sigmas : the full graph's bandwidths (default: :meth:`bandwidths` of H, P).
        globals : (G, D') the image's global tokens, appended to every row unchanged (with ``global_tokens``).

        Returns
        -------
        (K, D) float64 (or (D,) for a single (N,) mask; m with a token map). Every kept set is diffused in one
        Chebyshev recurrence on the full graph (:func:`~carrot.embed.diffusion.kept_readout_weights`); with the eigh
        solver or a kNN graph, kept sets of equal size as one batch of restricted graphs.
        """
        single = keep.dim() == 1
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1, H.shape[0])
        counts = keep.sum(1)
        if (counts == 0).any():
            raise CarrotError("region removal: at least one region must remain")
        H, P = H.to(torch.float64).cpu(), P.to(torch.float64).cpu()
        sigmas = sigmas or self.bandwidths(H, P)
        F = self.features(H)
        N, t = H.shape[0], self.diffusion.t

        def full_graph() -> torch.Tensor:  # with the bandwidths fixed, a kept set's affinities are its rows and columns
            return affinity(H.unsqueeze(0).to(self.compute_device), P.to(self.compute_device), *sigmas)[0]

        whole = self.graph.knn is None or self.graph.knn >= N - 1  # no kNN edge dropped, for any kept set
        if t > 0 and whole and resolve_method(self.diffusion.method, 1, N, t) == "chebyshev":
            W = full_graph()
            out = kept_readout_weights(W, keep.to(W.device), [t])[0].cpu() @ F  # every kept set in one recurrence
        else:
            out = torch.empty(keep.shape[0], F.shape[1], dtype=torch.float64)
            W = None
            for k in torch.unique(counts).tolist():
                rows = torch.nonzero(counts == k).flatten()
                idx = torch.stack([torch.nonzero(keep[r]).flatten() for r in rows.tolist()])  # (b, k)
                if k == 1:
                    w = torch.full((len(rows), 1), 1.0, dtype=torch.float64)
                elif t <= 0:
                    w = torch.full((len(rows), k), 1.0 / k, dtype=torch.float64)
                elif self.graph.knn is None or self.graph.knn >= k - 1:  # the full graph's affinities, rows and columns kept
                    W = full_graph() if W is None else W
                    dev_idx = idx.to(W.device)
                    w = self._diffused(W[dev_idx.unsqueeze(2), dev_idx.unsqueeze(1)], [t])[0]
                else:
                    w = self.weights(H[idx], P[idx], sigmas=sigmas)[0]
                # g = F^T w with the removed nodes' weights 0: one (b, N) x (N, D) product, no (b, k, D) gather
                out[rows] = torch.zeros(len(rows), F.shape[0], dtype=w.dtype).scatter_(1, idx, w) @ F
        out = self.with_globals(out, None if globals is None else globals.unsqueeze(0))
        return out[0] if single else out
