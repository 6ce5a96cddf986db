"""Region maps measured in pixel space: carrot's maps against the peers' libraries under one protocol.

For ``--n-test`` random test images of a fitted run and the predicted class c of each, every map below is
turned into a cell order (the backbone's grid: 16x16 cells of 14 px for DINOv2 at 224, 7x7 cells of 32 px for
EfficientNet-Lite0) and scored by carrot's pixel protocol (:mod:`carrot.attribution.pixels`): cells blurred
(deletion) or revealed onto the blurred image (insertion) in map order over 16 steps, the whole model re-run at
each step, the AUC of the logit scaled to 1 at the image and 0 at the blurred image, pooled over the images
weighted by how much blurring changes each one's logit. Images whose blurred version scores the class at least
as high are left out of the pooled numbers (nothing to delete), so no map is computed for them.

Maps, all of the same model (backbone, graph, diffusion, readout, ridge head), for logit c:
- carrot Shapley map (the default of ``explain``): each cell's Shapley value in the game "blur a set of cells",
  4 random orders in antithetic pairs (the values sum exactly to f_c(x) - f_c(blurred x));
- carrot pixel split (``explain --pixel-map split``): each cell's share of f_c(x) - f_c(blurred x), the whole
  model's gradient integrated from the blurred image (32 Gauss-Legendre nodes: Captum IG's integral and quadrature);
- carrot occlusion map (``explain --occlusion``): f_c(x) - f_c(x with cell j blurred), exact re-runs;
- carrot token map: the exact split of the logit over the tokens;
- random order;
- Captum ``IntegratedGradients`` (blurred image as baseline, 32 steps), pixel attributions summed per cell;
- Captum ``Occlusion`` (window = stride = one cell, blurred image as baseline);
- pytorch-grad-cam ``GradCAM``, ``GradCAMPlusPlus``, ``EigenCAM`` (last block; ViT tokens reshaped to the grid),
  the CAM averaged per cell.
The peers run through their documented APIs on a torch module that is the whole model (gradients flow through
the graph and the diffusion). Seconds per image are wall time on this machine's device for the map alone.

    make bench-env && python benchmarks/bench_pixels.py --run runs/demo --n-test 40
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carrot.attribution.pixels import blur, blur_ends, cell_boxes, default_sigma, deletable, pixel_curves, pooled  # noqa: E402
from carrot.audit.protocols import REGION_MAPS, image_regions, region_scores  # noqa: E402
from carrot.run.pipeline import Carrot  # noqa: E402


class WholeModel(torch.nn.Module):
    """The fitted run as one differentiable module for the peers' libraries: model input (B, 3, H, W) -> logits
    (B, C) float64 (:meth:`Carrot.torch_logits`, the function carrot's pixel split integrates)."""

    def __init__(self, model: Carrot) -> None:
        super().__init__()
        self.model = model
        self.backbone = model.backbone.model  # registered, so hooks and gradients reach its layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.torch_logits(x)


def per_cell(a: np.ndarray, boxes, how: str) -> np.ndarray:
    """A pixel map (H, W) pooled over each cell (sum or mean)."""
    f = np.sum if how == "sum" else np.mean
    return np.array([f(a[y0:y1, x0:x1]) for y0, y1, x0, x1 in boxes])


def cam_target_layer(module: WholeModel):
    bb = module.backbone
    if hasattr(bb, "blocks") and hasattr(bb.blocks[-1], "norm1"):  # ViT: the last block's input norm
        return [bb.blocks[-1].norm1]
    for name in ("bn2", "conv_head", "stages", "layer4"):  # ConvNets: the layer the tokens come from
        if hasattr(bb, name):
            layer = getattr(bb, name)
            return [layer[-1] if isinstance(layer, torch.nn.Sequential) else layer]
    raise SystemExit(f"no target layer known for {type(bb).__name__}")


def vit_reshape(model: Carrot, grid):
    n_prefix = model.backbone.num_prefix_tokens

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t
        t = t[:, n_prefix:, :]
        return t.reshape(t.shape[0], grid[0], grid[1], t.shape[-1]).permute(0, 3, 1, 2)

    return reshape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a fitted run directory")
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--maps", nargs="+", default=["carrot_shapley", "carrot_split", "carrot_occlusion", "carrot_token", "random",
                                                   "captum_ig",
                                                   "captum_occlusion",
                                                   "gradcam", "gradcam_pp", "eigencam"])
    ap.add_argument("--out", default=None, help="default: results/pixels_<data>_<backbone>")
    ap.add_argument("--respan", default=None, help="only re-pool this result file (adds the images' spans)")
    ap.add_argument("--repool", default=None, help="only recompute this result file's summary rows from its per-image AUCs")
    ap.add_argument("--merge-into", default=None, help="replace --maps in this earlier result file of the same images")
    args = ap.parse_args()
    if args.respan:
        return respan(args.respan)
    if args.repool:
        return repool(args.repool)

    from captum.attr import IntegratedGradients, Occlusion
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(args.seed)
    model = Carrot.load(args.run)
    module = WholeModel(model).eval()
    rng = np.random.default_rng(args.seed)
    rows_idx = np.sort(rng.choice(len(model.test_records_), min(args.n_test, len(model.test_records_)), replace=False))
    auc = {m: {"deletion": [], "insertion": []} for m in args.maps}
    secs = {m: [] for m in args.maps}
    spans: list[float] = []
    grid = None
    t_all = time.perf_counter()
    for done, i in enumerate(rows_idx.tolist()):
        x, H, w, grid, c = image_regions(model, model.test_records_[i][0])
        size = tuple(x.shape[-2:])
        boxes = cell_boxes(grid, size)
        sigma = default_sigma(grid, size)
        xb = blur(x[None], sigma)
        ph, pw = size[0] // grid[0], size[1] // grid[1]
        full, blurred = blur_ends(model.pixel_logits, x, c, grid, sigma)
        spans.append(full - blurred)
        if not deletable(full, blurred):  # left out of every pooled number: skip its maps
            for m in args.maps:
                auc[m]["deletion"].append(float("nan"))
                auc[m]["insertion"].append(float("nan"))
            continue
        for m in args.maps:
            t0 = time.perf_counter()
            if m.removeprefix("carrot_") in REGION_MAPS:  # carrot's own maps, as evaluate --what pixel-deletion
                s = region_scores(model, m.removeprefix("carrot_"), x, H, w, c, grid, rng)
            elif m == "captum_ig":
                a = IntegratedGradients(module).attribute(x[None].requires_grad_(), baselines=xb, target=c,
                                                          n_steps=args.ig_steps, internal_batch_size=8)
                s = per_cell(a[0].detach().sum(0).numpy(), boxes, "sum")
            elif m == "captum_occlusion":
                with torch.no_grad():
                    a = Occlusion(module).attribute(x[None], sliding_window_shapes=(3, ph, pw), strides=(3, ph, pw),
                                                    baselines=xb, target=c, perturbations_per_eval=16)
                s = per_cell(a[0].sum(0).numpy(), boxes, "mean")
            else:
                cls = {"gradcam": GradCAM, "gradcam_pp": GradCAMPlusPlus, "eigencam": EigenCAM}[m]
                reshape = vit_reshape(model, grid) if hasattr(module.backbone, "patch_embed") else None
                with cls(model=module, target_layers=cam_target_layer(module), reshape_transform=reshape) as cam:
                    a = cam(input_tensor=x[None].to(torch.float32).requires_grad_(), targets=[ClassifierOutputTarget(c)])
                s = per_cell(np.asarray(a[0]), boxes, "mean")
            secs[m].append(time.perf_counter() - t0)
            cur = pixel_curves(model.pixel_logits, x, c, grid, np.argsort(-s, kind="stable"), args.steps)
            auc[m]["deletion"].append(cur.auc("deletion"))
            auc[m]["insertion"].append(cur.auc("insertion"))
        print(f"[{done + 1}/{len(rows_idx)}] {time.perf_counter() - t_all:.0f} s: " + ", ".join(
            f"{m} {pooled(auc[m]['deletion'], spans)['mean']:.3f}/{pooled(auc[m]['insertion'], spans)['mean']:.3f}"
            for m in args.maps), flush=True)
    if args.merge_into:
        return merge(args.merge_into, auc, secs, spans)
    write(args, model, rows_idx, grid, auc, secs, spans, time.perf_counter() - t_all)


def merge(path: str, auc: dict, secs: dict, spans: list[float]) -> None:
    """Replace these maps' per-image results in an earlier result file of the same run, images and seed (a map
    re-measured after a change), and re-pool its summary."""
    d = json.loads(Path(path).read_text())
    if not np.allclose(d["spans"], spans, rtol=1e-3, atol=1e-4):  # batch-dependent float32 rounding only
        raise SystemExit(f"{path}: other images or another model (spans differ); re-run the whole benchmark")
    d.setdefault("seconds_per_image", {r["map"]: [r["seconds_per_image"]] for r in d["rows"]})  # older files: means
    for m in auc:
        d["per_image"][m], d["seconds_per_image"][m] = auc[m], secs[m]
    d["rows"] = summary_rows(ordered(d), d["per_image"], d["seconds_per_image"], spans, d["seed"])
    d.setdefault("merged", []).append({"maps": sorted(auc), "torch": torch.__version__})
    Path(path).write_text(json.dumps(d, indent=2))
    print(path)


DEFAULT = "carrot_shapley"  # explain's default pixel map, the paired column's reference


def ordered(d: dict) -> list[str]:
    """A result file's maps: carrot's default first, then the order of its rows, then maps merged in since."""
    rows = [r["map"] for r in d["rows"]]
    return sorted(d["per_image"], key=lambda m: (m != DEFAULT, rows.index(m) if m in rows else len(rows)))


def repool(path: str) -> None:
    """Recompute a result file's summary rows from its per-image AUCs and spans (after a change of the pooling or
    of the paired reference)."""
    d = json.loads(Path(path).read_text())
    secs = d.get("seconds_per_image") or {r["map"]: [r["seconds_per_image"]] for r in d["rows"] if "seconds_per_image" in r}
    d["rows"] = summary_rows(ordered(d), d["per_image"], secs, d["spans"], d["seed"])
    Path(path).write_text(json.dumps(d, indent=2))
    print(path)


def summary_rows(maps, auc, secs, spans, seed: int) -> list[dict]:
    rows = []
    for m in maps:
        base = {"map": m, **{f"deletion_{k}": v for k, v in pooled(auc[m]["deletion"], spans, seed).items()},
                **{f"insertion_{k}": v for k, v in pooled(auc[m]["insertion"], spans, seed).items()},
                "seconds_per_image": float(np.nanmean(secs[m])) if len(secs.get(m, [])) else float("nan")}
        if DEFAULT in auc and m != DEFAULT:  # paired with carrot's default map, image by image
            d = np.asarray(auc[m]["deletion"]) - np.asarray(auc[DEFAULT]["deletion"])
            paired = pooled(d, spans, seed)
            base["deletion_minus_default"], base["deletion_minus_default_sem"] = paired["mean"], paired["sem"]
        rows.append(base)
    return rows


def write(args, model, rows_idx, grid, auc, secs, spans, seconds_total: float) -> None:
    rows = summary_rows(args.maps, auc, secs, spans, args.seed)
    meta = json.loads((Path(args.run) / "run.json").read_text())
    data, backbone = meta["config"]["data"]["kind"], meta["config"]["backbone"]["name"]
    out = args.out or Path(__file__).parent / "results" / f"pixels_{data}_{backbone}"
    import captum
    import pytorch_grad_cam

    path = write_results(out, rows, benchmark="pixels", run=str(args.run), data=data, backbone=backbone,
                         grid=list(grid), n_test=int(len(rows_idx)), steps=args.steps, ig_steps=args.ig_steps,
                         seed=args.seed, device=device_name("cpu"), python=platform.python_version(),
                         torch=torch.__version__, captum=captum.__version__,
                         grad_cam=getattr(pytorch_grad_cam, "__version__", "1.5.7"),
                         per_image={m: auc[m] for m in args.maps}, spans=spans,
                         seconds_per_image={m: secs[m] for m in args.maps}, seconds_total=seconds_total)
    print(path)


def respan(path: str) -> None:
    """Add the images' spans to a result file written before they were saved (same run, rows and seed), and
    re-pool its summary: two runs of the model per image."""
    d = json.loads(Path(path).read_text())
    model = Carrot.load(d["run"])
    rng = np.random.default_rng(d["seed"])
    rows_idx = np.sort(rng.choice(len(model.test_records_), min(d["n_test"], len(model.test_records_)), replace=False))
    spans = []
    for i in rows_idx.tolist():
        x = model.inputs([model.test_records_[i][0]])[0]
        f = model.pixel_logits(x[None])[0]
        c = int(f.argmax())
        xb = blur(x[None], default_sigma(tuple(d["grid"]), tuple(x.shape[-2:])))
        spans.append(float(f[c] - model.pixel_logits(xb)[0, c]))
    maps = [r["map"] for r in d["rows"]]
    secs = {r["map"]: [r["seconds_per_image"]] for r in d["rows"]}
    d["rows"] = summary_rows(maps, d["per_image"], secs, spans, d["seed"])
    d["spans"] = spans
    Path(path).write_text(json.dumps(d, indent=2))
    print(path)


if __name__ == "__main__":
    main()
