"""Thin orchestration of carrot runs: fit, explain, demo. The CLI in ``cli/`` calls these."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from carrot.embed.choice import candidates, choose, embed_inputs, embedders, is_auto
from carrot.embed.choice import embed_store as embed_candidates_of_store
from carrot.features.cache import extract
from carrot.config import DEFAULT_BLOCK, DEFAULT_PERMUTATIONS, DEFAULT_REMOVAL, RunConfig
from carrot.devices import device_memory
from carrot.distributed import barrier, init_from_env, world
from carrot.data import (
    ImageDataset, check_headers, collect_images, duplicate_test_images, load_image, load_splits, report_duplicates,
)
from carrot.errors import CarrotError
from carrot.audit.evaluate import per_class_accuracy
from carrot.io import check_dir, human_size, user_cache_dir, write_json
from carrot.ridge.heads import kind_of, require
from carrot.progress import bar, note
from carrot.run.pipeline import Carrot
from carrot.run.rundir import ANY, RunDir
from carrot.report.pages import write_explanation
from carrot.run.operations import (
    bench, check_outside_data, clear_run, compare, debug, predict, publish, reweight, run_embeddings, cached_test_split,
    tracin, write_index,
)

__all__ = ["bench", "compare", "debug", "demo", "evaluate", "explain", "extract_splits", "fit", "predict", "reweight", "tracin"]


def cache_root(config: RunConfig) -> Path:
    """The token cache root: ``cache_dir`` or the user cache folder's ``tokens/`` (checked to be a folder)."""
    if config.cache_dir:
        return check_dir(Path(config.cache_dir).expanduser(), "cache_dir")
    return user_cache_dir() / "tokens"


def check_resources(model: Carrot, datasets: Sequence[ImageDataset], root: Path | None) -> None:
    """Before extraction: the region graph of one image and a batch of backbone activations must fit in memory,
    and the missing token caches on their disk (limits and sizes in the message)."""
    from carrot.features.cache import _probe_grid, missing_bytes

    grid, _, _ = _probe_grid(model.backbone)
    N = grid[0] * grid[1]
    graph = 6 * 8 * N * N  # W, L, distances and the solver's work, float64 N x N
    mem = device_memory()
    if mem and graph > mem // 2:
        raise CarrotError(f"backbone.img_size: {model.backbone.img_size} px gives {N} regions per image, whose graph needs "
                          f"about {graph / 2**30:.1f} GiB, more than half this machine's {mem / 2**30:.1f} GiB; "
                          "lower img_size")
    batch = model.config.backbone.batch_size
    activations = 16 * 4 * batch * N * model.backbone.num_features  # float32 tokens through a block (MLP 4x, attention,
    # residuals): the model's own width, whatever number of blocks is read
    if mem and activations > mem // 2:
        raise CarrotError(f"backbone.batch_size: {batch} images of {N} regions need about {activations / 2**30:.1f} GiB "
                          f"of activations, more than half this machine's {mem / 2**30:.1f} GiB; lower batch_size")
    if root is None:
        return
    need = sum(missing_bytes(model.backbone, ds, root, model.config.backbone.cache_dtype) for ds in datasets)
    probe = next((p for p in (root, *root.parents) if p.exists()), None)
    if need and probe is not None:
        import shutil

        free = shutil.disk_usage(probe).free
        if need > free:
            raise CarrotError(f"token cache: {sum(len(d) for d in datasets)} images need {human_size(need)} at "
                              f"'{root}', only {human_size(free)} free; free space, set --cache-dir to a larger "
                              "disk, or fit with --no-cache-tokens")


def absolute_data(config: RunConfig) -> RunConfig:
    """The config with ``data.root`` absolute: a run records where its images are, whatever folder it is later
    used from."""
    if not config.data.root:
        return config
    return config.merged({"data.root": str(Path(config.data.root).expanduser().resolve())})


def extract_splits(config: RunConfig, model: Carrot | None = None, progress: bool = True) -> tuple[list, ImageDataset, ImageDataset]:
    """Token caches of the train and test splits (extracted, resumed or reused). Under torchrun each
    rank extracts rows rank, rank + world, ... of each split into a cache of its own."""
    if not config.backbone.cache_tokens:
        raise CarrotError("backbone.cache_tokens is false (--no-cache-tokens): there is no token cache to extract into")
    root = cache_root(config)
    train, test = load_splits(config)
    model = model or Carrot(config)
    check_headers((train, test), model.backbone.min_side)
    report_duplicates(train, test)
    b = config.backbone
    rank, size = world()
    parts = [split.subset(range(rank, len(split), size)) if size > 1 else split for split in (train, test)]
    _say_cache_size(model, parts, root)  # first: auto may read fewer blocks when the wide cache would not fit
    check_resources(model, parts, root)
    stores = [extract(model.backbone, split, root,
                      dtype=b.cache_dtype, batch_size=b.batch_size, num_workers=b.num_workers, progress=progress and rank == 0)
              for split in parts]
    return stores, train, test


def _say_cache_size(model: Carrot, datasets: Sequence[ImageDataset], root: Path) -> None:
    """Before extraction, the disk the token caches will take; with ``backbone.blocks`` auto, the last blocks'
    cache every candidate reads from, bounded: when it would take more than half the free disk, one block is read
    (the candidates of more blocks are dropped, and the choice says so). Under torchrun rank 0 decides for all (its
    share times the world), so every rank embeds the same candidates."""
    from carrot.features.cache import missing_bytes

    bb, b = model.backbone, model.config.backbone
    rank, size = world()
    need = sum(missing_bytes(bb, ds, root, b.cache_dtype) for ds in datasets)
    probe = next((p for p in (root, *root.parents) if p.exists()), None)
    free = shutil.disk_usage(probe).free if probe is not None else None
    if rank == 0 and b.blocks == "auto" and bb.blocks > 1 and free is not None and need * size > free // 2:
        wide = need * size
        bb.blocks = 1
        need = sum(missing_bytes(bb, ds, root, b.cache_dtype) for ds in datasets)
        note(f"embedding auto: the last blocks' token cache would take {human_size(wide)}, more than half the "
             f"{human_size(free)} free at '{root}'; reading the last block only")
    if size > 1 and b.blocks == "auto":
        import torch.distributed as dist

        box = [bb.blocks]
        dist.broadcast_object_list(box, src=0)
        if box[0] != bb.blocks:
            bb.blocks = box[0]
            need = sum(missing_bytes(bb, ds, root, b.cache_dtype) for ds in datasets)
    if need and rank == 0:
        what = (f"the last {bb.blocks} blocks, the candidates of backbone.blocks auto" if b.blocks == "auto" and bb.blocks > 1
                else f"{bb.blocks} block{'s' if bb.blocks > 1 else ''}")
        note(f"token cache: {human_size(need * size)} for {sum(len(d) for d in datasets) * size} images ({what}) at '{root}'")


def _gather_rows(G_shard: np.ndarray, n: int, run_dir: Path, name: str) -> np.ndarray | None:
    """Assemble per-rank row shards (rows rank::world) on rank 0 through files in RUN_DIR/.shards."""
    rank, size = world()
    if size == 1:
        return G_shard
    rd = RunDir(run_dir)
    rd.shards.mkdir(parents=True, exist_ok=True)
    np.save(rd.shard(name, rank), G_shard)
    barrier()
    if rank != 0:
        return None
    G = np.empty((n, G_shard.shape[1]))
    for r in range(size):
        G[r::size] = np.load(rd.shard(name, r))
        rd.shard(name, r).unlink()
    return G


def _fit_token_map(model: Carrot, train: ImageDataset, store: Any) -> None:
    """Fit the configured token map before any embedding, on the seeded token sample of the training split: read
    from its cache (``store``), or computed by the backbone without one and under torchrun, where rank 0 fits the
    map on the whole split's sample (the same tokens) and every rank uses that one map."""
    if model.config.token_map.kind == "none":
        return
    rank, size = world()
    if rank == 0:
        model.fit_token_map(store.tokens if store is not None and size == 1 else model.sample_tokens(train))
    if size > 1:
        import torch.distributed as dist

        box = [model.token_map_]
        dist.broadcast_object_list(box, src=0)
        model.token_map_ = box[0]


def fit(config: RunConfig, run_dir: str | Path, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Extract (cached) tokens for both splits, fit the head, evaluate, save the run directory."""
    t0 = time.perf_counter()
    config = absolute_data(config)
    check_outside_data(config, run_dir, "--out")
    clear_run(run_dir, overwrite, config=config)
    init_from_env()
    model = Carrot(config)
    rank, size = world()
    if config.backbone.cache_tokens:
        stores, train, test = extract_splits(config, model, progress)
        _fit_token_map(model, train, stores[0])
    else:  # stream images -> embeddings; this rank's rows rank, rank + world, ...
        (train, test), stores = load_splits(config), []
        check_headers((train, test), model.backbone.min_side)
        report_duplicates(train, test)
        check_resources(model, (train, test), None)
        _fit_token_map(model, train, None)
    splits = [split.subset(range(rank, len(split), size)) if size > 1 else split for split in (train, test)]
    shards, line = _embed_splits(model, stores, splits, progress and rank == 0)
    t_extract = time.perf_counter() - t0
    run_dir = Path(run_dir)
    gathered = {c: [_gather_rows(G, len(split), run_dir, f"{name}{i}") for G, split, name in zip(Gs, (train, test), ("train", "test"))]
                for i, (c, Gs) in enumerate(shards.items())}
    if rank != 0:
        return {"rank": rank, "token_caches": [str(s.path) for s in stores]}
    head, choice, kept = None, None, next(iter(gathered))
    if is_auto(config):
        note(f"embedding auto: the head of each of the {len(gathered)} embeddings on {len(train)} training images, "
             f"{len(train.classes)} classes")
        picked = choose(model.config, {c: Gs[0] for c, Gs in gathered.items()}, train.labels, line)
        model.use_embedding(picked.candidate)
        head, choice, kept = picked.head, picked.record, picked.candidate
    G_train, G_test = gathered[kept]
    if head is None:
        note(f"fitting the head ({config.head.kind}) on {len(train)} training images, {len(train.classes)} classes")
    model.fit(G_train, train.labels, train.records, train.classes, head=head)
    metrics = {
        "n_train": len(train), "n_test": len(test), "classes": len(train.classes),
        "embedding": choice["chosen"] if choice else None, "embedding_choice": choice,
        "head": kind_of(model.head_).name, "head_choice": getattr(model.head_, "head_choice_", None),
        **model.head_.fit_record(),
        "train_accuracy": model.score(G_train, train.labels),
        "test_accuracy": model.score(G_test, test.labels),
        "per_class_test_accuracy": dict(zip(train.classes, per_class_accuracy(model.head_.predict(G_test), test.labels, len(train.classes)))),
        "seconds_extract": t_extract, "seconds_total": time.perf_counter() - t0,
        "backbone_precision": model.backbone.precision, "backbone_images_per_second": _extraction_speed(stores),
        "token_caches": [str(s.path) for s in stores] if size == 1 else [],
        "world_size": size,
        "duplicate_test_images": len(duplicate_test_images(train, test)),
    }
    model.record_test(G_test, test.records, metrics)
    note(f"writing the run to '{run_dir}' (its index page: the summary, label review and harmful images)")
    model.save(run_dir, finish=lambda staging: write_index(staging, model=model, name=run_dir.resolve().name),
               replace=ANY if overwrite else None)  # without --overwrite, a run another process wrote meanwhile stays
    return metrics


def _embed_splits(model: Carrot, stores: Sequence[Any], splits: Sequence[ImageDataset],
                  progress: bool) -> tuple[dict[Any, list[np.ndarray]], str]:
    """The embeddings of both splits, {candidate: [train rows, test rows]}, in one pass over each split's tokens (from
    its cache, or streamed through the backbone), and the line saying what the candidates are: with
    ``backbone.blocks`` / ``global_tokens`` auto every candidate's, else the one the config pins."""
    cands, line = candidates(model.config, model.backbone)
    if is_auto(model.config):
        note(f"embedding auto: {line}")
    embs = embedders(model.config, cands, model.token_map_)
    if stores:
        per_split = [embed_candidates_of_store(s.last_blocks(model.backbone.blocks), embs, progress) for s in stores]
    else:
        per_split = [embed_inputs(model, model.input_batches(split, progress), len(split), embs, split.name)
                     for split in splits]
    return {c: [Gs[c] for Gs in per_split] for c in cands}, line


def _extraction_speed(stores: Sequence[Any]) -> float | None:
    """Images per second of the backbone over the token caches' extractions (as each cache's manifest recorded it when
    it was written: a cache reused from an earlier run keeps its own number); None when no cache recorded one."""
    timed = [(s.manifest["n"], s.manifest["images_per_second"]) for s in stores
             if (s.manifest.get("images_per_second") or 0) > 0]
    if not timed:
        return None
    return sum(n for n, _ in timed) / sum(n / v for n, v in timed)


def explain(run_dir: str | Path, inputs: Sequence[str], out_dir: str | Path | None = None, top_k: int = 5,
            device: str | None = None, batch: int = 16, node_removal: bool = False,
            region_mask: str | None = None, pixel_map: str | None = "shapley", permutations: int = DEFAULT_PERMUTATIONS,
            occlusion: bool = False, removal: str = DEFAULT_REMOVAL, block: int | str = DEFAULT_BLOCK) -> list[dict[str, Any]]:
    """Explain each image with a fitted run: heatmap.png, explanation.html/.json per image, index.html."""
    model = Carrot.load(run_dir)
    if device:
        model.config = model.config.merged({"device": device})
    rd = RunDir(run_dir)
    out_root = (Path(out_dir) if out_dir else rd.explanations).resolve()
    check_outside_data(model.config, out_root, "--out")
    if out_root.exists() and not out_root.is_dir():
        raise CarrotError(f"--out: '{out_root}' is a file; expected a folder for the explanations")
    model.check_backbone()
    paths = collect_images(inputs)
    masks = None
    if region_mask:
        if len(paths) != 1:
            raise CarrotError(f"--region-mask: expected exactly one image to explain, got {len(paths)}")
        mask, size = read_mask(region_mask), load_image(paths[0], model.backbone.min_side).size
        if mask.size != size:  # resizing a label map silently would move the user's segment boundaries
            raise CarrotError(f"--region-mask: expected a mask of the image's size, {size[0]} x {size[1]} px, got "
                              f"{mask.size[0]} x {mask.size[1]} px in '{region_mask}'")
        masks = {paths[0]: model.mask_transform()(mask)}
        masks[paths[0]] = np.asarray(masks[paths[0]], dtype=np.int64)
    earlier = _explained_before(out_root)
    numbers = {_key(e["image"]): int(Path(e["page"]).parent.name.split("_", 1)[0]) for e in earlier}
    taken = [int(p.name[:4]) for p in out_root.glob("[0-9][0-9][0-9][0-9]_*")] if out_root.is_dir() else []
    next_free = max(taken + list(numbers.values()), default=-1) + 1  # never reuse a folder of another image
    results: list[dict[str, Any]] = []
    root_fresh = not out_root.exists()
    into_run = out_root == rd.explanations.resolve()
    identity = model.run_identity_ if into_run else None  # pages go into the run only while it is this run
    images = bar(total=len(paths), desc="explain", unit="img", leave=True)
    try:
        for s in range(0, len(paths), batch):
            for exp in model.explain_iter(paths[s : s + batch], top_k, node_removal=node_removal, masks=masks,
                                          pixel_map=pixel_map, permutations=permutations, occlusion=occlusion,
                                          removal=removal, block=block):
                key = _key(exp.image)
                if key not in numbers:
                    numbers[key], next_free = next_free, next_free + 1
                results.append(_write_page(rd, identity, exp, RunDir.explanation_dir(out_root, numbers[key], exp.image)))
                images.update(1)
    except BaseException:
        images.leave = False  # a failed command's bar clears itself: its one error line stands alone
        raise
    finally:  # the pages written so far are complete: list them, even when a later one failed
        images.close()
        listed = earlier + results
        try:
            with rd.publishing(identity):  # the list as it is now (another explain may have added pages), then ours
                mine = {_key(r["image"]) for r in results}
                listed = [e for e in _explained_before(out_root) if _key(e["image"]) not in mine] + results
                if results:
                    write_json(RunDir.explanations_list(out_root), listed)
                elif root_fresh and out_root.is_dir() and not any(out_root.iterdir()):
                    out_root.rmdir()
        except CarrotError:  # the run was replaced meanwhile: its new folder gets nothing of this command's
            pass
    if into_run:
        with rd.publishing(identity):
            write_index(run_dir, listed, model)
    return results


def _write_page(rd: RunDir, identity: str | None, exp: Any, target: Path) -> dict[str, Any]:
    """One explanation's page folder, written whole (a folder that fails half-way is removed) under the run's lock,
    while the run is still the one explained with (``identity``)."""
    with rd.publishing(identity):
        fresh = not target.exists()
        try:
            return write_explanation(exp, target)
        except BaseException:
            if fresh:  # no half-written page folder
                shutil.rmtree(target, ignore_errors=True)
            raise


def _key(image: str) -> str:
    return str(Path(image).resolve())


def _explained_before(root: Path) -> list[dict[str, Any]]:
    """The explanations an earlier ``explain`` listed in ``root`` whose pages are still there (a damaged list
    is set aside with a warning: the pages it named stay, the index lists the new ones)."""
    from carrot.errors import warn
    from carrot.io import read_json

    listed = RunDir.explanations_list(root)
    if not listed.is_file():
        return []
    try:
        entries = read_json(listed, "explanations list")
        ok = isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("image"), str)
                                               and isinstance(e.get("page"), str) for e in entries)
    except CarrotError:
        ok = False
    if not ok:
        warn(f"'{listed}' is damaged; the index lists only the images explained now")
        return []
    return [e for e in entries if Path(e["page"]).is_file() and Path(e["page"]).parent.name[:4].isdigit()]


def read_mask(path: str | Path):
    """An integer segment mask image (one label per pixel), or a one-line error naming --region-mask."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as m:
            m.load()
            if m.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise CarrotError(f"--region-mask: expected a single-channel integer image (mode L, P, I or I;16), "
                                  f"got mode {m.mode} in '{path}'")
            return m.convert("I")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, CarrotError):
            raise
        raise CarrotError(f"--region-mask: '{path}' is not an image ({type(exc).__name__})") from None


def evaluate(run_dir: str | Path, what: Sequence[str], out: str | Path | None = None, seeds: Sequence[int] = (0, 1, 2, 3, 4),
             shots: int | None = None, resplit: bool = False, certificate_limit: int = 50, **kwargs: Any) -> dict[str, Any]:
    """Accuracy over seeds and attribution evaluations on a fitted run's cached embeddings; writes evaluation.json."""
    from carrot.audit.evaluate import EVALUATIONS, accuracy_over_seeds, evaluate_embeddings
    from carrot.audit.protocols import certificates, pixel_deletion, pointing, region_deletion

    regions = ("pointing", "deletion", "pixel-deletion", "certificates")  # the head as it is, on the run's test images
    known = ("accuracy", *EVALUATIONS, *regions)
    if not what or set(what) - set(known):
        raise CarrotError(f"--what: expected some of {', '.join(known)}, got {', '.join(what) or 'nothing'}")
    model, G, y, G_test, y_test = run_embeddings(run_dir)
    needs = {**{e: "attribution_audits" for e in EVALUATIONS}, "mislabel": "loo", "deletion": "region_split",
             "pointing": "region_split",
             "certificates": "certificate"}
    for w in what:
        if w in needs:
            require(model.head_, needs[w], f"evaluate --what {w}")
    rest = [w for w in what if w not in (*regions, "accuracy")]
    res = evaluate_embeddings(G, y, G_test, model.head_, rest, seed=model.config.seed, **kwargs) if rest else {}
    if "accuracy" in what:
        res["accuracy"] = accuracy_over_seeds(G, y, G_test, y_test, model.head_, model.classes_, seeds, shots, resplit)
    if "pointing" in what:
        res["pointing"] = pointing(model, cached_test_split(run_dir, model), load_splits(model.config)[1],
                                   n_pixel=kwargs.get("n_test", 50), seed=model.config.seed)
    if "deletion" in what:
        res["deletion"] = region_deletion(model, cached_test_split(run_dir, model), kwargs.get("n_test", 50), seed=model.config.seed)
    if "pixel-deletion" in what or "deletion" in what:  # the pixel protocol beside the graph-side one
        res["pixel_deletion"] = pixel_deletion(model, kwargs.get("n_test", 50), seed=model.config.seed)
    if "certificates" in what:
        res["certificates"] = certificates(model, kwargs.get("n_test", 50), certificate_limit, seed=model.config.seed)
    write_json(out, res) if out else publish(run_dir, model, lambda rd: rd.write_audit("evaluation", res))
    return res


def demo(config: RunConfig, run_dir: str | Path, explain_n: int = 3, progress: bool = True,
         overwrite: bool = False) -> dict[str, Any]:
    """Fit on the configured data (ELPV by default), add a LogisticRegression probe, explain a few; an
    existing run in ``run_dir`` is replaced only with ``overwrite``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    note("demo: fitting carrot on the configured data (tokens, graph, diffusion, head)")
    metrics = fit(config, run_dir, progress, overwrite=overwrite)
    run_dir = Path(run_dir)
    model = Carrot.load(run_dir)
    G_test = model.test_embeddings_
    y_test = np.array([lab for _, lab in model.test_records_])
    y_train = np.array([r.label for r in model.train_records_])
    note("demo: a LogisticRegression probe on the same features, for comparison")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(model.train_embeddings_, y_train)
    metrics["logreg_probe_test_accuracy"] = float(probe.score(G_test, y_test))
    paths = [p for p, _ in model.test_records_[: max(0, explain_n)]]
    if paths:
        note(f"demo: explaining {len(paths)} test images (training images for and against, certificate, pixel map)")
    results = explain(run_dir, paths) if paths else []
    metrics["explained"] = [{"image": r["image"], "predicted": r["predicted"], "heatmap": r["heatmap"]} for r in results]
    metrics["seconds_demo"] = time.perf_counter() - t0
    publish(run_dir, model, lambda rd: write_json(rd.metrics, metrics), index=False)
    return {k: metrics[k] for k in ("n_train", "n_test", "classes", "embedding", "head", "test_accuracy",
                                     "logreg_probe_test_accuracy", "seconds_extract", "seconds_demo", "explained")}
