"""Render benchmarks/results/*.json into docs/benchmarks.md (tables generated, never typed).

    python benchmarks/report.py
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _device(args: dict, name: str | None) -> str:
    dev = args.get("device", "cpu")
    return f"{dev} ({name})" if name else dev


def engine_section(data: dict) -> list[str]:
    m = data["meta"]
    dev = _device(m["args"], m.get("device_name"))
    lines = [f"## Exact engine vs references, {dev} (`bench_engine.py`)", "",
             f"Machine: {m['machine']}, {m['threads']} torch threads, torch {m['torch']}; the carrot head fit accumulates its Gram and solves on {dev}; "
             "the exact LOO and Woodbury steps and every reference (sklearn, TracIn, refits) run on the CPU. "
             "Synthetic Gaussian-class features; `speedup` is reference time / this row's time, both measured in the same run; "
             "refit times beyond `refits_measured` are extrapolated linearly (marked); each (n, D, C) ran in a fresh process and "
             "its peak RSS (all tasks of that configuration, torch and data included) is the last column.", "",
             "| task | implementation | n | D | C | seconds | speedup | accuracy | max abs diff vs exact | config peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        impl = r["impl"] + (f" ({r['refits_measured']} measured, extrapolated)" if r.get("extrapolated") else "")
        lines.append(f"| {r['task']} | {impl} | {r['n']} | {r['d']} | {r['c']} | {_fmt(r['seconds'])} | "
                     f"{_fmt(r['speedup_vs_reference'])} | {_fmt(r.get('accuracy', ''))} | {_fmt(r.get('max_abs_diff', ''))} | "
                     f"{_fmt(r.get('config_peak_rss_mb', ''))} |")
    return lines + [""]


def elpv_section(s: dict) -> list[str]:
    def ms(d):
        return f"{d['mean']:.3f} ± {d['std']:.3f}"

    name = {"elpv": "ELPV", "fashion-mnist": "Fashion-MNIST"}.get(s.get("data_kind", "elpv"), s.get("data_kind"))
    lines = [f"## Attribution quality on {name} (`bench_elpv_attribution.py`)", "",
             f"{s['data']}; n_train = {s['n_train']}, λ = {s['lam']}, seeds {s['seeds']} (mean ± std), "
             f"{int(s['flip_fraction'] * 100)}% of the training labels flipped for mislabel detection.", "",
             "| mislabel score | ROC-AUC | flipped found in top 10% |", "|---|---|---|"]
    for k, v in s["mislabel_roc_auc"].items():
        lines.append(f"| {k} | {ms(v)} | {ms(s['mislabel_found_in_top_10pct'][k])} |")
    lines += ["", "| estimator | LDS (Spearman) | Spearman with exact LOO | logit drop, remove top-10 |", "|---|---|---|---|"]
    for k, v in s["lds"].items():
        agree = s["spearman_with_exact_loo"].get(k)
        lines.append(f"| {k} | {ms(v)} | {ms(agree) if agree else '1 (reference)'} | "
                     f"{ms(s['faithfulness_remove_top10_logit_drop'][k])} |")
    lines += ["", f"Removing 10 random training images drops the logit by {ms(s['faithfulness_remove_random10_logit_drop'])}.", ""]
    return lines


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k, "")) for _, k in cols) + " |")
    return out


def scale_section(d: dict) -> list[str]:
    dev = _device(d["args"], d["rows"][0].get("device_name") if d["rows"] else None)
    lam = d["args"].get("lam")
    how = ("λ = 'auto': the exact LOO accuracy of 15 candidates computed in one more streamed pass, then the solve"
           if lam == "auto" else f"λ = {lam}")
    lines = [f"## Head fit at scale, {dev}, {'λ auto' if lam == 'auto' else 'fixed λ'} (`bench_scale.py`)", "",
             f"Synthetic features streamed from a float32 memmap in chunks, float64 Gram accumulation on {dev}; {how}. "
             f"Log-log slope of fit time vs n: **{d['loglog_slope_time_vs_n']:.3f}** (1 = linear). Peak RSS counts the "
             "memmap pages read and the n x C float64 representer values (`dual_coef_gb`).", ""]
    return lines + _table(d["rows"], [("n", "n"), ("D", "d"), ("C", "c"), ("fit s", "seconds_fit"), ("peak RSS GB", "peak_rss_gb"),
                                      ("dual_coef GB", "dual_coef_gb"), ("train acc (first 20k)", "train_accuracy_first_20k"),
                                      ("λ used", "lam")]) + [""]


def kernel_scale_section(d: dict) -> list[str]:
    lines = [f"## Kernel head at scale: exact dual against the Nyström kernel, {d['device']}, {d['threads']} threads "
             "(`bench_kernel_scale.py`)", "",
             f"Synthetic embeddings (D = {d['dim']}, {d['classes']} classes, each a union of three Gaussian clusters), "
             f"{d['n_test']} test images; RBF kernel, gamma at the median heuristic, lambda by exact LOO over the default "
             "grid (one kernel parameter; `gamma: auto` searches five). Each fit runs in a fresh process: peak RSS is its "
             "own. `planned GiB` is the head's own memory plan (`DUAL_ARRAYS` n x n or `LOW_RANK_ARRAYS` n x m float64 "
             f"arrays) that `head.approx: auto` checks against half the memory; auto is exact up to n = "
             f"{d['nystroem_above']:,}. Agreement: the share of test images whose predicted class equals the exact head's.",
             ""]
    rows = [{**r, "m": r["m"] if r["m"] is not None else "—"} for r in d["rows"]]
    return lines + _table(rows, [("n", "n"), ("solve", "solve"), ("landmarks m", "m"), ("fit s", "fit_seconds"),
                                      ("LOO s", "loo_seconds"), ("predict s (2,000)", "predict_seconds_2000"),
                                      ("peak RSS GiB", "peak_rss_gib"), ("planned GiB", "planned_gib"),
                                      ("test acc", "test_accuracy"), ("LOO acc", "loo_accuracy"),
                                      ("agreement with exact", "agreement_with_exact")]) + [""]


def diffusion_section(d: dict) -> list[str]:
    dev = d["args"].get("device", "cpu")
    lines = [f"## Diffusion cost vs number of regions N, {dev} (`bench_diffusion.py`)", "",
             f"Readout weights w(t) = exp(-tL)1/N for {len(d['t_values'])} values of t, batch of {d['args']['batch']} images; "
             "eigh decomposes once for all t; `chebyshev` runs one recurrence per t, `chebyshev_all_t` one recurrence shared by "
             "every t (the Chebyshev vectors do not depend on t; what `diffusion_weights` does); scipy's `expm_multiply` (the "
             "reference) runs once per t and per image. Error is relative to eigh.", ""]
    return lines + _table(d["rows"], [("N", "N"), ("method", "method"), ("s / image", "seconds_per_image"),
                                      ("speedup vs scipy", "speedup_vs_scipy"), ("graph s / image", "graph_seconds_per_image"), ("max rel. error", "max_rel_error_vs_eigh"),
                                      ("peak RSS MB", "peak_rss_mb"), ("extra peak of the method MB", "method_extra_peak_mb")]) + [""]


def _pm(r: dict, key: str) -> str:
    """'mean ± sem' of a pooled pixel number, '' where the row has none."""
    if key not in r:
        return ""
    return f"{r[key]:.3f} ± {r[key + '_sem']:.3f}" if key + "_sem" in r else f"{r[key]:.3f}"


def t_sweep_section(d: dict) -> list[str]:
    rows = [dict(r, acc=f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}",
                 pds=_pm(r, "pixel_deletion_shapley"), pdt=_pm(r, "pixel_deletion_token"), pis=_pm(r, "pixel_insertion_shapley"),
                 pdd=_pm(r, "pixel_deletion_token_minus_shapley"))
            for r in d["rows"]]
    pixel = [r for r in d["rows"] if "pixel_deletion_shapley" in r]
    kind = d["args"].get("data_kind", "elpv")
    name = {"elpv": "ELPV", "fashion-mnist": "Fashion-MNIST"}.get(kind, kind)
    cap = d["args"].get("max_per_class")
    plot = Path(d["args"]["out"]).with_suffix(".png").name
    lines = [f"## Diffusion time t and graph bandwidths on {name} (`bench_t_sweep.py`)", "",
             f"Accuracy: mean ± std over {len(d['args']['seeds'])} stratified 75/25 splits of {rows[0]['n_images']:,} real images"
             + (f" (at most {cap} per class{' and split' if kind == 'fashion-mnist' else ''})" if cap else "")
             + " (λ by exact LOO on each training split). "
             "Concentration: share of the total |contribution| to the predicted logit held by the top-10 training images. "
             "Deletion AUC: logit while removing regions in order of their exact contribution, pooled over the images as "
             "sum(AUC - prior) / sum(logit - prior) (1 = full logit throughout, 0 = prior); lower is a sharper region "
             "attribution; random order for reference. "
             f"Plot: `benchmarks/results/{plot}`."
             + (f" Pixel protocol (as `evaluate --what pixel-deletion`; "
                f"{', '.join(sorted({r['backbone'] for r in pixel}))}): on {d['args'].get('pixel_images')} test images of the "
                "first split, each row's whole model (backbone, its graph, diffusion and head) re-run while the backbone's "
                f"cells are removed ({pixel[0].get('pixel_removal', 'blur')}; deletion) or kept with the rest removed "
                "(insertion) in the order of its Shapley map (explain's default) or its exact token split; pooled AUC ± "
                "bootstrap s.e. (image = 1, every cell removed = 0; "
                "lower deletion, higher insertion = more faithful to the pixels; random order is about 0.5); images whose "
                "logit removing every cell does not lower are left out (the counted column)." if pixel else ""), ""]
    cols = [("backbone", "backbone"), ("sigma_space", "sigma_space"), ("sigma_feat", "sigma_feat"), ("t", "t"), ("accuracy", "acc"),
            ("λ (median)", "lam_median"), ("top-10 concentration", "top10_concentration"),
            ("deletion AUC", "deletion_auc_norm"), ("deletion AUC, random order", "deletion_auc_norm_random")]
    if pixel:
        cols += [("pixel images counted", "pixel_counted"), ("pixel deletion, Shapley map", "pds"), ("pixel deletion, token map", "pdt"),
                 ("token − Shapley (paired)", "pdd"), ("pixel insertion, Shapley map", "pis")]
    return lines + _table(rows, cols) + [""]


def share_section(d: dict) -> list[str]:
    lines = ["## Where the per-image time goes (`bench_pipeline_share.py`)", "",
             f"CPU, {d['threads']} threads, real ELPV images at 224 px, batches of {d['args']['batch']}; "
             f"attribution against {d['args']['n_train']} training images, all classes.", ""]
    return lines + _table(d["rows"], [("backbone", "backbone"), ("N", "N"), ("D", "D"), ("load+preprocess ms", "ms_per_image_load_preprocess"),
                                      ("backbone ms", "ms_per_image_backbone"), ("graph+diffusion+readout ms", "ms_per_image_graph_diffusion_readout"),
                                      ("head+attribution ms", "ms_per_image_head_and_attribution"), ("post-backbone share", "post_backbone_share")]) + [""]


def variants_section(d: dict) -> list[str]:
    r = d["results"]
    name = {"elpv": "ELPV", "fashion-mnist": "Fashion-MNIST"}.get(d.get("data_kind", "elpv"), d.get("data_kind"))
    lines = [f"## The seeds' variants on {name} (`bench_variants.py`)", "",
             f"{d['backbone']}, {d['n_images']} images, seeds {d['seeds']} (mean ± std over stratified 75/25 splits).", "",
             "| quantity | value |", "|---|---|"]
    for k, v in r.items():
        lines.append(f"| {k} | {v['mean']:.4f} ± {v['std']:.4f} |")
    return lines + [""]


def gram_section(name: str, d: dict) -> list[str]:
    lines = [f"## Gram accumulation throughput, {name} (`bench_gram.py`)", "",
             "Streamed G^T A G + G^T A Y against the same device's measured matmul peak (large square matmul, same dtype, same run).", ""]
    return lines + _table(d["rows"], [("device", "device_name"), ("dtype", "dtype"), ("n", "n"), ("D", "d"), ("C", "c"),
                                      ("Gram GFLOP/s", "gram_gflops"), ("matmul peak GFLOP/s", "matmul_peak_gflops"),
                                      ("fraction of peak", "fraction_of_peak")]) + [""]


def explanations_section(d: dict) -> list[str]:
    """Training-image explanations: carrot's three exact views and the peers' libraries, mean +- std over seeds."""
    import numpy as np

    meta = d["meta"]
    seeds = sorted({r["seed"] for r in d["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in d["rows"]))
    keys = ["lds", "top1_share", "top10_share", "abs_sum_over_sum", "flip_top1", "flip_top5", "flip_top10", "flip_top50",
            "drop_top10", "drop_top50", "seconds_per_image"]

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return ""
        return f"{np.mean(vals):.3g}" + (f" ± {np.std(vals, ddof=1):.2g}" if len(vals) > 1 else "")

    a = meta["args"]
    lines = [f"## Training-image explanations: {meta['data']}, {meta['backbone']} (n = {meta['n_train']}, λ = {meta['lam']:g})", "",
             f"`benchmarks/bench_explanations.py`; seeds {seeds}; {a['n_test']} test images, LDS over {a['subsets']} random "
             f"half subsets (each retrained), top-K removal retrained for {a['n_flip']} test images. carrot's rows explain "
             "its ridge head (output f_c); the peers' rows explain a softmax regression on the same standardised "
             "embeddings through their own libraries (traker, dattri, Captum; output: TRAK's margin), each its own "
             "model. Drops are in each model's own output units; flip rates and LDS compare across rows.", "",
             "| method | library | LDS | top-1 share | top-10 share | sum abs / abs sum | flip K=1 | K=5 | K=10 | K=50 | "
             "drop K=10 | drop K=50 | s / image |", "|" + "---|" * 13]
    for m in methods:
        rows = [r for r in d["rows"] if r["method"] == m]
        lines.append(f"| {m} | {rows[0]['library']} | " + " | ".join(ms([r.get(k) for r in rows]) for k in keys) + " |")
    labels = d.get("label_review", [])
    if labels:
        lines += ["", "Label review (the score ordering the index page's label-review list): 10% of the training labels "
                  "flipped at random per seed; ROC-AUC of each score at finding them, mean ± std over seeds.", "",
                  "| score | library | ROC-AUC | seconds |", "|---|---|---|---|"]
        for m in dict.fromkeys(r["method"] for r in labels):
            rs = [r for r in labels if r["method"] == m]
            lines.append(f"| {m} | {rs[0]['library']} | {ms([r['roc_auc'] for r in rs])} | {ms([r['seconds'] for r in rs])} |")
    cert = [r for r in d["rows"] if r.get("certificate_n")]
    if cert:
        lines += ["", "Counterfactual certificates (carrot, up to 50 removals): "
                  + "; ".join(f"seed {r['seed']}: {r['certificate_found']} of {r['certificate_n']} predictions change, "
                              f"median {r['certificate_median']:g} images, {r['certificate_seconds'] * 1e3:.0f} ms per image"
                              for r in cert) + "."]
    return lines + [""]


PIXEL_MAPS = {
    "carrot_shapley": "**carrot Shapley map** (`explain` default)",
    "carrot_split": "carrot pixel split (`--pixel-map split`, blurred end)",
    "carrot_occlusion": "carrot occlusion map (exact per cell; `explain --occlusion`)",
    "carrot_token": "carrot token map (exact token split)",
    "random": "random cell order",
    "captum_ig_blur": "Captum `IntegratedGradients`, blurred baseline",
    "captum_ig_mean": "Captum `IntegratedGradients`, mean-colour baseline",
    "gradcam": "pytorch-grad-cam `GradCAM`",
}
REMOVAL_WORDS = {"blur": "blurred", "mean": "mean colour", "inpaint": "inpainted", "drop": "tokens dropped"}


def pixel_map_name(m: str) -> str:
    if m.startswith("captum_ablation_"):
        return f"Captum `FeatureAblation` per cell, {REMOVAL_WORDS[m.removeprefix('captum_ablation_')]}"
    if m.startswith("carrot_shapley_"):
        return f"carrot Shapley map, {m.removeprefix('carrot_shapley_')}"
    return PIXEL_MAPS.get(m, m)


def pixels_section(d: dict) -> list[str]:
    """benchmarks/bench_pixels.py: region maps under the pixel deletion / insertion protocol, every removal."""
    rem = d["removals"]
    de = d["default"]

    def pm(r, k):
        return f"{r[k]:.3f} ± {r[k + '_sem']:.3f}"

    lines = [f"## Region maps in pixel space: {d['data']}, {d['backbone']} ({d['grid'][0]}x{d['grid'][1]} cells, "
             f"{d['n_test']} images)", "",
             f"`benchmarks/bench_pixels.py`, {d['n_test']} test images of the run, seed {d['seed']}, {d['precision']}, on "
             f"{d['device']} (torch {d['torch']}, Captum {d['captum']}, pytorch-grad-cam {d['grad_cam']}). carrot's default "
             f"map: Shapley, cells removed by {de['removal']}, blocks of {de['block']}x{de['block']} cells, "
             f"{de['permutations']} orders. Every map is scored under every removal ("
             + ", ".join(f"{r}: {REMOVAL_WORDS[r]}" for r in rem) + "): cells removed (deletion) or kept with the rest "
             f"removed (insertion) in map order over {d['steps']} steps, the whole model re-run at each. First table: the "
             "raw area under the predicted logit's deletion curve (mean ± s.e. over all images, lower is better) and, "
             "under it, the paired per-image difference from carrot's default (> 0: the default deletes better) with the "
             "images on which the map deletes better than the default. Second table: the scaled AUC (1 at the image, "
             "0 with every cell removed; pooled over the images weighted by that span, bootstrap s.e.).", "",
             "| map | seconds per image | " + " | ".join(f"raw deletion, {REMOVAL_WORDS[r]}" for r in rem) + " |",
             "|---|---|" + "---|" * len(rem)]
    for r in d["rows"]:
        cells = []
        for x in rem:
            c = pm(r, f"{x}_raw_deletion")
            if f"{x}_minus_default" in r:
                c += (f"<br>{r[f'{x}_minus_default']:+.3f} ± {r[f'{x}_minus_default_sem']:.3f}, "
                      f"better on {r[f'{x}_lower_than_default']}/{d['n_test']}")
            cells.append(c)
        lines.append(f"| {pixel_map_name(r['map'])} | {r['seconds_per_image']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "| map | " + " | ".join(f"deletion / insertion, {REMOVAL_WORDS[r]}" for r in rem) + " |",
              "|---|" + "---|" * len(rem)]
    for r in d["rows"]:
        lines.append(f"| {pixel_map_name(r['map'])} | " + " | ".join(
            f"{pm(r, f'{x}_deletion')} / {pm(r, f'{x}_insertion')}" for x in rem) + " |")
    return lines + [""]


def pixel_cost_section(d: dict) -> list[str]:
    """benchmarks/bench_pixel_cost.py: seconds per image of each pixel map on a device."""
    rows = d["rows"]
    names = {"shapley": "Shapley map (default)", "split": "path-integrated split (`--pixel-map split`)",
             "occlusion": "cell occlusion (`--occlusion`)"}
    lines = [f"## Cost of the pixel maps on {rows[0]['device']} ({rows[0]['device_name']})", "",
             "`benchmarks/bench_pixel_cost.py`: seconds per image of each map, the whole model re-run (backbone without "
             "pretrained weights: the cost does not depend on them), mean over "
             f"{rows[0]['images']} images after a warm-up image. Passes: forward passes of the whole model (the split: "
             "forward + backward at each quadrature node).", "",
             "| backbone | precision | input | cells | map | removal | passes | seconds per image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r.get('precision', 'float32')} | {r['input'][1]}x{r['input'][2]} | "
                     f"{r['grid'][0]}x{r['grid'][1]} | {names.get(r['map'], r['map'])}"
                     + (f", blocks of {r['block']}x{r['block']}" if r.get("block", 1) and r.get("block", 1) > 1 else "")
                     + f" | {r.get('removal', 'blur')} | {r['passes']} | "
                     f"{r['seconds_per_image']:.3g} |")
    return lines + [""]


HEAD_NAMES = {
    "carrot_linear": "carrot linear ridge (lambda by exact LOO)",
    "carrot_auto": "**carrot `head.kind: auto`** (linear or RBF kernel, by exact LOO)",
    "carrot_kernel_rbf": "carrot kernel ridge, RBF ((gamma, lambda) by exact LOO)",
    "carrot_kernel_laplacian": "carrot kernel ridge, Laplacian",
    "carrot_kernel_poly": "carrot kernel ridge, polynomial (degree 3)",
    "carrot_kernel_rbf_nystroem_256": "carrot kernel ridge, RBF, Nyström kernel of m = 256 landmarks (the large-n path)",
    "carrot_kernel_rbf_nystroem_1024": "carrot kernel ridge, RBF, Nyström kernel of m = 1024 landmarks (the large-n path)",
    "sklearn_logreg_cv": "scikit-learn `LogisticRegressionCV` (standardised; C by 5-fold CV)",
    "sklearn_knn_1": "scikit-learn `KNeighborsClassifier` (cosine, k = 1)",
    "sklearn_knn_cv": "scikit-learn `KNeighborsClassifier` (cosine, distance-weighted; k by 5-fold CV)",
    "carrot_tokenmap_nystroem_1024": "carrot linear ridge on a Nyström token map (m = 1024; region split exact)",
    "carrot_tokenmap_rff_1024": "carrot linear ridge on random Fourier token features (m = 1024; region split exact)",
    "carrot_auto_embedding": "**carrot's defaults: `backbone.blocks: auto`, `global_tokens: auto`, `head.kind: auto`** "
                             "(the candidate embedding whose best head has the highest exact LOO accuracy)",
}


def embedding_name(d: dict) -> str:
    """What the run's embedding reads: the diffused patch readout, with the class token, of the last k blocks."""
    b = d.get("embedding", {})
    if b.get("blocks") == "auto":
        return "auto: chosen on each split by exact LOO"
    parts = ["diffused patch readout"]
    if b.get("blocks", 1) > 1:
        parts.append(f"last {b['blocks']} blocks")
    if b.get("global_tokens"):
        parts.append("+ class token")
    return ", ".join(parts)


def heads_section(d: dict) -> list[str]:
    """benchmarks/bench_heads.py: heads on the same embeddings, mean +- std over re-splits."""
    import numpy as np

    def ms(vals, fmt=".4f"):
        vals = [v for v in vals if v is not None]
        return f"{np.mean(vals):{fmt}} ± {np.std(vals):{fmt}}" if vals else ""

    lines = [f"## Heads on the same embeddings: {d['data']}, {d['backbone']} ({embedding_name(d)})", "",
             f"`benchmarks/bench_heads.py` on {d['device']} (scikit-learn {d['sklearn']}): the run's {d['n']} images "
             f"({d['classes']} classes, {'up to ' if d.get('embedding', {}).get('blocks') == 'auto' else ''}{d['dim']}-d "
             "embeddings) pooled and split again, stratified, "
             f"{d['test_fraction']:.0%} test, seeds {d['seeds']}; mean ± std over the seeds. carrot's heads choose their "
             "settings by exact leave-one-out on the training part, the peers by 5-fold cross-validation through "
             "scikit-learn's own estimators.", "",
             "| head | test accuracy | exact LOO accuracy (train) | fit seconds | chosen (first seed) |", "|---|---|---|---|---|"]
    heads = list(dict.fromkeys(r["head"] for r in d["rows"]))
    for h in heads:
        rs = [r for r in d["rows"] if r["head"] == h]
        name = HEAD_NAMES.get(h, f"carrot `head.kind: auto` on the {h.split('@')[1]}" if h.startswith("carrot_auto@") else h)
        lines.append(f"| {name} | {ms([r['test_accuracy'] for r in rs])} | "
                     f"{ms([r['loo_accuracy'] for r in rs])} | {ms([r['fit_seconds'] for r in rs], '.2f')} | {rs[0]['chosen']} |")
    if any(h.startswith("carrot_tokenmap") for h in heads):
        lines += ["", "Token-map rows: the map is fitted per split on the training part's token sample; fit seconds are "
                  "the map's fit and the ridge fit; mapping every image's tokens took "
                  + ", ".join(f"{ms([r['map_seconds_all_images'] for r in d['rows'] if r['head'] == h], '.0f')} s ({h.split('_')[2]})"
                              for h in heads if h.startswith("carrot_tokenmap")) + " in all (every image, once per split)."]
    return lines + [""]


EMBEDDING_COLUMNS = (("carrot_linear", "linear ridge"), ("carrot_kernel_rbf", "kernel RBF"), ("carrot_auto", "auto"),
                     ("sklearn_logreg_cv", "LogisticRegressionCV"), ("sklearn_knn_cv", "kNN (CV)"))


def embeddings_section(files: list[dict]) -> list[str]:
    """One line per (data, backbone, embedding) of the heads files: the same heads as the embedding grows."""
    import numpy as np

    lines = ["## Heads by embedding: patch readout, + class token, + last 4 blocks (`bench_heads.py`)", "",
             "Test accuracy, mean over the same 3 re-splits of each run's images, from the sections above; a blank: "
             "not run on that embedding. The class token and the last k blocks are `--global-tokens` and `--blocks k` "
             "(ViTs only); the `auto` embedding (the default, `backbone.blocks` and `global_tokens` auto; "
             "`bench_heads.py --auto-embedding`) is chosen on each split's training part by exact LOO among the last "
             "block, the last block + class token and the last 4 blocks + class token, all read from one extraction, "
             "and its `auto` column is that choice's test accuracy.", "",
             "| data, backbone | embedding | dim | " + " | ".join(n for _, n in EMBEDDING_COLUMNS) + " |",
             "|---" * (3 + len(EMBEDDING_COLUMNS)) + "|"]
    for d in sorted(files, key=lambda d: (d["data"], d["backbone"], d["dim"])):
        cells = []
        for head, _ in EMBEDDING_COLUMNS:
            auto = head == "carrot_auto" and d.get("embedding", {}).get("blocks") == "auto"
            vals = [r["test_accuracy"] for r in d["rows"] if r["head"] == ("carrot_auto_embedding" if auto else head)]
            cells.append(f"{np.mean(vals):.3f}" if vals else "")
        lines.append(f"| {d['data']}, {d['backbone']} | {embedding_name(d)} | {d['dim']} | " + " | ".join(cells) + " |")
    return lines + [""]


def head_search_section(d: dict) -> list[str]:
    """benchmarks/bench_head_search.py: the auto head's search against the ridge head's fit and the full search."""
    lines = [f"## The `auto` head's search with many classes, {d['device']}, {d['threads']} threads (`bench_head_search.py`)", "",
             "Synthetic 384-d class mixtures (seed "
             f"{d['seed']}), one test image per class. `auto (new)`: a kernel search costing more than "
             f"{d['search_flops']:.0e} flops is first decided on a class-stratified subsample of {d['subsample']} images "
             "(the loser skipped, the kernel head as winner fitted on the whole with the subsample's gamma and three "
             "lambdas, one Cholesky each); `auto before`: every head searched in full. Seconds are wall time in one "
             "process; the ridge head's fit (lambda by exact LOO), timed before and after, is the reference. LOO: the "
             "kept head's exact LOO accuracy on the whole training set.", ""]
    rows = [{**r, "gamma": "—" if r["gamma"] is None else f"{r['gamma']:.4g}"} for r in d["rows"]]
    return lines + _table(rows, [("problem", "problem"), ("n", "n"), ("classes", "classes"), ("fit", "what"),
                                 ("seconds", "seconds"), ("x ridge", "ratio_to_ridge"), ("head kept", "head"),
                                 ("gamma", "gamma"), ("lambda", "lam"), ("LOO acc", "loo_accuracy"),
                                 ("test acc", "test_accuracy")]) + [""]


def backbone_speed_section(d: dict) -> list[str]:
    """benchmarks/bench_backbone.py: extraction throughput, float32 against bfloat16 autocast."""
    lines = [f"## Backbone throughput, float32 against bfloat16 autocast, {d['device']}, {d['threads']} threads "
             "(`bench_backbone.py`)", "",
             "The token extraction as `fit` runs it (decode, timm's transform, the forward pass, the float16 cache write) "
             f"on the first ELPV training images, batch {d['batch']}, torch {d['torch']}; float32 and bfloat16 "
             "alternate in the same process, the best round counts. `backbone.precision: auto` picks bfloat16 for a ViT on "
             "a CPU with AVX512-BF16 or AMX (ConvNets keep float32). Token error: ||bf16 - fp32|| / ||fp32|| over all cached tokens.", ""]
    return lines + _table(d["rows"], [("backbone", "backbone"), ("precision", "precision"), ("images", "images"),
                                      ("img/s", "images_per_second"), ("speedup", "speedup"),
                                      ("token rel. error", "token_rel_error_vs_float32")]) + [""]


def pixel_curve_section(d: dict) -> list[str]:
    """benchmarks/bench_pixel_curve.py: the Shapley map's faithfulness against its seconds, by (removal, block, orders),
    scored under every removal."""
    if "removals" not in d:
        return _pixel_curve_section_blur_only(d)
    rem, ref = d["removals"], d["reference"]
    emb = f", embedding: {d['embedding']}" if d.get("embedding") else ""
    lines = [f"## The Shapley map's faithfulness against seconds: {d['data']}, {d['backbone']}{emb}, {d['grid'][0]}x{d['grid'][1]} "
             f"cells, {d['precision']} (`bench_pixel_curve.py`)", "",
             f"{d['rows'][0]['images']} test images (none left out), {d['steps']} steps, {d['device']}, {d['threads']} "
             "threads. A setting removal:bKk plays blocks of b x b cells with K orders in the game of that removal "
             f"({ref}: explain's default before issue 26; drop:b2k4 the default now for a ViT); seconds per map are wall time. Each map is scored under every "
             "removal: the raw area under the logit's deletion curve (mean ± s.e. over the images, lower is more "
             f"faithful), and under it the paired per-image difference from {ref} (± s.e.) with the images on which the "
             "setting deletes better.", "",
             "| setting | players | runs | seconds per map | " + " | ".join(f"raw deletion, {REMOVAL_WORDS[r]}" for r in rem)
             + " |", "|---|---|---|---|" + "---|" * len(rem)]
    for r in d["rows"]:
        cells = []
        for x in rem:
            c = f"{r[f'{x}_raw_deletion']:.3f} ± {r[f'{x}_raw_deletion_sem']:.3f}"
            if f"{x}_raw_deletion_minus_reference" in r:
                c += (f"<br>{r[f'{x}_raw_deletion_minus_reference']:+.3f} ± {r[f'{x}_raw_deletion_minus_reference_sem']:.3f}, "
                      f"{r[f'{x}_lower_than_reference']}/{r['images']}")
            cells.append(c)
        lines.append(f"| {r['setting']} | {r['players'] if r['players'] is not None else '—'} | {r.get('passes', '—')} | "
                     f"{r['seconds_per_map']:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def _pixel_curve_section_blur_only(d: dict) -> list[str]:
    """bench_pixel_curve.py files from before the removals (every map built on and scored under blurring)."""
    lines = [f"## The Shapley map's faithfulness against seconds, blurring only: {d['data']}, {d['backbone']}, "
             f"{d['grid'][0]}x{d['grid'][1]} cells, {d['precision']} (`bench_pixel_curve.py`, before the removals)", "",
             f"{d['rows'][0]['images']} deletable test images, {d['steps']} steps, {d['device']}, {d['threads']} threads. A "
             "setting bKk plays blocks of b x b cells with K orders in the blurring game (b1k4: explain's default then); "
             "seconds per map are wall time; deletion / insertion: pooled AUC (span-weighted, ± bootstrap s.e.; lower / "
             "higher is more faithful), cells blurred; paired: the mean per-image deletion AUC minus b1k4's (± s.e.), and "
             "on how many images the setting deletes better.", ""]
    rows = [{**r, "deletion": f"{r['deletion']:.3f} ± {r['deletion_sem']:.3f}",
             "insertion": f"{r['insertion']:.3f} ± {r['insertion_sem']:.3f}",
             "paired": f"{r['deletion_minus_reference']:+.3f} ± {r['deletion_minus_reference_sem']:.3f}"
             if r["setting"] != "b1k4" else "—", "passes": r.get("passes", 0),
             "players": r["players"] if r["players"] is not None else "—",
             "better_than_reference": r["better_than_reference"] if r["setting"] != "b1k4" else "—"} for r in d["rows"]]
    return lines + _table(rows, [("setting", "setting"), ("players", "players"), ("passes", "passes"),
                                 ("seconds per map", "seconds_per_map"), ("deletion AUC", "deletion"),
                                 ("insertion AUC", "insertion"), ("paired deletion vs b1k4", "paired"),
                                 ("better than b1k4", "better_than_reference")]) + [""]


def explain_cost_section(d: dict) -> list[str]:
    """benchmarks/bench_explain_cost.py: seconds per explanation from a fresh process, old and new default, peers."""
    n = len(d["images"])
    lines = [f"## Seconds per explanation, {d['data']} x {d['backbone']} on the CPU (`bench_explain_cost.py`)", "",
             f"Machine: {d['device']}, {d['cores']} cores, torch {d['torch']}, backbone precision {d['precision']}. carrot: "
             f"`carrot-run explain` as a new process on 1 and on {n} test images (the same images for every row): what "
             "one explanation took inside the command by its own clock (`seconds` in explanation.json: training images "
             "for and against, certificate, token map, pixel map, page; mean and max over the images), the one-image "
             "command's wall time (imports, run and backbone loading included) and the wall seconds each further image "
             "adds ((T_N - T_1) / (N - 1), noisier); `old-default` is the pixel map before issue 26 (Shapley over single "
             "cells, blurred, 4 orders). "
             f"Peers: their map alone on the same images in one process (Captum {d['captum']}, IG with "
             f"{d['ig_steps']} steps; pytorch-grad-cam {d['grad_cam']}), measured in the same run. Faithfulness of each "
             "map: the \"Region maps in pixel space\" tables.", "",
             "| setting | flags | one explanation s (mean, max) | of which pixel map s | rest: token map, training images, certificate, page s | one-image command s (fresh process) | each further image s (wall) | peer map alone s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if "explanation_s" in r:
            rest = ", ".join(_fmt(r.get(f"{k}_s", 0.0)) for k in ("token_map", "training_images", "certificate", "page"))
            lines.append(f"| {r['setting']} | {('`' + r['flags'] + '`') if r.get('flags') else '(defaults)'} | "
                         f"{_fmt(r['explanation_s'])}, {_fmt(r['explanation_max_s'])} | {_fmt(r.get('pixel_map_s') or 0.0)} | "
                         f"{rest} | {_fmt(r['one_image_command_s'])} | {_fmt(r['per_further_image_s'])} | |")
        else:
            lines.append(f"| {r['setting']} | | | | | | | {_fmt(r['map_alone_s'])} |")
    return lines + [""]


def studio_section(d: dict) -> list[str]:
    """benchmarks/bench_studio.py: an exact what-if answer as the studio serves it, against a refit in the same run."""
    a = d["args"]
    lines = ["## Studio: seconds of an exact what-if (`bench_studio.py`)", "",
             f"Machine: {d['machine']}, {d['threads']} torch threads, torch {d['torch']}. A run written from synthetic "
             f"Gaussian-class embeddings (D = {a['d']}, C = {a['classes']}, 5% wrong labels, m = n / 5 test images); "
             "through the studio's HTTP API (Starlette TestClient, JSON included): a basket of k edits (a third each removed, "
             "relabelled, reweighted) answered with the whole test set's new predictions, the per-class change and the new "
             "label review. `cold`: each image's hat column computed for the first time; `warm`: the same images, one "
             "action changed. `refit` is the reference measured in the same run: a refit from scratch on the edited data "
             "with its exact LOO (what `verify` runs); `max diff` is the largest difference of the test logits (and of the "
             "LOO logits) between the two. Targets (issue 27): under 0.3 s for the demo run, under 2 s at n = 10,000.", "",
             "| n | head | k | open run s | what-if cold s | what-if warm s | refit s | refit / warm | max diff logits | max diff LOO | predictions changed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['n']} | {r['head']} | {r['k']} | {_fmt(r['open_s'])} | {_fmt(r['whatif_cold_s'])} | "
                     f"{_fmt(r['whatif_warm_s'])} | {_fmt(r['refit_s'])} | {_fmt(r['speedup_vs_refit_warm'])} | "
                     f"{r['max_abs_logit_diff']:.1e} | {r['max_abs_loo_diff']:.1e} | {r['changed']} |")
    sim = [r for r in d["rows"] if "similar_s" in r]
    if sim:
        lines += ["", "Similar images (one query, the head's own similarity, exact FAISS search below 50,000 images): " +
                  "; ".join(f"n = {r['n']} {r['head']}: first {_fmt(r['similar_first_s'])} s (index built), then "
                            f"{_fmt(r['similar_s'])} s" for r in sim) + "."]
    rec = d.get("recall")
    if rec:
        lines += ["", f"Similar-images index at n = {rec['n']:,} (D = {rec['d']}, {rec['queries']} queries, top 10; "
                  "candidates re-scored exactly in float64):", "",
                  "| head (similarity) | flat build s | flat ms / query | ivf build s | ivf ms / query | ivf recall@10 vs flat |",
                  "|---|---|---|---|---|---|"]
        for h, words in (("ridge", "ridge (centred inner product)"), ("kernel", "kernel (RBF kernel)")):
            if f"{h}_flat_build_s" in rec:
                lines.append(f"| {words} | {_fmt(rec[f'{h}_flat_build_s'])} | {_fmt(rec[f'{h}_flat_query_ms'])} | "
                             f"{_fmt(rec[f'{h}_ivf_build_s'])} | {_fmt(rec[f'{h}_ivf_query_ms'])} | "
                             f"{_fmt(rec[f'{h}_ivf_recall_at_10'])} |")
    return lines + [""]


def keeps_section(keeps: dict) -> list[str]:
    cols = list(next(iter(keeps.values())))
    lines = ["## What each head keeps exact", "", "| head | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    return lines + [f"| {h} | " + " | ".join(v[c] for c in cols) + " |" for h, v in keeps.items()] + [""]


def main() -> None:
    out = ["# Benchmarks", "", "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand.", ""]
    for path in sorted(RESULTS.glob("engine*.json")):  # engine.json (CPU), engine_<device>.json
        out += engine_section(json.loads(path.read_text()))
    for path in sorted(RESULTS.glob("elpv_attribution.json")) + sorted(RESULTS.glob("attribution_*.json")):
        out += elpv_section(json.loads(path.read_text()))
    for name, section in (("t_sweep", t_sweep_section), ("diffusion", diffusion_section), ("scale", scale_section),
                          ("kernel_scale", kernel_scale_section), ("head_search", head_search_section),
                          ("backbone_speed", backbone_speed_section),
                          ("pipeline_share", share_section), ("variants", variants_section)):
        for path in sorted(RESULTS.glob(f"{name}.json")) + sorted(RESULTS.glob(f"{name}_*.json")):
            out += section(json.loads(path.read_text()))
    for path in sorted(RESULTS.glob("explanations*.json")):
        out += explanations_section(json.loads(path.read_text()))
    for path in sorted(RESULTS.glob("pixels_*.json")):
        out += pixels_section(json.loads(path.read_text()))
    for path in sorted(RESULTS.glob("pixel_curve_*.json")):
        out += pixel_curve_section(json.loads(path.read_text()))
    for path in sorted(RESULTS.glob("explain_cost_*.json")):
        out += explain_cost_section(json.loads(path.read_text()))
    for path in sorted(RESULTS.glob("pixel_cost*.json")):
        out += pixel_cost_section(json.loads(path.read_text()))
    head_files = sorted(RESULTS.glob("heads_*.json"))
    for path in head_files:
        out += heads_section(json.loads(path.read_text()))
    if head_files:
        out += embeddings_section([json.loads(p.read_text()) for p in head_files])
        from bench_heads import keeps  # what each head keeps is the registry's, not a measurement

        out += keeps_section(keeps())
    for path in sorted(RESULTS.glob("studio*.json")):
        out += studio_section(json.loads(path.read_text()))
    for path in sorted(RESULTS.glob("gram_*.json")):
        out += gram_section(path.stem.split("_", 1)[1], json.loads(path.read_text()))
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(out))
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
