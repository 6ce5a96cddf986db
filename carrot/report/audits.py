"""Index-page sections for a run's audits (the registry in :mod:`carrot.audit.registry` names them): the JSON
written by ``carrot-run evaluate``, ``tracin``, ``reweight``, ``debug``, ``bench`` and ``compare`` rendered
as tables (and the RRO curves as an inline PNG)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable


def figure_uri(fig) -> str:
    """A matplotlib figure (legend, tight layout) as an inline PNG data URI; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()





def _f(v: Any, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt) if isinstance(v, (int, float)) else html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], fmt: str = ".3f") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(r[0]))}</td>" if i == 0 else f"<td>{_f(v, fmt)}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _accuracy(acc: dict) -> str:
    how = (f"{acc['shots']}-shot training subsets" if acc.get("shots") else "the full training split") + (
        ", re-split per seed" if acc.get("resplit") else "")
    per = [[c, v["mean"], v["std"]] for c, v in acc["per_class"].items()]
    if len(acc["seeds"]) == 1:
        return (f"<h3>Accuracy over seeds</h3><p>one fit on {how} (nothing is drawn at random): test accuracy "
                f"<b>{acc['mean']:.4f}</b></p>" + _table(["class", "accuracy"], [r[:2] for r in per]))
    return (f"<h3>Accuracy over seeds</h3><p>{len(acc['seeds'])} seeds on {how}: test accuracy "
            f"<b>{acc['mean']:.4f} &plusmn; {acc['std']:.4f}</b> (std, ddof = 1)</p>"
            + _table(["class", "mean accuracy", "std"], per))


def _mislabel(m: dict) -> str:
    res = m["results"]
    fr = sorted({k for v in res.values() for k in v["found_in_top"]}, key=float)
    rows = [[name, v["roc_auc"], *[v["found_in_top"].get(k) for k in fr]]
            for name, v in sorted(res.items(), key=lambda kv: -kv[1]["roc_auc"])]
    return (f"<h3>Mislabel detection</h3><p class='muted'>{m['flip_fraction']:.0%} of the training labels flipped at "
            "random; each score ranks the training images (higher = more suspicious)</p>"
            + _table(["score", "ROC-AUC", *[f"flipped found in top {float(k):.0%}" for k in fr]], rows))


def _faithfulness(fa: dict) -> str:
    rows = []
    for name, by_k in fa.items():
        for k, modes in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            rows.append([f"{name}, K = {k}", *[modes.get(m, {}).get("logit_drop") for m in
                                              ("remove_top", "remove_random", "remove_bottom", "keep_top", "keep_random")],
                         modes.get("remove_top", {}).get("flip_rate")])
    return ("<h3>Faithfulness</h3><p class='muted'>mean drop of the predicted logit after an exact refit without "
            "(remove) or with only (keep) K training images chosen by each estimator</p>"
            + _table(["estimator", "remove top K", "remove random K", "remove bottom K", "keep top K", "keep random K",
                      "flip rate, remove top K"], rows))


def _agreement(ev: dict) -> str:
    names = sorted(set(ev.get("lds", {})) | set(ev.get("agreement_with_exact_loo", {})))
    ag = ev.get("agreement_with_exact_loo", {})
    rows = [[n, ev.get("lds", {}).get(n), ag.get(n, {}).get("spearman"), ag.get(n, {}).get("kendall")] for n in names]
    return ("<h3>Linear datamodeling score and agreement with exact leave-one-out</h3>"
            + _table(["estimator", "LDS (Spearman)", "Spearman with exact LOO", "Kendall with exact LOO"], rows))


def tracin_html(t: dict) -> str:
    """The TracIn analysis (RUN/tracin/summary.json)."""
    q = t["self_influence_quantiles"]
    qi = t["influence_quantiles"]
    cmp_ = t["comparison_with_carrot"]
    per = "".join(f"<tr><td style='text-align:left'>{html.escape(c)}</td><td>{v['n']}</td><td>{v['self_influence_mean']:.4g}</td>"
                  f"<td>{v['self_influence_median']:.4g}</td><td>{v['influence_mean']:+.3g}</td></tr>" for c, v in t["per_class"].items())
    flagged = "".join(f"<tr><td style='text-align:left'>{html.escape(f['id'])}</td><td style='text-align:left'>{html.escape(f['label'])}</td>"
                      f"<td>{f['tracin_self_influence']:.4g}</td><td>{f['carrot_loo_loss']:.4g}</td></tr>" for f in t["flagged_for_review"][:20])
    return (
        f"<h2>TracIn analysis</h2><p>{t['n_checkpoints']} checkpoints; self-influence quantiles "
        + ", ".join(f"{k} {v:.4g}" for k, v in q.items()) + "; influence quantiles "
        + ", ".join(f"{k} {v:+.3g}" for k, v in qi.items())
        + f". Spearman with carrot's exact LOO loss {cmp_['spearman_self_influence_vs_exact_loo_loss']:.3f}; "
        f"overlap of the flagged sets {cmp_['flag_overlap_with_exact_loo']:.2f}.</p>"
        f"<table><tr><th>class</th><th>n</th><th>self-infl. mean</th><th>median</th><th>influence mean</th></tr>{per}</table>"
        f"<h3>Highest self-influence (label review)</h3><table><tr><th>id</th><th>label</th><th>TracIn self-influence</th>"
        f"<th>exact LOO loss</th></tr>{flagged}</table>")


def _rro_curve(history: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 2.8), dpi=100)
    for key in ("val_accuracy", "holdout_accuracy", "test_accuracy"):
        if all(key in h for h in history):
            ax.plot(steps, [h[key] for h in history], label=key.replace("_", " "))
    ax.set_xlabel("RRO step")
    ax.set_ylabel("accuracy")
    return figure_uri(fig)


def reweight_html(r: dict) -> str:
    ess = [[c, v] for c, v in r["ess_per_class"].items()]
    return ("<h2>Reweighting (RRO)</h2>"
            f"<p>uniform weights: test accuracy <b>{r['uniform_test_accuracy']:.4f}</b>; reweighted (step {r['best_step']}, "
            f"chosen on the held-out part of the validation split): <b>{r['reweighted_test_accuracy']:.4f}</b>; "
            f"validation share {r['val_fraction']:.0%}</p>"
            f"<img alt='RRO curves' src='{_rro_curve(r['history'])}'>"
            + _table(["class", "effective sample size / class size"], ess))


def debug_html(d: dict) -> str:
    b = d["baseline"]
    rows = [["none (baseline)", b["val_accuracy"], b["test_accuracy"], None]] + [
        [f"{r['k']} most harmful", r["val_accuracy"], r["test_accuracy"], r.get("random_test_accuracy_mean")] for r in d["rows"]]
    verb = "dropped" if not d.get("downweight") else f"down-weighted to {d['downweight']}"
    return (f"<h2>Dataset debugging</h2><p class='muted'>training images most harmful to a {d['val_fraction']:.0%} validation "
            f"split, {verb} (exact, Woodbury)</p>"
            + _table(["images removed", "validation accuracy", "test accuracy", "test accuracy, as many random"], rows, ".4f"))


def t_sweep_html(rows: list[dict]) -> str:
    key = "shapley" if any("pixel_deletion_shapley" in r for r in rows) else "pixel"  # "pixel": files before the Shapley map
    pixels = any(f"pixel_deletion_{key}" in r for r in rows)
    head = ["t", "λ", "LOO accuracy (train)", "test accuracy"]
    if pixels:
        name = "Shapley map" if key == "shapley" else "pixel split"
        head += [f"{name} deletion", f"{name} insertion", "token map deletion", "token map insertion"]
    body = [[r["t"], r["lam"], r.get("loo_accuracy"), r["test_accuracy"]]
            + ([r.get(f"pixel_deletion_{key}"), r.get(f"pixel_insertion_{key}"), r.get("pixel_deletion_token"),
                r.get("pixel_insertion_token")] if pixels else []) for r in rows]
    removal = next((r["pixel_removal"] for r in rows if "pixel_removal" in r), "blur")  # files before removals: blur
    note = (f"<p class='muted'>pixel protocol per t: cells removed ({removal}) / kept in map order, the whole model at "
            "that t re-run; AUC scaled to 1 at the image and 0 with every cell removed (lower deletion, higher insertion: "
            "more faithful to the pixels); the other removals' columns are in t_sweep.json</p>" if pixels else "")
    return "<h2>Diffusion time sweep</h2>" + note + _table(head, body, ".4g")


def compare_html(c: dict) -> str:
    per = [[k, v["a"], v["b"], v["change"]] for k, v in c["per_class"].items()]
    changed = [[Path(x["image"]).name, x["label"], x["a"], x["b"]] for x in c["changed"][:20]]
    return (f"<h2>Comparison with another run</h2><p>A = {html.escape(c['runs']['a'])}, B = {html.escape(c['runs']['b'])}: "
            f"test accuracy A <b>{c['accuracy_a']:.4f}</b>, B <b>{c['accuracy_b']:.4f}</b> on {c['n']} images; B fixes "
            f"{c['fixed_by_b']} and breaks {c['broken_by_b']} predictions (McNemar exact p = {c['mcnemar_exact_p']:.3g})</p>"
            + _table(["class", "accuracy A", "accuracy B", "change"], per)
            + (f"<h3>Changed predictions ({len(c['changed'])}; first 20)</h3>"
               + _table(["image", "label", "A", "B"], changed) if changed else ""))


def _certificates(c: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    ax.bar(range(len(c["histogram"])), [n for _, n in c["histogram"]], label="test predictions")
    ax.set_xticks(range(len(c["histogram"])), [b for b, _ in c["histogram"]], rotation=30, fontsize=7)
    ax.set_xlabel("training images whose removal changes the prediction")
    rows = [[Path(s["image"]).name, s["label"], s["predicted"], s["size"], s["new_class"],
             ", ".join(f"#{t['index']} ({t['label']})" for t in s["training_images"][:8])] for s in c["smallest"]]
    med = "" if c["median_size"] is None else f", median size {c['median_size']:g}"
    return (f"<h3>Counterfactual certificates</h3><p>{c['n']} test predictions: {c['found']} change when at most "
            f"{c['limit']} training images are removed{med} (greedy on exact removal effects, each set checked by a refit; "
            f"{c['seconds_per_image_median'] * 1e3:.0f} ms per image)</p>"
            f"<img alt='certificate sizes' src='{figure_uri(fig)}'>"
            "<p class='muted'>the predictions that rest on the fewest training images (most exposed to a few wrong labels)</p>"
            + _table(["test image", "label", "predicted", "images", "becomes", "training images removed"], rows, ".0f"))


def evaluation_html(ev: dict) -> str:
    """The results of ``carrot-run evaluate`` (evaluation.json)."""
    out = "<h2>Evaluations</h2>"
    out += _accuracy(ev["accuracy"]) if "accuracy" in ev else ""
    out += _mislabel(ev["mislabel"]) if "mislabel" in ev else ""
    out += _faithfulness(ev["faithfulness"]) if "faithfulness" in ev else ""
    out += _agreement(ev) if "lds" in ev or "agreement_with_exact_loo" in ev else ""
    if "deletion" in ev:
        d = ev["deletion"]
        rows = [[f"{kind}, {order}", d[kind + suffix]]
                for kind in ("deletion", "insertion") for order, suffix in (("exact order", ""), ("random order", "_random"))]
        out += (f"<h3>Region deletion and insertion</h3><p class='muted'>{d['n']} test images; regions removed (inserted) "
                "in the order of their exact contribution to the predicted logit, or at random; AUC pooled over the images, "
                "sum(AUC - prior) / sum(logit - prior) (1 = the full logit throughout, 0 = the prior): low deletion and high "
                "insertion AUC mean a sharp region attribution</p>" + _table(["curve", "normalised AUC"], rows))
    if "pixel_deletion" in ev and "scores" not in ev["pixel_deletion"]:  # evaluation.json from before the removals
        p = ev["pixel_deletion"]
        rows = [[m, v["deletion"]["mean"], v["deletion"]["sem"], v["insertion"]["mean"], v["insertion"]["sem"],
                 v["seconds_per_image"]] for m, v in p["maps"].items()]
        out += (f"<h3>Pixel deletion and insertion</h3><p class='muted'>{p['n']} test images, cells blurred (an "
                "evaluation from before the other removals)</p>"
                + _table(["map", "deletion AUC", "s.e.m.", "insertion AUC", "s.e.m.", "seconds per image"], rows))
    elif "pixel_deletion" in ev:
        p = ev["pixel_deletion"]
        names = {"shapley": "Shapley map (the default)", "split": "pixel split (path-integrated gradients)",
                 "pixel": "pixel split (path-integrated gradients)", "occlusion": "occlusion map (exact per cell)",
                 "token": "token map (exact token split)", "random": "random order"}
        rows = [[names.get(m, m) + (f" ({p['removal']})" if m in ("shapley", "occlusion") else ""), r,
                 v["deletion"]["mean"], v["deletion"]["sem"], v["insertion"]["mean"], v["insertion"]["sem"],
                 v["raw_deletion"]["mean"], v["raw_deletion"]["sem"], p["maps"][m]["seconds_per_image"]]
                for r, scores in p["scores"].items() for m, v in scores.items()]
        out += (f"<h3>Pixel deletion and insertion</h3><p class='muted'>{p['n']} test images; the cells of the "
                f"{p['grid'][0]}x{p['grid'][1]} grid removed (deletion) or kept with the rest removed (insertion) in map "
                f"order over {p['steps']} steps, the whole model re-run at each, under each way of removing a cell (blur: "
                "pixels blurred; mean: filled with the image's mean colour; inpaint: filled from the kept pixels around; "
                "drop: tokens dropped, ViTs). Scaled AUC of the "
                "predicted logit (1 at the image, 0 with every cell removed, pooled over images weighted by how much "
                "removal changes each logit, bootstrap s.e.) and raw AUC of the logit (mean over all images): low "
                "deletion and high insertion mean a map faithful to the pixels under that removal (random order: about "
                "0.5 scaled)</p>"
                + _table(["map", "removal", "deletion AUC", "s.e.m.", "insertion AUC", "s.e.m.", "raw deletion AUC",
                          "s.e.m.", "seconds per image"], rows))
    if "certificates" in ev:
        out += _certificates(ev["certificates"])
    if "pointing" in ev:
        p = ev["pointing"]
        out += (f"<h3>Pointing game</h3><p>{p['n']} test images with known parts: token map hit rate <b>{p['hit_rate']:.3f}</b> "
                f"(a random region: {p['random_region_hit_rate']:.3f})"
                + (f"; Shapley pixel map on {p['n_pixel']} of them: <b>{p['pixel_hit_rate']:.3f}</b> "
                   f"(token map on the same images: {p['token_hit_rate_same_images']:.3f})" if "pixel_hit_rate" in p else "")
                + "</p>")
    return out


SECTIONS: dict[str, Callable[[Any], str]] = {  # index.html section of each registered audit (result -> HTML)
    "evaluation": evaluation_html, "tracin": tracin_html, "reweight": reweight_html, "debug": debug_html,
    "t_sweep": t_sweep_html, "compare": compare_html,
}


def json_section(name: str, result: Any) -> str:
    """The plain section of an audit with no section of its own: its result as JSON."""
    import json

    return f"<h2>{html.escape(name)}</h2><pre>{html.escape(json.dumps(result, indent=2))}</pre>"


def audits_html(audits: dict[str, Any]) -> str:
    """Sections, in registry order, for whichever registered audits the run has (name -> result)."""
    from carrot.audit.registry import AUDITS

    return "".join(SECTIONS[a.name](audits[a.name]) if a.name in SECTIONS else json_section(a.name, audits[a.name])
                   for a in AUDITS.values() if audits.get(a.name))
