"""Reports: region heatmap PNGs, per-image explanation pages and a run index page.

Pages are self-contained (images inlined as data URIs, CSS inline, no network) and open offline.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from carrot.io import atomic_path, write_json
from carrot.report.audits import audits_html, figure_uri
from carrot.report.explanation import REMOVAL_MEANING, Explanation, TrainingImage
from carrot.text import shown

PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}  # data text (class names) drawn literally, never as maths

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
.row{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0} figcaption{font-size:12px;color:#444;max-width:220px;word-break:break-all}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:250px;font-size:12px}
.card .row{gap:6px}
.card img{width:110px;height:110px;object-fit:cover;image-rendering:auto}
.big img{width:260px;height:260px;object-fit:contain;background:#f4f4f4}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f6f6f6} .pos{color:#b2182b} .neg{color:#2166ac} .pred{font-weight:bold;background:#fff3c4}
.muted{color:#777;font-size:12px}
"""

# marks the page title so a headless browser can tell that every image decoded
CHECK_JS = """window.addEventListener('load',function(){var bad=0;for(var i=0;i<document.images.length;i++){
var im=document.images[i];if(!(im.complete&&im.naturalWidth>0))bad++;}
document.title+=bad?' [images failed: '+bad+']':' [images ok: '+document.images.length+']';});"""


def data_uri(image, fmt: str = "PNG", max_side: int | None = None) -> str:
    """PIL image -> ``data:`` URI (optionally downscaled so its longer side is ``max_side``)."""
    img = image.convert("RGB")
    if max_side and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def overlay(image, grid_values: np.ndarray, alpha: float = 0.5, vmax: float | None = None):
    """Blend a diverging (blue < 0 < red) map of an (h, w) grid over ``image``; returns a PIL image."""
    from matplotlib import colormaps
    from PIL import Image

    r = np.asarray(grid_values, dtype=np.float64)
    vmax = vmax or float(np.abs(r).max()) or 1.0
    rgba = colormaps["bwr"]((r / vmax + 1) / 2)
    heat = Image.fromarray((rgba[..., :3] * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def heatmap_png(image, contributions: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Side-by-side image and region-contribution overlay with a colour bar, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.asarray(contributions, dtype=np.float64)
    vmax = float(np.abs(r).max()) or 1.0
    img = np.asarray(image.convert("RGB"))
    with plt.rc_context(PLAIN_TEXT):
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), dpi=100)
        _heatmap_axes(fig, axes, img, r, vmax, shown(title) or "region contributions")
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _heatmap_axes(fig, axes, img: np.ndarray, r: np.ndarray, vmax: float, title: str) -> None:
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(img)
    im = axes[1].imshow(r, cmap="bwr", vmin=-vmax, vmax=vmax, alpha=0.55, interpolation="bilinear",
                        extent=(0, img.shape[1], img.shape[0], 0))
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    fig.tight_layout()


def _curve_png(exp: Explanation) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(PLAIN_TEXT):
        fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
        for key, style in (("deletion", "-o"), ("insertion", "-s")):
            c = exp.graph[key]
            ax.plot(c["fractions"], c["logits"], style, ms=3, label=f"{key} (AUC {c['auc']:.3f})")
        ax.set_xlabel("share of regions removed / inserted")
        ax.set_ylabel(f"logit {shown(exp.predicted)}")
        return figure_uri(fig)


def _page(title: str, body: str) -> str:
    """A whole page; names with bytes that are not UTF-8 are shown with U+FFFD (:func:`carrot.text.shown`)."""
    return shown(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                 f"<style>{CSS}</style></head><body>{body}<script>{CHECK_JS}</script></body></html>")


def _cell(grid: tuple[int, int], j: int) -> str:
    return f"({j // grid[1]},{j % grid[1]})"


def boxed(image, grid: tuple[int, int], cell: int, color: str = "#ffd400"):
    """A copy of ``image`` with the region ``cell`` (row-major on ``grid``) outlined."""
    from PIL import ImageDraw

    img = image.convert("RGB").copy()
    gh, gw = grid
    i, j = divmod(cell, gw)
    w, h = img.size
    box = (j * w / gw, i * h / gh, (j + 1) * w / gw - 1, (i + 1) * h / gh - 1)
    ImageDraw.Draw(img).rectangle(box, outline=color, width=max(2, min(w, h) // 60))
    return img


def _train_cards(rows: list[TrainingImage], grid: tuple[int, int], tgrid: tuple[int, int], test_image) -> str:
    cards = []
    for r in rows:
        img = r.picture
        strongest = r.pairs.strongest if r.pairs is not None else []
        match = ""
        if strongest:
            p = strongest[0]
            match = (f"<div class='muted'>strongest pair: this image &harr; training image</div>"
                     f"<div class='row' title='strongest region pair'><img alt='test region' "
                     f"src='{data_uri(boxed(test_image, grid, p['test_region']), 'JPEG', 160)}'>"
                     f"<img alt='matching training region' src='{data_uri(boxed(img, tgrid, p['train_region']), 'JPEG', 160)}'></div>")
        pairs = "<br>".join(
            f"test {_cell(grid, p['test_region'])} &harr; train {_cell(tgrid, p['train_region'])}: "
            f"<span class='{'pos' if p['value'] > 0 else 'neg'}'>{p['value']:+.4f}</span>" for p in strongest)
        cards.append(
            f"<div class='card'><div class='row'><img alt='training image' src='{data_uri(img, 'JPEG', 160)}'>"
            + (f"<img alt='its regions' src='{data_uri(overlay(img, np.asarray(r.pairs.train_regions)), 'JPEG', 160)}'>"
               if r.pairs is not None else "") + "</div>"
            f"<b>{html.escape(r.label)}</b> #{r.index} &nbsp; removal <span class='{'pos' if r.score > 0 else 'neg'}'>"
            f"{-r.score:+.4f}</span>" + (f" &nbsp; weight {r.weight:.3g}" if r.weight is not None else "")
            + f"<br><span class='muted'>label weight {r.equivalent_kernel:+.4f} &nbsp; representer {r.representer:+.3g}</span>"
            + f"<br><span class='muted'>{html.escape(Path(r.path).name)}</span><br>{pairs}{match}</div>")
    return "<div class='row'>" + "".join(cards) + "</div>"


def _meaning(exp: Explanation) -> str:
    """One line per number on a training-image card, saying what it is exact for."""
    m = exp.meaning
    drawn = {"pixel_map": exp.pixel_map, "pixel_occlusion": exp.occlusion,
             "region_contributions": exp.tokens.additive or None, "region_removal": (not exp.tokens.additive) or None}
    return ("<p class='muted'><b>removal</b>: the exact change of this logit if the image is removed from training "
            "(equal to refitting without it; images ranked by it" + ("; regions and pairs split it" if "pairs" in m else "")
            + ").<br>"
            f"<b>label weight</b>: {html.escape(m['equivalent_kernel'])}.<br>"
            f"<b>representer</b>: {html.escape(m['representer'])}."
            + "".join(f"<br><b>{label}</b>: {html.escape(m[key])}." for key, label in
                      (("pixel_map", "pixel map"), ("pixel_occlusion", "occlusion map"), ("region_contributions", "token map"),
                       ("region_removal", "token map"))
                      if key in m and drawn[key] is not None) + "</p>")


def _certificate(exp: Explanation) -> str:
    cert = exp.certificate
    if not cert:
        return ""
    if not cert["found"]:
        return (f"<p><b>Certificate:</b> no set of up to {cert['limit']} training images changes this prediction when removed "
                f"(greedy on exact effects; {cert['seconds'] * 1e3:.0f} ms).</p>")
    names = ", ".join(f"#{c['index']} ({html.escape(c['label'])})" for c in cert["images"])
    return (f"<p><b>Certificate:</b> this prediction rests on {len(cert['images'])} training image"
            f"{'s' if len(cert['images']) != 1 else ''}: without {names} it becomes "
            f"<b>{html.escape(str(cert['new_class']))}</b> (margin {cert['margin']:+.4f}, checked by a refit; "
            f"{cert['seconds'] * 1e3:.0f} ms).</p>")


def _pixel_figure(exp: Explanation, image) -> str:
    """The pixel map beside the image, captioned with what it is, how a cell is removed and what it sums to."""
    pm = exp.pixel_map
    total = sum(map(sum, pm.values))
    how, end = REMOVAL_MEANING[pm.removal]
    if pm.method == "shapley":
        sem = [v for row in (pm.sem or []) for v in row if v is not None]
        blocks = f", blocks of {pm.block}x{pm.block} cells" if pm.block and pm.block > 1 else ""
        what = (f"each cell's Shapley value in 'remove a set of cells' ({pm.permutations} random orders{blocks}"
                + (f"; typical s.e. {np.sqrt(np.mean(np.square(sem))):.2g}" if sem else "") + ")")
    else:
        what = "each cell's share of the path-integrated gradient from the fill image"
    return (f"<figure class='big'><img alt='pixel map' src='{data_uri(overlay(image, np.asarray(pm.values)), 'JPEG', 320)}'>"
            f"<figcaption>pixels &rarr; {html.escape(exp.predicted)}: {what}, a cell removed: {html.escape(how)}; they "
            f"sum to logit(image) &minus; {html.escape(end.replace('f(', 'logit(', 1))} = {total:+.4f} (red raises it; "
            f"sum error {pm.completeness_error:.1e}; {pm.seconds:.1f} s)</figcaption></figure>")


def explanation_html(exp: Explanation) -> str:
    """One explained image: picture, maps, class scores, certificate, supporting/inhibiting training images."""
    image, grid, tgrid = exp.picture, tuple(exp.grid), tuple(exp.train_grid)
    additive = exp.tokens.additive  # the exact split; otherwise each token's exact removal from the graph
    r = np.asarray(exp.tokens.values)
    scores = "".join(
        f"<tr class='{'pred' if name == exp.predicted else ''}'><td style='text-align:left'>{html.escape(name)}</td>"
        f"<td>{v:+.4f}</td></tr>" for name, v in sorted(exp.logits.items(), key=lambda kv: -kv[1]))
    occ = exp.occlusion
    body = [
        f"<h1>{html.escape(Path(exp.image).name)} &rarr; {html.escape(exp.predicted)}</h1>",
        "<div class='row'>",
        f"<figure class='big'><img alt='test image' src='{data_uri(image, 'JPEG', 320)}'><figcaption>input (as the model sees it)</figcaption></figure>",
        *([_pixel_figure(exp, image)] if exp.pixel_map is not None else []),
        *([f"<figure class='big'><img alt='occlusion map' src='{data_uri(overlay(image, np.asarray(occ.values)), 'JPEG', 320)}'>"
           f"<figcaption>occlusion &rarr; {html.escape(exp.predicted)}: the logit drop when each cell alone is removed "
           f"({html.escape(REMOVAL_MEANING[occ.removal or 'blur'][0])}) "
           f"(exact re-runs; {occ.seconds:.1f} s)</figcaption></figure>"] if occ is not None else []),
        f"<figure class='big'><img alt='region heatmap' src='{data_uri(overlay(image, r), 'JPEG', 320)}'>"
        f"<figcaption>tokens &rarr; {html.escape(exp.predicted)}: red raises the logit, blue lowers it "
        + (f"(exact split, sum {exp.tokens.total:+.4f})" if additive else
           "(each token's exact removal from the graph: a counterfactual, the kernel head's drops do not add up)")
        + "</figcaption></figure>",
        f"<div><table><tr><th>class</th><th>logit</th></tr>{scores}</table>"
        f"<p class='muted'>logit = prior {exp.prior:+.4f} + training images {exp.equivalent_kernel_sum:+.4f}"
        f" (identity error {exp.identity_error['equivalent_kernel']:.1e})</p></div></div>",
        _certificate(exp),
        "<h2>Supporting training images</h2>",
        _meaning(exp),
        _train_cards(exp.supporting, grid, tgrid, image),
        "<h2>Inhibiting training images</h2>",
        _train_cards(exp.inhibiting, grid, tgrid, image),
    ]
    if "deletion" in exp.graph:
        body.append(f"<h2>Region removal</h2><img alt='deletion and insertion curves' src='{_curve_png(exp)}'>")
    if exp.segments is not None:
        removal = exp.segment_removal or {}
        rows = "".join(f"<tr><td>{s}</td><td>{v:+.4f}</td><td>{removal.get(s, float('nan')):+.4f}</td></tr>"
                       for s, v in exp.segments.items())
        body.append(f"<h2>Your segments</h2><table><tr><th>segment</th><th>exact contribution</th><th>logit drop when removed</th></tr>{rows}</table>")
    return _page(f"carrot: {Path(exp.image).name}", "".join(body))


def write_explanation(exp: Explanation, out_dir: str | Path) -> dict[str, Any]:
    """Write heatmap.png, explanation.html and explanation.json for one explained image; returns the JSON written."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    pm = exp.pixel_map
    png = heatmap_png(exp.picture, np.asarray(pm.values if pm is not None else exp.tokens.values), out_dir / "heatmap.png",
                      title=f"{'pixels (' + pm.method + ')' if pm is not None else 'tokens'} -> {exp.predicted}")
    page = explanation_html(exp)
    with atomic_path(out_dir / "explanation.html") as tmp:
        tmp.write_text(page)
    exp.heatmap, exp.page = str(png), str(out_dir / "explanation.html")
    if exp.seconds:
        exp.seconds["page"] = time.perf_counter() - t0
    out = exp.to_json()
    write_json(out_dir / "explanation.json", out)
    return out


def _class_flow(summary: dict[str, Any], review) -> str:
    """Class-flow heatmap (predicted class x training class) and the training images carrying the most predictions."""
    carriers = ("<h2>Training images carrying the most predictions</h2><p class='muted'>sum of each training image's "
                "exact contributions to the predicted logits of all test images</p>"
                + review(summary["carriers"], "total contribution")) if summary.get("carriers") else ""
    if not summary.get("class_flow"):  # none for many classes (a C x C table no one can read)
        return carriers
    classes, F = summary["classes"], np.asarray(summary["class_flow"])
    peak = max(float(np.abs(F).max()), 1e-12)

    def cell(v: float) -> str:
        rgb = "178,24,43" if v >= 0 else "33,102,172"
        return f"<td style='background:rgba({rgb},{abs(v) / peak * 0.8:.2f})'>{v:+.4g}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = "".join(f"<tr><th>{html.escape(c)}</th>" + "".join(cell(float(v)) for v in F[i]) + "</tr>" for i, c in enumerate(classes))
    return ("<h2>Class flow</h2><p class='muted'>rows: predicted class; columns: class of the training images; cell: mean "
            "exact contribution of that class's training images to the predicted logit (red supports, blue inhibits)</p>"
            f"<table><tr><th></th>{head}</tr>{rows}</table>" + carriers)


def _confusion(summary: dict[str, Any]) -> str:
    """The confusion matrix where there are few classes, else the most frequent (true, predicted) mistakes."""
    classes = summary["classes"]
    if summary.get("confusion") is None:
        rows = "".join(f"<tr><td style='text-align:left'>{html.escape(t)}</td><td style='text-align:left'>"
                       f"{html.escape(p)}</td><td>{k}</td></tr>" for t, p, k in summary.get("confused_pairs", []))
        return (f"<h2>Most confused classes</h2><p class='muted'>{len(classes)} classes: the most frequent mistakes on the "
                f"test images instead of a {len(classes)} x {len(classes)} matrix</p><table><tr><th>true class</th>"
                f"<th>predicted</th><th>test images</th></tr>{rows}</table>")
    cm = np.asarray(summary["confusion"])
    peak = max(1, cm.max())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    cm_rows = "".join(
        f"<tr><th>{html.escape(c)}</th>" + "".join(
            f"<td style='background:rgba(178,24,43,{v / peak:.2f})'>{v}</td>" for v in cm[i]) + "</tr>"
        for i, c in enumerate(classes))
    return (f"<h2>Confusion matrix</h2><p class='muted'>rows: true class, columns: predicted</p>"
            f"<table><tr><th></th>{head}</tr>{cm_rows}</table>")


def index_html(summary: dict[str, Any], thumbs: dict[int, Any], pages: Sequence[dict[str, Any]]) -> str:
    """Run overview: accuracy, per-class table, confusion matrix, training images for label review."""
    classes = summary["classes"]
    per_class = "".join(
        f"<tr><td style='text-align:left'>{html.escape(c)}</td><td>{summary['per_class'][c]['n_test']}</td>"
        f"<td>{summary['per_class'][c]['accuracy']:.3f}</td></tr>" for c in classes)

    def review_with_prediction(rows):
        cards = "".join(
            f"<div class='card'><img alt='label review' src='{data_uri(thumbs[r['index']], 'JPEG', 160)}'><br>"
            f"<b>{html.escape(r['label'])}</b> #{r['index']} &rarr; {html.escape(r['loo_predicted'])}<br>"
            f"LOO cross-entropy {r['score']:.3f}<br>"
            f"<span class='muted'>{html.escape(Path(r['path']).name)}</span></div>" for r in rows)
        return f"<div class='row'>{cards}</div>"

    def review(rows, what):
        cards = "".join(
            f"<div class='card'><img alt='{what}' src='{data_uri(thumbs[r['index']], 'JPEG', 160)}'><br>"
            f"<b>{html.escape(r['label'])}</b> #{r['index']}<br>{what} {r['score']:+.4f}<br>"
            f"<span class='muted'>{html.escape(Path(r['path']).name)}</span></div>" for r in rows)
        return f"<div class='row'>{cards}</div>"

    links = "".join(f"<li><a href='{html.escape(p['href'])}'>{html.escape(Path(p['image']).name)}</a> &rarr; "
                    f"{html.escape(p['predicted'])}</li>" for p in pages)
    body = (
        f"<h1>carrot run: {html.escape(summary['name'])}</h1>"
        f"<p>backbone <b>{html.escape(summary['backbone'])}</b>, diffusion t = {summary['t']}, "
        f"{html.escape(summary.get('head', 'ridge head'))}, &lambda; = {summary['lam']:.4g}; "
        + (f"{html.escape(summary['embedding'])}; " if summary.get('embedding') else "") +
        f"{summary['n_train']} training / {summary['n_test']} test images, {len(classes)} classes.</p>"
        f"<p style='font-size:20px'>test accuracy <b>{summary['test_accuracy']:.4f}</b></p>"
        f"<h2>Per class</h2><table><tr><th>class</th><th>test images</th><th>accuracy</th></tr>{per_class}</table>"
        + _confusion(summary) +
        "<h2>Label review</h2><p class='muted'>training images whose label the rest of the data disagrees with most: "
        "exact leave-one-out cross-entropy of the label (softmax of the logits refitted without the image, temperature "
        f"{summary.get('label_review_temperature', float('nan')):.3g} fitted on the training labels); the card says what the "
        "model predicts for the image without it</p>"
        + review_with_prediction(summary.get("label_review", [])) +
        "<h2>Most harmful training images</h2>"
        "<p class='muted'>exact leave-one-out: removing the image lowers the summed squared loss on the test images by this much</p>"
        + review(summary["harmful"], "removal gain") +
        "<h2>Most helpful training images</h2><p class='muted'>removing the image raises the test loss by this much (shown negative)</p>"
        + review(summary["helpful"], "removal loss") + _class_flow(summary, review) +
        audits_html(summary.get("audits", {})) + f"<h2>Explained images</h2><ul>{links or '<li>none yet: carrot-run explain RUN IMAGES</li>'}</ul>")
    return _page(f"carrot run {summary['name']}", _with_contents(body))


def _with_contents(body: str) -> str:
    """Number the page's h2 sections and put a list of links to them under the h1."""
    import re

    titles: list[str] = []

    def anchor(m: "re.Match[str]") -> str:
        titles.append(m.group(1))
        return f"<h2 id='s{len(titles)}'>{m.group(1)}</h2>"

    body = re.sub(r"<h2>(.*?)</h2>", anchor, body)
    nav = "<nav class='muted'>" + " &middot; ".join(f"<a href='#s{i}'>{t}</a>" for i, t in enumerate(titles, 1)) + "</nav>"
    return body.replace("</h1>", "</h1>" + nav, 1)
