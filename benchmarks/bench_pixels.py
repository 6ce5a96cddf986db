"""Region maps measured in pixel space: carrot's maps against the peers' libraries under one protocol.

For ``--n-test`` random test images of a fitted run and the predicted class c of each, every map below is
turned into a cell order (the backbone's grid: 16x16 cells of 14 px for DINOv2 at 224, 7x7 cells of 32 px for
EfficientNet-Lite0) and scored by carrot's pixel protocol (:mod:`carrot.attribution.pixels`): cells blurred
(deletion) or revealed onto the blurred image (insertion) in map order over 16 steps, the whole model re-run at
each step, the AUC of the logit scaled to 1 at the image and 0 at the blurred image; mean and s.e.m. over images.

Maps, all of the same model (backbone, graph, diffusion, readout, ridge head), for logit c:
- carrot pixel map (the default of ``explain``): exact cell occlusion, f_c(x) - f_c(x with cell j blurred);
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

from carrot.attribution.pixels import blur, cell_boxes, default_sigma, occlusion_map, pixel_curves, summarise  # noqa: E402
from carrot.attribution.representer import region_contributions  # noqa: E402
from carrot.features.backbone import patch_centres  # noqa: E402
from carrot.features.regions import RegionSet  # noqa: E402
from carrot.run.pipeline import Carrot  # noqa: E402


class WholeModel(torch.nn.Module):
    """The fitted run as one differentiable module: model input (B, 3, H, W) -> logits (B, C) float64."""

    def __init__(self, model: Carrot) -> None:
        super().__init__()
        self.model = model
        self.backbone = model.backbone.model  # registered, so hooks and gradients reach its layers
        self.coef = model.head_.coef_.to(torch.float64)
        self.intercept = model.head_.intercept_.to(torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, grid = self.model.backbone.tokens(x)
        H = H.to(torch.float64)
        w = self.model.embedder.weights(H, patch_centres(grid, torch.float64))[0]
        G = torch.einsum("bnd,bn->bd", H, w)
        return G @ self.coef + self.intercept


def per_cell(a: np.ndarray, boxes, how: str) -> np.ndarray:
    """A pixel map (H, W) pooled over each cell (sum or mean)."""
    f = np.sum if how == "sum" else np.mean
    return np.array([f(a[y0:y1, x0:x1]) for y0, y1, x0, x1 in boxes])


def cam_target_layer(module: WholeModel):
    bb = module.backbone
    if hasattr(bb, "blocks"):
        return [bb.blocks[-1].norm1]
    for name in ("conv_head", "bn2", "stages", "layer4"):
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
    ap.add_argument("--maps", nargs="+", default=["carrot_pixel", "carrot_token", "random", "captum_ig", "captum_occlusion",
                                                   "gradcam", "gradcam_pp", "eigencam"])
    ap.add_argument("--out", default=None, help="default: results/pixels_<data>_<backbone>")
    args = ap.parse_args()

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
    grid = None
    t_all = time.perf_counter()
    for done, i in enumerate(rows_idx.tolist()):
        x = model.inputs([model.test_records_[i][0]])[0]
        with torch.no_grad():
            H, grid = model.backbone(x[None])
        H = model._as_cached(H, "a test image")
        G, w = model.embed_regions(RegionSet(H, patch_centres(grid, torch.float64), grid))
        c = int(model.head_.decision_function(G.numpy())[0].argmax())
        size = tuple(x.shape[-2:])
        boxes = cell_boxes(grid, size)
        sigma = default_sigma(grid, size)
        xb = blur(x[None], sigma)
        ph, pw = size[0] // grid[0], size[1] // grid[1]
        for m in args.maps:
            t0 = time.perf_counter()
            if m == "carrot_pixel":
                s = occlusion_map(model.pixel_logits, x, c, grid).ravel()
            elif m == "carrot_token":
                s = region_contributions(model.head_, H[0], w[0])[:, c].numpy()
            elif m == "random":
                s = rng.permutation(len(boxes)).astype(float)
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
                reshape = vit_reshape(model, grid) if hasattr(module.backbone, "blocks") else None
                with cls(model=module, target_layers=cam_target_layer(module), reshape_transform=reshape) as cam:
                    a = cam(input_tensor=x[None].to(torch.float32), targets=[ClassifierOutputTarget(c)])
                s = per_cell(np.asarray(a[0]), boxes, "mean")
            secs[m].append(time.perf_counter() - t0)
            cur = pixel_curves(model.pixel_logits, x, c, grid, np.argsort(-s, kind="stable"), args.steps)
            auc[m]["deletion"].append(cur.auc("deletion"))
            auc[m]["insertion"].append(cur.auc("insertion"))
        print(f"[{done + 1}/{len(rows_idx)}] {time.perf_counter() - t_all:.0f} s: " + ", ".join(
            f"{m} {np.nanmean(auc[m]['deletion']):.3f}/{np.nanmean(auc[m]['insertion']):.3f}" for m in args.maps), flush=True)
    rows = [{"map": m, **{f"deletion_{k}": v for k, v in summarise(auc[m]["deletion"]).items()},
             **{f"insertion_{k}": v for k, v in summarise(auc[m]["insertion"]).items()},
             "seconds_per_image": float(np.mean(secs[m]))} for m in args.maps]
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
                         per_image={m: auc[m] for m in args.maps}, seconds_total=time.perf_counter() - t_all)
    print(path)


if __name__ == "__main__":
    main()
