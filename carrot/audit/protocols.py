"""Audits of a fitted run's explanations on its test images, each a protocol with its own ground truth: region
deletion / insertion on the graph (cached tokens), the pixel protocol (the whole model re-run), the pointing game
(where part locations are known) and counterfactual certificates. ``model`` is a fitted
:class:`carrot.run.pipeline.Carrot`; token caches and data splits are opened by the command that runs the audit."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from carrot.config import DEFAULT_REMOVAL, REMOVALS
from carrot.errors import CarrotError
from carrot.progress import bar
from carrot.ridge.heads import keeps

if TYPE_CHECKING:
    from carrot.run.pipeline import Carrot


def _predicted_regions(model: "Carrot", store, rows: Sequence[int], batch: int = 64):
    """For each cached test row: (row, tokens H (N, D) float64, predicted class c, logit of c, exact region
    contributions to it (N,), global tokens (G, D') or None), embedding ``batch`` rows at a time."""
    import torch

    from carrot.attribution.representer import region_contributions
    from carrot.features.backbone import patch_centres
    from carrot.features.regions import RegionSet

    P = patch_centres(store.grid, torch.float64)
    for s in range(0, len(rows), batch):
        idx = list(rows[s : s + batch])
        H = torch.from_numpy(np.asarray(store.tokens[idx], dtype=np.float64))
        glob = (torch.from_numpy(np.asarray(store.globals[idx], dtype=np.float64)) if model.config.backbone.global_tokens is True
                else None)
        G, w = model.embed_regions(RegionSet(H, P, store.grid, glob))
        logits = model.head_.decision_function(G.numpy())
        for j, i in enumerate(idx):
            c = int(logits[j].argmax())
            glob_j = None if glob is None else glob[j]
            r = region_contributions(model.head_, model.embedder.features(H[j]), w[j], glob_j)[: H.shape[1], c]
            yield i, H[j], c, float(logits[j, c]), r.numpy(), glob_j


def region_deletion(model: "Carrot", store: Any, n_test: int = 20, steps: int = 8, seed: int = 0) -> dict[str, Any]:
    """Deletion / insertion curves of the predicted logit on ``n_test`` random test images (cached tokens):
    regions removed (inserted) in the order of their exact contribution vs a random order. Each AUC is
    pooled over the images, sum(AUC - prior) / sum(full logit - prior): 1 = the full logit throughout,
    0 = the prior (pooling keeps images whose logit barely exceeds the prior from dominating); ``store``: the run's
    test token cache."""
    import torch

    from carrot.attribution.regions import deletion_insertion
    from carrot.features.backbone import patch_centres

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), min(n_test, len(store)), replace=False))
    P = patch_centres(store.grid, torch.float64)
    emb = model.embedder
    out: dict[str, list[float]] = {k: [] for k in ("deletion", "deletion_random", "insertion", "insertion_random")}
    spans = []
    for _, H, c, logit, r, glob in _predicted_regions(model, store, rows.tolist()):
        prior = float(model.head_.prior_[c])
        spans.append(logit - prior)
        for name, order in (("", np.argsort(-r, kind="stable")), ("_random", rng.permutation(len(r)))):
            dele, ins = deletion_insertion(model.head_, H, P, c, order, emb, steps=steps, globals=glob)
            out["deletion" + name].append(dele.auc - prior)
            out["insertion" + name].append(ins.auc - prior)
    return {"n": int(len(rows)), "steps": steps, "mean_logit_above_prior": float(np.mean(spans)),
            **{k: float(np.sum(v) / np.sum(spans)) for k, v in out.items()}}


REGION_MAPS = ("shapley", "split", "occlusion", "token", "random")  # the maps of one image that region_scores computes


def image_regions(model: "Carrot", path: str) -> tuple[Any, Any, Any, tuple[int, int], int]:
    """One image as the region maps need it: model input x (3, H, W), its RegionSet (tokens (1, N, D) rounded as
    the cache rounds them, and the global tokens when the embedding reads them), readout weights w (1, N), the grid,
    and the predicted class c."""
    import torch

    x = model.inputs([path])[0]
    with torch.no_grad():
        regions, grid = model._regions(x[None], "a test image")
    G, w = model.embed_regions(regions)
    return x, regions, w, grid, int(model.head_.decision_function(G.numpy())[0].argmax())


def region_scores(model: "Carrot", name: str, x: Any, regions: Any, w: Any, c: int, grid: tuple[int, int],
                  rng: np.random.Generator, removal: str = DEFAULT_REMOVAL) -> np.ndarray:
    """Scores (N,) of one of carrot's :data:`REGION_MAPS` for class c of an image (:func:`image_regions`: x, its
    RegionSet, w): the Shapley map (explain's default), the pixel split, exact cell occlusion (these three with cells
    removed by ``removal``; the split takes blur for a removal that has no one image at its end), the token split, or a
    random order."""
    from carrot.attribution.representer import region_contributions

    H, glob = regions.H, None if regions.globals is None else regions.globals[0]
    if name in ("shapley", "occlusion"):
        return model.pixel_map(x, c, grid, name, removal=removal)[0].ravel()
    if name == "split":
        from carrot.attribution.pixels import SPLIT_REMOVALS

        return model.pixel_map(x, c, grid, name, removal=removal if removal in SPLIT_REMOVALS else "blur")[0].ravel()
    if name == "token":
        if not keeps(model.head_, "region_split"):  # each token's exact removal from the graph
            import torch

            from carrot.attribution.regions import node_removal
            from carrot.features.backbone import patch_centres

            drops = node_removal(model.head_, H[0], patch_centres(grid, torch.float64), c, model.embedder, globals=glob)
            return np.array([drops[j] for j in range(len(drops))])
        return region_contributions(model.head_, model.embedder.features(H[0]), w[0], glob)[: H.shape[1], c].numpy()
    if name == "random":
        return rng.permutation(grid[0] * grid[1]).astype(float)
    raise CarrotError(f"maps: expected one of {', '.join(REGION_MAPS)}, got {name!r}")


def removals_of(model: "Carrot") -> tuple[str, ...]:
    """The removals a run's pixel maps can be scored under: blur, mean colour, inpainting, and token dropping for a ViT."""
    return tuple(r for r in REMOVALS if r != "drop" or model.backbone.drops_tokens)


def paired(values: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Each map's per-image difference from ``reference`` (same images; mean, s.e.m., images where the map is lower,
    i.e. better for deletion), over the images where both are finite."""
    ref = np.asarray(values[reference], dtype=np.float64)
    out = {}
    for m, v in values.items():
        if m == reference:
            continue
        d = np.asarray(v, dtype=np.float64) - ref
        d = d[np.isfinite(d)]
        out[m] = {"mean": float(d.mean()) if len(d) else float("nan"),
                  "sem": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
                  "lower": int((d < 0).sum()), "n": int(len(d))}
    return out


CURVE_KEYS = ("deletion", "insertion", "raw_deletion", "raw_insertion")  # each curve's numbers (PixelCurves)


def score_orders(games: dict[str, Any], c: int, orders: dict[str, np.ndarray], steps: int,
                 auc: dict[str, dict[str, dict[str, list[float]]]]) -> None:
    """Score cell orders under removals: for each game (removal -> :class:`~carrot.attribution.pixels.CellGame` of one
    image) and each order (map -> cells, most important first), the deletion / insertion curve of class c over
    ``steps`` steps, its scaled and raw AUC appended to ``auc[removal][map][key]`` (keys :data:`CURVE_KEYS`)."""
    from carrot.attribution.pixels import pixel_curves

    for r, game in games.items():
        for m, order in orders.items():
            curves = pixel_curves(game, c, order, steps)
            for k in CURVE_KEYS:
                auc[r][m][k].append(curves.raw_auc(k[4:]) if k.startswith("raw_") else curves.auc(k))


def curve_summary(auc: dict[str, list[float]], spans: Sequence[float], seed: int = 0) -> dict[str, dict[str, float]]:
    """One map's numbers under one removal over the images (``auc``: key -> per image, as :func:`score_orders` fills
    it): the raw AUC's mean and s.e. over every image (:func:`~carrot.attribution.pixels.summarise`), the scaled AUC
    pooled by span (:func:`~carrot.attribution.pixels.pooled`)."""
    from carrot.attribution.pixels import pooled, summarise

    return {k: summarise(auc[k]) if k.startswith("raw_") else pooled(auc[k], spans, seed) for k in CURVE_KEYS}


def pixel_deletion(model: "Carrot", n_test: int = 20, steps: int = 16, seed: int = 0,
                   maps: Sequence[str] = REGION_MAPS, removal: str = DEFAULT_REMOVAL,
                   removals: Sequence[str] | None = None) -> dict[str, Any]:
    """The pixel protocol on ``n_test`` random test images of a run (:mod:`carrot.attribution.pixels`): each map of
    the predicted class (its cells removed by ``removal`` where it removes cells) scored under every removal of
    ``removals`` (default :func:`removals_of`): cells removed (deletion) or kept with the rest removed (insertion) in
    map order, the whole model re-run at each of ``steps`` steps. Per map and removal the deletion and insertion AUC,
    scaled (image = 1, every cell removed = 0, pooled over images by span) and raw (the logit's area, every image
    counts); per removal each map's paired raw-deletion difference from the first map with its win count; and the
    seconds each map costs per image."""
    import time

    from carrot.attribution.pixels import deletable

    if not maps or set(maps) - set(REGION_MAPS):
        raise CarrotError(f"maps: expected some of {', '.join(REGION_MAPS)}, got {list(maps)}")
    allowed = removals_of(model)
    removals = allowed if removals is None else tuple(removals)
    if not removals or set(removals) - set(allowed):
        raise CarrotError(f"removals: expected some of {', '.join(allowed)} for this backbone, got {list(removals)}")
    removal = model.pixel_removal(removal)  # checked for this backbone
    if not model.test_records_:
        raise CarrotError("pixel-deletion: the run has no test images")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(model.test_records_), min(n_test, len(model.test_records_)), replace=False))
    auc = {r: {m: {k: [] for k in CURVE_KEYS} for m in maps} for r in removals}
    seconds: dict[str, list[float]] = {m: [] for m in maps}
    spans: dict[str, list[float]] = {r: [] for r in removals}
    grid = None
    for i in bar(rows.tolist(), desc="pixel deletion", unit="img"):
        x, H, w, grid, c = image_regions(model, model.test_records_[i][0])
        games = {r: model.cell_game(x, grid, r) for r in removals}
        ends = {r: [e[c] for e in game.ends()] for r, game in games.items()}
        for r in removals:
            spans[r].append(float(ends[r][0] - ends[r][1]))
        if not any(deletable(*ends[r]) for r in removals):  # nothing to delete under any removal: no map is drawn
            for r in removals:
                for m in maps:
                    for k in CURVE_KEYS:
                        auc[r][m][k].append(float("nan"))
            continue
        orders = {}
        for m in maps:
            t0 = time.perf_counter()
            scores = region_scores(model, m, x, H, w, c, grid, rng, removal)
            seconds[m].append(time.perf_counter() - t0)
            orders[m] = np.argsort(-scores, kind="stable")
        score_orders(games, c, orders, steps, auc)
    out = {r: {m: curve_summary(v, spans[r], seed) for m, v in auc[r].items()} for r in removals}
    return {"n": int(len(rows)), "steps": steps, "grid": list(grid) if grid else None, "removal": removal,
            "removals": list(removals), "maps": {m: {"seconds_per_image": float(np.mean(seconds[m])) if seconds[m]
                                                     else float("nan")} for m in maps},
            "scores": out, "paired": {r: paired({m: auc[r][m]["raw_deletion"] for m in maps}, maps[0]) for r in removals},
            "per_image": {"rows": rows.tolist(), "spans": spans, "auc": auc}}


def pixel_columns(res: dict[str, Any], sem: bool = False) -> dict[str, Any]:
    """A :func:`pixel_deletion` result as flat columns (a t-sweep row): ``pixel_removal``, then
    ``pixel_<kind>_<map>`` for the maps' own removal and ``pixel_<kind>_<map>_<removal>`` for the others, kind
    deletion, insertion or raw_deletion (with ``sem``: each one's ``_sem`` beside it)."""
    out: dict[str, Any] = {"pixel_removal": res["removal"]}
    for r, by_map in res["scores"].items():
        tail = "" if r == res["removal"] else f"_{r}"
        for m, v in by_map.items():
            for kind in ("deletion", "insertion", "raw_deletion"):
                out[f"pixel_{kind}_{m}{tail}"] = v[kind]["mean"]
                if sem:
                    out[f"pixel_{kind}_{m}{tail}_sem"] = v[kind]["sem"]
    return out


def pointing(model: "Carrot", store: Any, test: Any, n_pixel: int = 0, seed: int = 0) -> dict[str, Any]:
    """Pointing game on a run's test split where part locations are known (CUB parts, parts.json):
    does the most positive region of the predicted class sit on a part? The token map on every such image
    (cached tokens: ``store``, the run's test token cache; ``test``, its split as loaded now); with ``n_pixel`` > 0 also
    the pixel map (explain's default, Shapley) on that many of them."""
    from PIL import Image

    from carrot.attribution.regions import pointing_game, to_input_coords

    if len(test) != len(store):
        raise CarrotError("pointing game: the data set no longer matches the run's test split")
    rows = [i for i, rec in enumerate(test.records) if rec.parts]
    if not rows:
        raise CarrotError("pointing game: no part locations known for this data set (CUB parts/part_locs.txt or parts.json)")
    geo, size = model.backbone.display_transform(), model.backbone.data_config["input_size"][1:]
    hits, chance, part_boxes = [], [], {}
    for i, _, _, _, r, _ in _predicted_regions(model, store, rows):
        rec = test.records[i]
        if rec.bbox:
            wh = (rec.bbox[2], rec.bbox[3])
        else:
            with Image.open(rec.path) as im:
                wh = im.size
        boxes = [to_input_coords(np.array([[x0, y0], [x1, y1]]), wh, geo).ravel() for x0, y0, x1, y1 in rec.parts]
        r = r.reshape(store.grid)
        hits.append(any(pointing_game(r, tuple(b), size) for b in boxes))
        cells = np.eye(r.size).reshape(r.size, *r.shape)
        chance.append(np.mean([any(pointing_game(c, tuple(b), size) for b in boxes) for c in cells]))
        part_boxes[i] = boxes
    out = {"n": len(hits), "hit_rate": float(np.mean(hits)), "random_region_hit_rate": float(np.mean(chance))}
    if n_pixel > 0:
        chosen = np.random.default_rng(seed).permutation(rows)[:n_pixel]
        pix, tok = [], []
        for i in sorted(chosen.tolist()):
            x = model.inputs([test.records[i].path])[0]
            c = int(model.pixel_logits(x[None])[0].argmax())
            values = model.pixel_map(x, c, store.grid, removal=DEFAULT_REMOVAL)[0]
            pix.append(any(pointing_game(values, tuple(b), size) for b in part_boxes[i]))
            tok.append(hits[rows.index(i)])
        out.update({"n_pixel": len(pix), "pixel_hit_rate": float(np.mean(pix)),
                    "token_hit_rate_same_images": float(np.mean(tok))})
    return out


def certificates(model: "Carrot", n_test: int = 50, limit: int = 50, seed: int = 0, n_show: int = 10) -> dict[str, Any]:
    """Counterfactual certificates of ``n_test`` random test predictions (all when n_test >= m): for each, the
    fewest training images found (greedy on exact effects, checked by a refit) whose removal changes it.

    Returns
    -------
    dict: ``sizes`` (per image, None when no set of up to ``limit`` changes it), ``histogram``, the ``smallest``
    sets (the predictions most exposed to a few possibly wrong labels) and the cost per image.
    """
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1:
        raise CarrotError(f"n_test: expected a positive integer, got {n_test!r}")
    if getattr(model, "test_embeddings_", None) is None or not model.test_records_:
        raise CarrotError("certificates: the run has no test embeddings; refit it with carrot-run fit")
    G_test, y_test = model.test_embeddings_, np.array([lab for _, lab in model.test_records_])
    system = model.training_system()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(G_test), min(n_test, len(G_test)), replace=False))
    found, seconds = [], []
    for i in bar(rows.tolist(), desc="certificates", unit="img"):
        c = system.certificate(G_test[i], limit)
        seconds.append(c.seconds)
        found.append((i, c))
    sizes = [len(c.indices) if c.found else None for _, c in found]
    edges = [1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]
    edges = [e for e in edges if e <= limit] + [limit + 1]
    hist = [[f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo), sum(1 for s in sizes if s is not None and lo <= s < hi)]
            for lo, hi in zip(edges[:-1], edges[1:])]  # [bin, count] pairs: JSON keeps their order
    hist.append([f"none up to {limit}", sum(1 for s in sizes if s is None)])
    pred = model.head_.decision_function(G_test[rows]).argmax(1)
    order = sorted((j for j, s in enumerate(sizes) if s is not None), key=lambda j: sizes[j])[:n_show]
    smallest = [{"image": model.test_records_[rows[j]][0], "label": model.classes_[int(y_test[rows[j]])],
                 "predicted": model.classes_[int(pred[j])], "size": sizes[j],
                 "new_class": model.classes_[int(model.head_.classes_[found[j][1].new_class])],
                 "margin": found[j][1].margin,
                 "training_images": [{"index": t, "path": model.train_records_[t].path,
                                      "label": model.classes_[model.train_records_[t].label]} for t in found[j][1].indices]}
                for j in order]
    known = [s for s in sizes if s is not None]
    return {"n": int(len(rows)), "limit": limit, "found": len(known), "median_size": float(np.median(known)) if known else None,
            "sizes": sizes, "histogram": hist, "smallest": smallest,
            "seconds_per_image_median": float(np.median(seconds)), "seconds_per_image_max": float(np.max(seconds))}
