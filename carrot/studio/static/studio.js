// carrot studio: one page, hash routes, every number from the server's exact algebra. No dependencies.
"use strict";

const state = { summary: null, tests: null, basket: loadBasket(), lastAnswer: null };

// ---- small helpers ---------------------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "-" : Number(x).toFixed(d));
const pct = (x) => (100 * x).toFixed(1) + "%";
const signed = (x, d = 3) => (x > 0 ? "+" : "") + fmt(x, d);

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Carrot-Studio": "1" },
  };
  const r = await fetch(path, { credentials: "same-origin", ...opts });
  const type = r.headers.get("content-type") || "";
  const data = type.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return data;
}

function toast(msg, error) {
  const t = document.getElementById("toast");
  t.textContent = msg; t.className = error ? "error" : ""; t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => (t.hidden = true), error ? 8000 : 3000);
}

const view = () => document.getElementById("view");

// ---- the basket: this tab's edits (sessionStorage: two tabs edit independently) -----------------------
function loadBasket() {
  try { return JSON.parse(sessionStorage.getItem("carrot-basket") || "{}"); } catch (e) { return {}; }
}
function saveBasket() {
  sessionStorage.setItem("carrot-basket", JSON.stringify(state.basket));
  document.getElementById("basket-count").textContent = Object.keys(state.basket).length;
}
function addToBasket(rows, action) {
  let added = 0;
  for (const r of rows) {
    if (state.basket[r.index]) continue;
    state.basket[r.index] = { index: r.index, name: r.name, label: r.label, label_index: r.label_index,
      weight0: r.weight, action: action || "remove", to: r.label_index, weight: 0.5 };
    added++;
  }
  saveBasket();
  toast(`${added} training image${added === 1 ? "" : "s"} added to the basket`);
}
function edits() {
  return Object.values(state.basket).map((e) => e.action === "relabel" ? { index: e.index, action: "relabel", to: Number(e.to) }
    : e.action === "weight" ? { index: e.index, action: "weight", weight: Number(e.weight) }
      : { index: e.index, action: "remove" });
}

// ---- pieces ----------------------------------------------------------------------------------------
const img = (split, i, cls) => h("img", { src: `/img/${split}/${i}`, loading: "lazy", alt: `${split} ${i}`, class: cls,
  onclick: () => (location.hash = `#/${split}/${i}`) });

function trainCard(r, extra) {
  return h("div", { class: "card", "data-train": r.index },
    img("train", r.index),
    h("div", { class: "name", title: r.name }, `#${r.index} ${r.name}`),
    h("div", {}, "label ", h("b", {}, r.label), r.weight !== undefined && r.weight !== 1 ? ` (w ${fmt(r.weight, 2)})` : ""),
    extra || null,
    h("button", { class: "small", "data-add": r.index, onclick: () => addToBasket([r]) }, "+ basket"));
}
function testCard(r, extra) {
  return h("div", { class: "card" + (r.correct ? "" : " wrong"), "data-test": r.index },
    img("test", r.index),
    h("div", { class: "name", title: r.name }, `#${r.index} ${r.name}`),
    h("div", {}, r.label, " → ", h("b", { class: r.correct ? "good" : "bad" }, r.predicted)),
    h("div", { class: "muted" }, `margin ${fmt(r.margin)}`), extra || null);
}
function trainTable(rows, cols) {
  return h("table", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "image"), h("th", {}, "label"), ...cols.map((c) => h("th", { class: "num" }, c[0])), h("th", {}, "")),
    rows.map((r) => h("tr", { "data-train": r.index },
      h("td", {}, h("img", { src: `/img/train/${r.index}`, width: 40, height: 40, loading: "lazy" })),
      h("td", {}, h("a", { href: `#/train/${r.index}` }, `#${r.index} ${r.name}`)), h("td", {}, r.label),
      ...cols.map((c) => h("td", { class: "num" }, c[1](r))),
      h("td", {}, h("button", { class: "small", onclick: () => addToBasket([r]) }, "+ basket")))));
}
function progressOf(job) {
  const bars = job.bars || [];
  return h("div", { class: "job" }, h("span", {}, `${job.status} (${job.seconds} s) `),
    bars.map((b) => h("div", {}, h("span", {}, `${b.desc} `),
      h("span", { class: "progress" }, h("div", { style: `width:${b.total ? (100 * b.n) / b.total : 0}%` })),
      h("span", { class: "muted" }, ` ${b.n}/${b.total ?? "?"} ${b.postfix}`))),
    job.error ? h("div", { class: "bad" }, job.error) : null);
}
async function follow(job, into, done) {
  while (job.status === "queued" || job.status === "running") {
    into.replaceChildren(progressOf(job));
    await new Promise((r) => setTimeout(r, 500));
    job = await api(`/api/jobs/${job.id}`);
  }
  into.replaceChildren(job.status === "done" ? done(job.result) : progressOf(job));
}

// ---- pages -----------------------------------------------------------------------------------------
async function summaryPage() {
  const s = state.summary;
  const cm = s.confusion ? h("table", { class: "cm" }, h("tr", {}, h("th", {}, "true \\ predicted"), s.classes.map((c) => h("th", {}, c))),
    s.confusion.map((row, t) => h("tr", {}, h("th", {}, s.classes[t]), row.map((k, p) => h("td", {
      class: t === p ? "diag" : k ? "off" : "", "data-cell": `${t}-${p}`,
      onclick: () => (location.hash = `#/test?true=${t}&pred=${p}`) }, k))))) : h("p", { class: "muted" }, "too many classes for a matrix");
  show(
    h("div", { class: "row" },
      h("div", { class: "panel" }, h("div", { class: "muted" }, "test accuracy"), h("div", { class: "big", id: "accuracy" }, pct(s.test_accuracy)),
        h("div", {}, `${s.n_train} training, ${s.n_test} test images`), h("div", { class: "muted" }, s.head), h("div", { class: "muted" }, s.embedding || ""), h("div", { class: "muted" }, `backbone ${s.backbone}, t = ${s.t}`),
        s.derived_from ? h("div", {}, "derived from ", h("code", {}, s.derived_from.run || ""), ` by ${s.derived_from.by}`) : null),
      h("div", {}, h("h3", {}, "Per class"), h("table", {}, h("tr", {}, h("th", {}, "class"), h("th", { class: "num" }, "test images"), h("th", { class: "num" }, "accuracy")),
        Object.entries(s.per_class).map(([c, v]) => h("tr", {}, h("td", {}, c), h("td", { class: "num" }, v.n_test), h("td", { class: "num" }, pct(v.accuracy)))))),
      h("div", {}, h("h3", {}, "Confusion matrix (click a cell)"), cm),
      s.confused_pairs.length ? h("div", {}, h("h3", {}, "Most confused (click a pair)"),
        h("table", { id: "confused" }, h("tr", {}, h("th", {}, "true"), h("th", {}, "predicted"), h("th", { class: "num" }, "test images")),
          s.confused_pairs.slice(0, 15).map(([t, p, k]) => h("tr", {},
            h("td", {}, h("a", { href: `#/test?true=${s.classes.indexOf(t)}&pred=${s.classes.indexOf(p)}` }, t)),
            h("td", {}, p), h("td", { class: "num" }, k))))) : null),
    h("h2", {}, "Label review ", h("button", { id: "review-top", onclick: async () => addToBasket((await api("/api/review")).slice(0, 20)) }, "+ top 20 to basket")),
    h("p", { class: "muted" }, "training labels the rest of the data disagrees with most (exact LOO cross-entropy)"),
    trainTable(s.label_review, [["score", (r) => fmt(r.score)], ["LOO predicts", (r) => r.loo_predicted]]),
    h("div", { class: "row" },
      h("div", {}, h("h2", {}, "Harmful"), h("p", { class: "muted" }, "removing them lowers the test loss most (exact)"), trainTable(s.harmful, [["loss drop", (r) => fmt(r.score)]])),
      h("div", {}, h("h2", {}, "Helpful"), h("p", { class: "muted" }, "removing them raises the test loss most"), trainTable(s.helpful, [["loss drop", (r) => fmt(r.score)]]))));
}

const certText = (c) => (c === "none" ? "no certificate within the limit" : `certificate ${c}`);

async function testListPage(params) {
  const gen = route.generation;
  state.tests = state.tests || (await api("/api/test"));
  const s = state.summary;
  const f = { cls: params.get("class") ?? "", errors: params.get("errors") === "1", sort: params.get("sort") || "index",
    t: params.get("true"), p: params.get("pred"), cert: params.get("cert") || "", margin: params.get("margin") || "",
    shown: Number(params.get("shown") || 200) };
  const go = (patch) => {
    const q = new URLSearchParams({ class: f.cls, errors: f.errors ? "1" : "0", sort: f.sort, cert: f.cert, margin: f.margin, ...patch });
    location.hash = "#/test?" + q.toString();
  };
  let rows = state.tests.filter((r) => (f.cls === "" || r.label === s.classes[f.cls]) && (!f.errors || !r.correct)
    && (f.t === null || r.label === s.classes[f.t]) && (f.p === null || r.predicted === s.classes[f.p])
    && (f.cert === "" || (typeof r.certificate === "number" && r.certificate <= Number(f.cert)))
    && (f.margin === "" || r.margin <= Number(f.margin)));
  if (f.sort === "margin") rows = [...rows].sort((a, b) => a.margin - b.margin);
  const size = (c) => (typeof c === "number" ? c : 1e9);
  if (f.sort === "certificate") rows = [...rows].sort((a, b) => size(a.certificate) - size(b.certificate));
  const certBox = h("span", {});
  const known = state.tests.some((r) => r.certificate !== null);
  showIf(gen, 
    h("div", { class: "filters" },
      h("label", {}, "class ", h("select", { id: "f-class", onchange: (e) => go({ class: e.target.value }) },
        h("option", { value: "" }, "all"), s.classes.map((c, i) => h("option", { value: i, selected: String(i) === f.cls }, c)))),
      h("label", {}, h("input", { type: "checkbox", id: "f-errors", checked: f.errors, onchange: (e) => go({ errors: e.target.checked ? "1" : "0" }) }), " errors only"),
      h("label", {}, "sort ", h("select", { id: "f-sort", onchange: (e) => go({ sort: e.target.value }) },
        ["index", "margin", "certificate"].map((k) => h("option", { value: k, selected: k === f.sort }, k === "margin" ? "lowest margin first" : k === "certificate" ? "smallest certificate first" : k)))),
      h("label", {}, "margin ≤ ", h("input", { id: "f-margin", type: "number", step: 0.05, style: "width:70px", value: f.margin,
        onchange: (e) => go({ margin: e.target.value }) })),
      h("label", {}, "certificate size ≤ ", h("input", { id: "f-cert", type: "number", min: 1, style: "width:70px", value: f.cert, disabled: !known,
        onchange: (e) => go({ cert: e.target.value }) })),
      h("button", { id: "certificates", onclick: async () => {
        const job = await api("/api/certificates", {});
        follow(job, certBox, () => { state.tests = null; route(); return "done"; });
      } }, known ? "certificates computed" : "compute every certificate"), certBox,
      f.t !== null ? h("span", {}, `true ${s.classes[f.t]}, predicted ${s.classes[f.p]} `, h("a", { href: "#/test" }, "clear")) : null),
    h("p", { class: "muted", id: "test-count" }, `${rows.length} of ${state.tests.length} test images`),
    h("div", { class: "cards" }, rows.slice(0, f.shown).map((r) => testCard(r, r.certificate !== null ? h("div", { class: "muted" }, certText(r.certificate)) : null))),
    rows.length > f.shown ? h("button", { id: "show-more", onclick: () => go({ shown: f.shown + 200 }) }, `show ${Math.min(200, rows.length - f.shown)} more`) : null);
}

async function similarBlock(split, i) {
  const box = h("div", {}, h("p", { class: "muted" }, "finding similar training images..."));
  api(`/api/similar/${split}/${i}`).then((r) => box.replaceChildren(
    h("p", { class: "muted" }, `by ${r.similarity} (${r.index_kind} index)`),
    h("div", { class: "cards" }, r.images.map((x) => trainCard(x, h("div", { class: "muted" }, `similarity ${fmt(x.similarity)}`))))))
    .catch((e) => box.replaceChildren(h("p", { class: "bad" }, e.message)));
  return box;
}

async function testPage(i) {
  const gen = route.generation;
  const d = await api(`/api/test/${i}`);
  const explainBox = h("div", { id: "explain-box" });
  const certBox = h("div", { id: "certificate-box" });
  const showCert = (cert) => h("div", {},
    cert.found ? h("p", { id: "certificate" }, `removing these ${cert.indices.length} training images changes the prediction to ${cert.new_class} `,
      `(checked by a refit: margin ${fmt(cert.margin_after)}, error ${Number(cert.refit_error).toExponential(1)}) `,
      h("button", { id: "cert-basket", onclick: () => addToBasket(cert.images) }, "+ certificate to basket"))
      : h("p", { id: "certificate" }, `no set of up to ${cert.limit} training images found that changes it`),
    h("div", { class: "cards" }, cert.images.map((r) => trainCard(r))));
  if (d.certificate) certBox.replaceChildren(showCert(d.certificate));
  else api(`/api/certificate/${i}`, {}).then((job) => follow(job, certBox, showCert)).catch((e) => certBox.replaceChildren(h("p", { class: "bad" }, e.message)));
  showIf(gen, h("div", { class: "row detail" },
    h("div", {}, h("img", { class: "main", src: `/img/test/${i}` })),
    h("div", {}, h("h2", {}, `Test image #${i} ${d.name}`),
      h("p", {}, "label ", h("b", {}, d.label), ", predicted ", h("b", { class: d.correct ? "good" : "bad" }, d.predicted),
        ` (margin ${fmt(d.margin)} over ${d.runner_up})`),
      h("table", {}, Object.entries(d.scores).map(([c, v]) => h("tr", {}, h("td", {}, c), h("td", { class: "num" }, fmt(v))))),
      h("h3", {}, "Certificate"),
      certBox)),
  h("p", { class: "muted" }, d.effect_meaning),
  h("h2", {}, "For (removal lowers the margin)"), h("div", { class: "cards" }, d.for.map((r) => trainCard(r, h("div", { class: "bad" }, `margin ${signed(r.margin_effect)}`)))),
  h("h2", {}, "Against (removal raises the margin)"), h("div", { class: "cards" }, d.against.map((r) => trainCard(r, h("div", { class: "good" }, `margin ${signed(r.margin_effect)}`)))),
  h("h2", {}, "Region maps ", h("button", { id: "explain", onclick: async () => {
    const job = await api(`/api/explain/${i}`, {});
    follow(job, explainBox, (res) => h("iframe", { class: "page", src: `/work/${res.page}`, title: "explanation" }));
  } }, "explain with the pixel map")), explainBox,
  h("h2", {}, "Similar training images"), await similarBlock("test", i));
}

async function trainPage(i) {
  const gen = route.generation;
  const d = await api(`/api/train/${i}`);
  const s = state.summary;
  const inBasket = state.basket[i];
  const relabel = h("select", { id: "relabel-to" }, s.classes.map((c, k) => h("option", { value: k, selected: k === d.label_index }, c)));
  const weight = h("input", { id: "weight-to", type: "number", min: 0, step: 0.1, value: 0.5, style: "width:70px" });
  const put = (action) => {
    addToBasket([d], action);
    const e = state.basket[i]; e.action = action; e.to = Number(relabel.value); e.weight = Number(weight.value); saveBasket();
  };
  showIf(gen, h("div", { class: "row detail" },
    h("div", {}, h("img", { class: "main", src: `/img/train/${i}` })),
    h("div", {}, h("h2", {}, `Training image #${i} ${d.name}`),
      h("p", {}, "label ", h("b", {}, d.label), `, weight ${fmt(d.weight, 2)}`),
      h("p", {}, "exact leave-one-out prediction: ", h("b", { id: "loo-pred", class: d.loo_predicted === d.label ? "good" : "bad" }, d.loo_predicted)),
      h("table", {}, Object.entries(d.loo_scores).map(([c, v]) => h("tr", {}, h("td", {}, c), h("td", { class: "num" }, fmt(v))))),
      h("p", {}, d.review_rank === null ? "not in the label review (weight 0)" : `label review: score ${fmt(d.review_score)}, rank ${d.review_rank} of ${d.n_reviewed}`),
      h("div", { class: "filters" }, h("button", { id: "put-remove", onclick: () => put("remove") }, "remove"),
        h("span", {}, h("button", { id: "put-relabel", onclick: () => put("relabel") }, "relabel to"), " ", relabel),
        h("span", {}, h("button", { id: "put-weight", onclick: () => put("weight") }, "weight"), " ", weight)),
      inBasket ? h("p", { class: "muted" }, `in the basket: ${inBasket.action}`) : null)),
  h("p", { class: "muted" }, d.effect_meaning),
  h("h2", {}, "Supports (its removal lowers these margins)"), h("div", { class: "cards" }, d.supports.map((r) => testCard(r, h("div", { class: "bad" }, `margin ${signed(r.margin_effect)}`)))),
  h("h2", {}, "Inhibits (its removal raises these margins)"), h("div", { class: "cards" }, d.inhibits.map((r) => testCard(r, h("div", { class: "good" }, `margin ${signed(r.margin_effect)}`)))),
  h("h2", {}, "Similar training images"), await similarBlock("train", i));
}

async function reviewPage() {
  const gen = route.generation;
  const rows = await api("/api/review");
  showIf(gen, h("h2", {}, "Label review ", h("button", { onclick: () => addToBasket(rows.slice(0, 20)) }, "+ top 20 to basket")),
    h("p", { class: "muted" }, "the training labels the rest of the data disagrees with most: exact leave-one-out cross-entropy, temperature fitted on the training labels"),
    trainTable(rows, [["score", (r) => fmt(r.score)], ["LOO predicts", (r) => r.loo_predicted]]));
}

function basketPage() {
  const s = state.summary;
  const result = h("div", { id: "result" });
  const rows = Object.values(state.basket);
  const recompute = async (verify) => {
    if (!Object.keys(state.basket).length) { result.replaceChildren(h("p", { class: "muted" }, "the basket is empty")); return; }
    result.setAttribute("data-state", "computing");
    const mine = (state.whatifSeq = (state.whatifSeq || 0) + 1);
    try {
      const a = await api("/api/whatif", { edits: edits(), verify: !!verify });
      if (mine !== state.whatifSeq) return;  // a newer basket was sent meanwhile: its answer is the one to show
      state.lastAnswer = a;
      result.replaceChildren(answerView(a));
      result.setAttribute("data-state", "done");
    } catch (e) {
      if (mine !== state.whatifSeq) return;
      result.replaceChildren(h("p", { class: "bad" }, e.message)); result.setAttribute("data-state", "error");
    }
  };
  const nameBox = h("input", { id: "apply-name", value: `${s.run}-edited`, style: "width:240px" });
  const download = async (format) => {
    const text = await api("/api/export", { edits: edits(), format });
    const blob = new Blob([typeof text === "string" ? text : JSON.stringify(text, null, 2)], { type: format === "csv" ? "text/csv" : "application/json" });
    const a = h("a", { href: URL.createObjectURL(blob), download: `${s.run}-edits.${format}` }); a.click();
  };
  const table = h("table", { id: "basket" }, h("tr", {}, h("th", {}, ""), h("th", {}, "image"), h("th", {}, "label"), h("th", {}, "edit"), h("th", {}, "")),
      rows.map((e) => h("tr", { "data-train": e.index },
        h("td", {}, h("img", { src: `/img/train/${e.index}`, width: 40, height: 40 })),
        h("td", {}, h("a", { href: `#/train/${e.index}` }, `#${e.index} ${e.name}`)), h("td", {}, e.label),
        h("td", {}, h("select", { "data-action": e.index, onchange: (ev) => { e.action = ev.target.value; saveBasket(); basketPage(); } },
          ["remove", "relabel", "weight"].map((k) => h("option", { value: k, selected: k === e.action }, k))),
          e.action === "relabel" ? h("select", { "data-to": e.index, onchange: (ev) => { e.to = Number(ev.target.value); saveBasket(); recompute(); } },
            s.classes.map((c, k) => h("option", { value: k, selected: k === Number(e.to) }, c))) : null,
          e.action === "weight" ? h("input", { "data-weight": e.index, type: "number", min: 0, step: 0.1, value: e.weight, style: "width:70px",
            onchange: (ev) => { e.weight = Number(ev.target.value); saveBasket(); recompute(); } }) : null),
        h("td", {}, h("button", { class: "small", onclick: () => { delete state.basket[e.index]; saveBasket(); basketPage(); } }, "take out")))));
  show(h("h2", {}, `Basket: ${rows.length} training images`),
    h("div", { class: "filters" },
      h("button", { id: "verify", onclick: () => recompute(true) }, "verify against a refit"),
      h("button", { onclick: () => { state.basket = {}; saveBasket(); basketPage(); } }, "empty the basket"),
      h("button", { id: "export-csv", onclick: () => download("csv") }, "export CSV"),
      h("button", { onclick: () => download("json") }, "export JSON"),
      h("span", {}, "apply as a new run named ", nameBox, " ",
        h("button", { class: "primary", id: "apply", onclick: async () => {
          try {
            const r = await api("/api/apply", { edits: edits(), name: nameBox.value });
            document.getElementById("applied").replaceChildren(h("p", { class: "good" }, `written: ${r.run} (test accuracy ${pct(r.test_accuracy)}); open it with `, h("code", {}, r.command)));
          } catch (e) { toast(e.message, true); }
        } }, "apply"))),
    h("div", { id: "applied" }), h("div", { class: "row" }, h("div", {}, table), result));
  recompute();
}

function answerView(a) {
  const d = a.accuracy_after - a.accuracy_before;
  return h("div", {},
    h("div", { class: "row" },
      h("div", { class: "panel" }, h("div", { class: "muted" }, "test accuracy"),
        h("div", { class: "big" }, h("span", { id: "acc-before" }, pct(a.accuracy_before)), " → ", h("span", { id: "acc-after", "data-value": a.accuracy_after }, pct(a.accuracy_after))),
        h("div", { class: d > 0 ? "good" : d < 0 ? "bad" : "muted" }, `${d >= 0 ? "+" : ""}${(100 * d).toFixed(1)} points, ${a.changed.length} predictions change`),
        h("div", { class: "muted", id: "answer-ms" }, `answered in ${(1000 * a.seconds).toFixed(0)} ms, ${a.exact_for}`),
        a.verify ? h("div", { class: "verify", id: "verify-result", "data-diff": a.verify.max_abs_logit_diff },
          `refit check: max |logit difference| ${a.verify.max_abs_logit_diff.toExponential(2)}, max |LOO difference| ${a.verify.max_abs_loo_diff.toExponential(2)} `,
          `(logits up to ${fmt(a.verify.scale, 2)}; refit ${fmt(a.verify.refit_seconds, 2)} s)`) : null),
      h("div", {}, h("h3", {}, "Per class"), h("table", { id: "per-class" }, h("tr", {}, h("th", {}, "class"), h("th", { class: "num" }, "before"), h("th", { class: "num" }, "after"), h("th", { class: "num" }, "change")),
        a.per_class.map((c) => h("tr", {}, h("td", {}, c.class), h("td", { class: "num" }, pct(c.before)), h("td", { class: "num" }, pct(c.after)),
          h("td", { class: "num " + (c.after > c.before ? "good" : c.after < c.before ? "bad" : "") }, `${c.after >= c.before ? "+" : ""}${(100 * (c.after - c.before)).toFixed(1)}`)))))),
    h("h3", {}, `Predictions that change (${a.changed.length})`),
    h("table", { id: "changed" }, h("tr", {}, h("th", {}, ""), h("th", {}, "test image"), h("th", {}, "label"), h("th", {}, "before"), h("th", {}, "after"), h("th", { class: "num" }, "margin after")),
      a.changed.map((c) => h("tr", {}, h("td", {}, h("img", { src: `/img/test/${c.index}`, width: 40, height: 40, loading: "lazy" })),
        h("td", {}, h("a", { href: `#/test/${c.index}` }, `#${c.index} ${c.name}`)), h("td", {}, c.label),
        h("td", { class: c.correct ? "good" : "bad" }, c.predicted), h("td", { class: c.correct_after ? "good" : "bad" }, c.after), h("td", { class: "num" }, fmt(c.margin_after))))),
    h("h3", {}, "Label review after the edit"),
    trainTable(a.label_review, [["score", (r) => fmt(r.score)], ["LOO predicts", (r) => r.loo_predicted]]));
}

// ---- routing ---------------------------------------------------------------------------------------
function show(...kids) { view().replaceChildren(...kids); }
// a page that awaited the server shows itself only if no newer navigation started meanwhile
function showIf(gen, ...kids) { if (gen === route.generation) show(...kids); }

async function route() {
  route.generation = (route.generation || 0) + 1;
  const mine = route.generation;
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === (parts[0] || "summary")));
  try {
    state.summary = state.summary || (await api("/api/summary"));
    if (mine !== route.generation) return;
    document.getElementById("run-name").textContent = `run ${state.summary.run}`;
    if (!parts.length) await summaryPage();
    else if (parts[0] === "test" && parts.length === 1) await testListPage(params);
    else if (parts[0] === "test") await testPage(Number(parts[1]));
    else if (parts[0] === "train") await trainPage(Number(parts[1]));
    else if (parts[0] === "review") await reviewPage();
    else if (parts[0] === "basket") basketPage();
    else show(h("p", {}, "no such page"));
    if (mine === route.generation) view().setAttribute("data-page", parts[0] || "summary");
  } catch (e) {
    show(h("p", { class: "bad" }, e.message));
  }
}
window.addEventListener("hashchange", route);
saveBasket();
route();
