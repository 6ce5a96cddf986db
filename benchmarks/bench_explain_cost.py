"""Seconds per explanation as a user pays them: ``carrot-run explain`` from a fresh process, the default against the
old default and against the peers' pixel maps measured in the same run.

For each carrot setting, ``carrot-run explain RUN`` runs as a new process on 1 and on ``--images`` test images of the
run (the same images for every setting): the wall time of the one-image command (start-up, run and backbone loading
included), the seconds each further image adds ((T_N - T_1) / (N - 1)), and what each explanation took inside the
command by its own clock (``seconds`` in each ``explanation.json``: every part, the page included; mean and max over
the N images), with the pixel map's share. Settings:
- ``default``: explain's defaults (the training side, certificate, token map and the default pixel map);
- ``old-default``: the pixel map explain made before issue 26 (Shapley over single cells, blurred, 4 orders:
  K (N - 1) + 2 runs of the whole model), everything else the same;
- ``no-pixel-map``: ``--pixel-map none``, the rest of an explanation alone.
The peers run in this process on the same images and model (``WholeModel`` of ``bench_pixels.py``, the map alone, one
warm-up image first): Captum ``IntegratedGradients`` (blurred baseline, 32 steps), Captum ``Occlusion`` as
``FeatureAblation`` over the cells with the blurred cells as the absent value, and pytorch-grad-cam ``GradCAM``. Their
faithfulness and carrot's are in the "Region maps in pixel space" tables (``bench_pixels.py``).

    make bench-env && python benchmarks/bench_explain_cost.py --run runs/demo --images 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SETTINGS = {"default": [], "old-default": ["--removal", "blur", "--block", "1"], "no-pixel-map": ["--pixel-map", "none"]}


def explain_wall(run: str, images: list[str], flags: list[str]) -> tuple[float, list[dict]]:
    """Wall seconds of ``carrot-run explain`` in a new process, and its explanations' JSON."""
    exe = str(Path(sys.executable).with_name("carrot-run"))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        r = subprocess.run([exe, "explain", run, *images, "--out", out, "--json", "--quiet", *flags],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"carrot-run explain failed: {r.stderr.strip()[-500:]}")
        return wall, json.loads(r.stdout)


def peers(run: str, images: list[str], ig_steps: int) -> dict[str, list[float]]:
    """Seconds per image of each peer's map on ``images`` (after a warm-up on the first)."""
    from bench_pixels import WholeModel, cam_target_layer, per_cell, vit_reshape
    from captum.attr import FeatureAblation, IntegratedGradients
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from carrot.attribution.pixels import cell_boxes, fill_image
    from carrot.audit.protocols import image_regions
    from carrot.run.pipeline import Carrot

    model = Carrot.load(run)
    module = WholeModel(model).eval()
    secs: dict[str, list[float]] = {"captum_ig_blur": [], "captum_occlusion_blur": [], "gradcam": []}
    for n, path in enumerate([images[0], *images]):
        x, _, _, grid, c = image_regions(model, path)
        boxes = cell_boxes(grid, tuple(x.shape[-2:]))
        game = model.cell_game(x, grid, "blur")
        for name in secs:
            t0 = time.perf_counter()
            if name == "captum_ig_blur":
                a = IntegratedGradients(module).attribute(x[None].requires_grad_(), baselines=fill_image(x, grid, "blur")[None],
                                                          target=c, n_steps=ig_steps, internal_batch_size=8)
                per_cell(a[0].detach().sum(0).numpy(), boxes, "sum")
            elif name == "captum_occlusion_blur":
                with torch.no_grad():
                    FeatureAblation(lambda p: torch.from_numpy(game(p < 0.5))).attribute(
                        torch.ones(1, game.n, dtype=torch.float64), baselines=0.0, target=c,
                        perturbations_per_eval=game.batch)
            else:
                reshape = vit_reshape(model, grid) if hasattr(module.backbone, "patch_embed") else None
                with GradCAM(model=module, target_layers=cam_target_layer(module), reshape_transform=reshape) as cam:
                    cam(input_tensor=x[None].to(torch.float32).requires_grad_(), targets=[ClassifierOutputTarget(c)])
            if n:  # the first image warms up
                secs[name].append(time.perf_counter() - t0)
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--images", type=int, default=3, help="test images per multi-image command (>= 2)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: results/explain_cost_<data>_<backbone>")
    args = ap.parse_args()
    meta = json.loads((Path(args.run) / "run.json").read_text())
    tests = [p for p, _ in meta["test_records"]]
    rng = np.random.default_rng(args.seed)
    images = [tests[i] for i in sorted(rng.choice(len(tests), max(2, args.images), replace=False))]
    rows = []
    for s in args.settings:
        one, exp1 = explain_wall(args.run, images[:1], SETTINGS[s])
        many, exps = explain_wall(args.run, images, SETTINGS[s])
        pixel = [e.get("pixel_map_seconds") for e in exps if e.get("pixel_map_seconds") is not None]
        each = [e["seconds"]["total"] + e["seconds"].get("page", 0.0) for e in exps]  # inside the command, per image
        stages = {f"{k}_s": float(np.mean([e["seconds"][k] for e in exps])) for k in exps[0]["seconds"] if k != "total"}
        rows.append({"setting": s, "flags": " ".join(SETTINGS[s]), "one_image_command_s": one,
                     "n_image_command_s": many, "per_further_image_s": (many - one) / (len(images) - 1),
                     "explanation_s": float(np.mean(each)), "explanation_max_s": float(np.max(each)),
                     "pixel_map_s": float(np.mean(pixel)) if pixel else None, **stages,
                     "pixel_map": exp1[0].get("pixel_map_removal"), "block": exp1[0].get("pixel_map_block")})
        print(json.dumps(rows[-1]), flush=True)
    import captum
    import pytorch_grad_cam

    from carrot.progress import set_quiet

    set_quiet(True)
    for name, v in peers(args.run, images, args.ig_steps).items():
        rows.append({"setting": name, "map_alone_s": float(np.mean(v))})
        print(json.dumps(rows[-1]), flush=True)
    data, backbone = meta["config"]["data"]["kind"], meta["config"]["backbone"]["name"]
    out = args.out or Path(__file__).parent / "results" / f"explain_cost_{data}_{backbone}"
    print(write_results(out, rows, benchmark="explain_cost", run=str(args.run), data=data, backbone=backbone,
                        images=images, precision=meta["backbone"].get("precision"), device=device_name("cpu"),
                        cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                        captum=captum.__version__, grad_cam=getattr(pytorch_grad_cam, "__version__", "1.5.7"),
                        ig_steps=args.ig_steps))


if __name__ == "__main__":
    main()
