"""Region maps measured in pixel space: carrot's maps against the peers' libraries, under every way of removing a cell.

For ``--n-test`` random test images of a fitted run and the predicted class c of each, every map below is
turned into a cell order (the backbone's grid: 16x16 cells of 14 px for DINOv2 at 224, 7x7 cells of 32 px for
EfficientNet-Lite0) and scored by carrot's pixel protocol (:mod:`carrot.attribution.pixels`) under each removal the
backbone allows (``removals_of``: cells blurred, filled with the image's mean colour, inpainted from the kept pixels
around them, and for ViTs their tokens dropped): cells removed (deletion) or kept with the rest removed (insertion) in
map order over 16 steps, the whole model re-run at each step. Two numbers per curve: the raw area under the logit
(mean over every image, nothing left out), and the area scaled to 1 at the image and 0 with every cell removed,
pooled over the images weighted by that span (images where removing everything does not lower the logit left out).
Per removal, each map's per-image raw deletion AUC minus carrot's default map's, with its s.e. and the number of
images on which the map deletes better (lower) than carrot's default.

Maps, all of the same model (backbone, graph, diffusion, readout, head), for logit c:
- carrot Shapley map (the default of ``explain``: its removal, block and orders), and the settings in ``--shapley``;
- carrot pixel split (``explain --pixel-map split``, blurred image as the path's end);
- carrot occlusion map (``explain --occlusion``, the default removal), exact re-runs;
- carrot token map: the exact split of the logit over the tokens; random order;
- Captum ``IntegratedGradients`` with the blurred image and with the mean-colour image as baseline (32 steps),
  pixel attributions summed per cell (inpainting and token dropping have no single baseline image: their nearest is
  the mean colour, which is what inpainting everything gives);
- Captum ``FeatureAblation`` over the cells' presence (one feature per cell, baseline absent) with the forward
  function "the whole model with the absent cells removed", once per removal: Captum's occlusion under each removal
  (under blur it is ``Occlusion`` with the blurred baseline, one-cell window);
- pytorch-grad-cam ``GradCAM`` (last block; ViT tokens reshaped to the grid), the CAM averaged per cell.
The peers run through their documented APIs on a torch module that is the whole model (gradients flow through
the graph and the diffusion). Seconds per image are wall time on this machine for the map alone.

    make bench-env && python benchmarks/bench_pixels.py --run runs/demo --n-test 8
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

from carrot.attribution.pixels import auto_block, cell_boxes, fill_image  # noqa: E402
from carrot.audit.protocols import REGION_MAPS, image_regions, region_scores  # noqa: E402
from carrot.config import DEFAULT_BLOCK  # noqa: E402
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
    from bench_pixel_curve import parse

    from carrot.audit.protocols import CURVE_KEYS, curve_summary, paired, removals_of, score_orders
    from carrot.config import DEFAULT_PERMUTATIONS, DEFAULT_REMOVAL
    from carrot.progress import set_quiet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a fitted run directory")
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--removal", default=DEFAULT_REMOVAL, help="carrot's default map's removal (explain's default)")
    ap.add_argument("--block", type=lambda v: v if v == "auto" else int(v), default=DEFAULT_BLOCK,
                    help="carrot's default map's block (explain's default)")
    ap.add_argument("--shapley", nargs="*", default=[], help="more Shapley settings, <removal>:b<block>k<orders>")
    ap.add_argument("--maps", nargs="+", default=["carrot_shapley", "carrot_split", "carrot_occlusion", "carrot_token",
                                                   "random", "captum_ig_blur", "captum_ig_mean", "captum_ablation",
                                                   "gradcam"])
    ap.add_argument("--out", default=None, help="default: results/pixels_<data>_<backbone>")
    args = ap.parse_args()

    from captum.attr import FeatureAblation, IntegratedGradients
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    set_quiet(True)
    torch.manual_seed(args.seed)
    model = Carrot.load(args.run)
    module = WholeModel(model).eval()
    removals = removals_of(model)
    maps = [m for m in args.maps if m != "captum_ablation"] + [f"carrot_shapley_{s}" for s in args.shapley]
    maps += [f"captum_ablation_{r}" for r in removals] if "captum_ablation" in args.maps else []
    rng = np.random.default_rng(args.seed)
    rows_idx = np.sort(rng.choice(len(model.test_records_), min(args.n_test, len(model.test_records_)), replace=False))
    auc = {r: {m: {k: [] for k in CURVE_KEYS} for m in maps} for r in removals}
    secs: dict[str, list[float]] = {m: [] for m in maps}
    spans: dict[str, list[float]] = {r: [] for r in removals}
    grid = None
    t_all = time.perf_counter()
    for done, i in enumerate(rows_idx.tolist()):
        x, H, w, grid, c = image_regions(model, model.test_records_[i][0])
        size = tuple(x.shape[-2:])
        boxes = cell_boxes(grid, size)
        games = {r: model.cell_game(x, grid, r) for r in removals}
        for r, g in games.items():
            full, removed = (e[c] for e in g.ends())
            spans[r].append(float(full - removed))
        orders = {}
        for m in maps:
            t0 = time.perf_counter()
            if m == "carrot_shapley":
                s = model.pixel_map(x, c, grid, "shapley", DEFAULT_PERMUTATIONS, args.removal, args.block)[0].ravel()
            elif m.startswith("carrot_shapley_"):
                removal, block, K = parse(m.removeprefix("carrot_shapley_"), "--shapley")
                s = model.pixel_map(x, c, grid, "shapley", K, removal, block)[0].ravel()
            elif m == "carrot_occlusion":
                s = model.pixel_map(x, c, grid, "occlusion", removal=args.removal)[0].ravel()
            elif m.removeprefix("carrot_") in REGION_MAPS:  # carrot's own maps, as evaluate --what pixel-deletion
                s = region_scores(model, m.removeprefix("carrot_"), x, H, w, c, grid, rng)
            elif m.startswith("captum_ig_"):
                base = fill_image(x, grid, m.removeprefix("captum_ig_"))[None]
                a = IntegratedGradients(module).attribute(x[None].requires_grad_(), baselines=base, target=c,
                                                          n_steps=args.ig_steps, internal_batch_size=8)
                s = per_cell(a[0].detach().sum(0).numpy(), boxes, "sum")
            elif m.startswith("captum_ablation_"):
                game = games[m.removeprefix("captum_ablation_")]
                present = torch.ones(1, game.n, dtype=torch.float64)
                with torch.no_grad():
                    a = FeatureAblation(lambda p, g=game: torch.from_numpy(g(p < 0.5))).attribute(
                        present, baselines=0.0, target=c, perturbations_per_eval=game.batch)
                s = a[0].numpy()
            elif m == "gradcam":
                reshape = vit_reshape(model, grid) if hasattr(module.backbone, "patch_embed") else None
                with GradCAM(model=module, target_layers=cam_target_layer(module), reshape_transform=reshape) as cam:
                    a = cam(input_tensor=x[None].to(torch.float32).requires_grad_(), targets=[ClassifierOutputTarget(c)])
                s = per_cell(np.asarray(a[0]), boxes, "mean")
            else:
                raise SystemExit(f"--maps: unknown map {m!r}")
            secs[m].append(time.perf_counter() - t0)
            orders[m] = np.argsort(-np.asarray(s), kind="stable")
        score_orders(games, c, orders, args.steps, auc)
        print(f"[{done + 1}/{len(rows_idx)}] {time.perf_counter() - t_all:.0f} s: " + "; ".join(
            f"{r}: " + ", ".join(f"{m} {np.mean(auc[r][m]['raw_deletion']):+.3f}" for m in maps) for r in removals),
            flush=True)
    rows = []
    for m in maps:
        row = {"map": m, "seconds_per_image": float(np.mean(secs[m]))}
        for r in removals:
            for k, v in curve_summary(auc[r][m], spans[r], args.seed).items():
                row[f"{r}_{k}"], row[f"{r}_{k}_sem"] = v["mean"], v["sem"]
            if m != "carrot_shapley":
                d = paired({"carrot_shapley": auc[r]["carrot_shapley"]["raw_deletion"], m: auc[r][m]["raw_deletion"]},
                           "carrot_shapley")[m]
                row[f"{r}_minus_default"], row[f"{r}_minus_default_sem"], row[f"{r}_lower_than_default"] = \
                    d["mean"], d["sem"], d["lower"]
        rows.append(row)
    meta = json.loads((Path(args.run) / "run.json").read_text())
    data, backbone = meta["config"]["data"]["kind"], meta["config"]["backbone"]["name"]
    out = args.out or Path(__file__).parent / "results" / f"pixels_{data}_{backbone}"
    import captum
    import pytorch_grad_cam

    print(write_results(out, rows, benchmark="pixels", run=str(args.run), data=data, backbone=backbone,
                        grid=list(grid), n_test=int(len(rows_idx)), steps=args.steps, ig_steps=args.ig_steps,
                        seed=args.seed, removals=list(removals),
                        default={"removal": model.pixel_removal(args.removal),
                                 "block": auto_block(grid) if args.block == "auto" else args.block,
                                 "permutations": DEFAULT_PERMUTATIONS},
                        precision=model.backbone.precision, device=device_name("cpu"), python=platform.python_version(),
                        torch=torch.__version__, captum=captum.__version__,
                        grad_cam=getattr(pytorch_grad_cam, "__version__", "1.5.7"), per_image=auc, spans=spans,
                        seconds_per_image=secs, seconds_total=time.perf_counter() - t_all))


if __name__ == "__main__":
    main()
