"""carrot studio: seconds of an exact what-if answer as the app serves it, against a refit measured in the same run, and
the similar-images index's recall against exact search.

A run is written from synthetic Gaussian-class embeddings (D = 384, C classes, m = n / 5 test images; the backbone is
never run: the studio works on a run's saved embeddings) for each n and head (ridge; kernel exact; kernel Nystroem),
with lambda (and gamma) fixed so the fit is no search. Then, through the studio's HTTP API (Starlette's TestClient,
JSON encoding included): opening the run, a basket of k edits (a third each removed, relabelled, reweighted) answered
cold (each image's hat column computed for the first time) and warm (the same images, one edit changed, as when a
user changes an action), and once with ``verify`` (a refit from scratch on the edited data: its seconds are the
reference, its largest logit difference the identity's error). A similar-images query last.

    python benchmarks/bench_studio.py --n 2000 10000 --out benchmarks/results/studio.json
    python benchmarks/bench_studio.py --n --recall-n 100000   # add the FAISS IVF recall to the file
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, write_results  # noqa: E402

HEADS = {"ridge": {"kind": "ridge", "lam": 1.0},
         "kernel": {"kind": "kernel", "lam": 0.1, "gamma": 0.5, "approx": "exact"},
         "nystroem": {"kind": "kernel", "lam": 0.1, "gamma": 0.5, "approx": "nystroem"}}


def synthetic(n: int, m: int, d: int, C: int, seed: int):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(C, d)) * 0.35
    y, yt = np.arange(n) % C, np.arange(m) % C
    flip = g.random(n) < 0.05  # some wrong labels, as a data set to clean has
    y_noisy = np.where(flip, g.integers(C, size=n), y)
    return centres[y] + g.normal(size=(n, d)), y_noisy, centres[yt] + g.normal(size=(m, d)), yt


def write_run(out: Path, n: int, d: int, C: int, head: dict, seed: int) -> None:
    from carrot.config import RunConfig
    from carrot.data import ImageRecord
    from carrot.run.pipeline import Carrot

    G, y, Gt, yt = synthetic(n, n // 5, d, C, seed)
    cfg = RunConfig().merged({"backbone.name": "vit_tiny_patch16_224", "backbone.img_size": 32,
                              "backbone.pretrained": False, "backbone.blocks": 1, "backbone.global_tokens": False,
                              **{f"head.{k}": v for k, v in head.items()}})
    model = Carrot(cfg)
    model.fit(G, y, [ImageRecord(f"/synthetic/train/{i}.png", int(c)) for i, c in enumerate(y)], [f"c{c}" for c in range(C)])
    pred = model.head_.predict(Gt)
    model.record_test(Gt, [[f"/synthetic/test/{j}.png", int(c)] for j, c in enumerate(yt)],
                      {"test_accuracy": float((pred == yt).mean())})
    model.save(out)


def basket(rng: np.random.Generator, n: int, C: int, k: int, change: int = 0) -> list[dict]:
    rows = rng.choice(n, size=k, replace=False).tolist()
    acts = []
    for t, i in enumerate(rows):
        kind = (t + change) % 3
        acts.append({"index": i, "action": "remove"} if kind == 0 else
                    {"index": i, "action": "relabel", "to": int((i + 1) % C)} if kind == 1 else
                    {"index": i, "action": "weight", "weight": 0.5})
    return acts


def timed_post(client, path: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = client.post(path, json=body, headers={"X-Carrot-Studio": "1"})
    if r.status_code != 200:
        raise RuntimeError(r.text)
    return time.perf_counter() - t0, r.json()


def measure(n: int, head_name: str, ks: list[int], d: int, C: int, seed: int) -> list[dict]:
    from starlette.testclient import TestClient

    from carrot.studio.app import create_app
    from carrot.studio.state import Studio

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        write_run(run, n, d, C, HEADS[head_name], seed)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        studio = Studio(run)
        open_s = time.perf_counter() - t0
        client = TestClient(create_app(studio, "x" * 24, "127.0.0.1", 1), base_url="http://127.0.0.1:1")
        client.headers["X-Carrot-Token"] = "x" * 24
        for k in ks:
            rng = np.random.default_rng(seed + k)
            state = rng.bit_generator.state
            cold, ans = timed_post(client, "/api/whatif", {"edits": basket(rng, n, C, k)})
            rng.bit_generator.state = state
            warm, _ = timed_post(client, "/api/whatif", {"edits": basket(rng, n, C, k, change=1)})
            _, ver = timed_post(client, "/api/whatif", {"edits": basket(np.random.default_rng(seed + k), n, C, k), "verify": True})
            v = ver["verify"]
            rows.append({"n": n, "m": n // 5, "d": d, "c": C, "head": head_name, "k": k, "fit_s": fit_s, "open_s": open_s,
                         "whatif_cold_s": cold, "whatif_warm_s": warm, "server_s": ans["seconds"],
                         "refit_s": v["refit_seconds"], "speedup_vs_refit_warm": v["refit_seconds"] / warm,
                         "max_abs_logit_diff": v["max_abs_logit_diff"], "max_abs_loo_diff": v["max_abs_loo_diff"],
                         "changed": len(ans["changed"]), "accuracy_before": ans["accuracy_before"],
                         "accuracy_after": ans["accuracy_after"]})
            print(json.dumps(rows[-1]), flush=True)
        t0 = time.perf_counter()
        client.get("/api/similar/test/0")
        rows[-1]["similar_first_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.get("/api/similar/test/1")
        rows[-1]["similar_s"] = time.perf_counter() - t0
        rows[-1]["peak_rss_mb"] = peak_rss_mb()
        studio.close()
    return rows


def recall(n: int, d: int, C: int, queries: int, seed: int) -> dict:
    """SimilarIndex 'ivf' (the default above 50,000 images) against exact 'flat' search, recall@10 on held-out queries,
    for the ridge head (centred inner product) and the RBF kernel head (Nystroem-fitted; the search is on the exact
    kernel, whose order is the preprocessed embeddings' L2 order)."""
    from carrot.attribution.retrieval import SimilarIndex, recall_at_k
    from carrot.ridge.head import RidgeHead

    from carrot.ridge.kernel import KernelRidgeHead

    G, y, Gt, _ = synthetic(n, queries, d, C, seed)
    out = {"n": n, "d": d, "c": C, "queries": queries}
    heads = {"ridge": RidgeHead(lam=1.0), "kernel": KernelRidgeHead(gamma=0.5, lam=0.1, approx="nystroem", n_landmarks=512)}
    for name, head in heads.items():
        head.fit(G, y)
        exact = None
        for kind in ("flat", "ivf"):
            t0 = time.perf_counter()
            index = SimilarIndex.build(head, G, kind)
            out[f"{name}_{kind}_build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            idx, _ = index.search(Gt, 10)
            out[f"{name}_{kind}_query_ms"] = 1000 * (time.perf_counter() - t0) / queries
            if exact is None:
                exact = idx
            out[f"{name}_{kind}_recall_at_10"] = recall_at_k(idx, exact)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=[2000, 10000])
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--k", type=int, nargs="+", default=[1, 20, 100])
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--recall-n", type=int, default=0, help="also measure the similar-images index at this n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/studio.json")
    args = ap.parse_args()
    from carrot.progress import set_quiet

    set_quiet(True)
    import torch

    if args.n:
        rows = [r for n in args.n for h in args.heads for r in measure(n, h, args.k, args.d, args.classes, args.seed)]
        meta = {"args": vars(args), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "threads": torch.get_num_threads(), "torch": torch.__version__}
        print(write_results(args.out, rows, **meta))  # the what-if rows are kept even if the recall part fails
    if args.recall_n:  # into the same file (with --n and nothing else: added to the rows measured before)
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        data["recall"] = recall(args.recall_n, args.d, args.classes, 200, args.seed)
        print(json.dumps(data["recall"]), flush=True)
        print(write_results(args.out, data.pop("rows"), **data))


if __name__ == "__main__":
    main()
