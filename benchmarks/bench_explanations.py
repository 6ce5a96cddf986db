"""Training-image explanations, measured: carrot's three exact views against the peers through their libraries.

For one fitted run's embeddings and each seed: carrot's ridge head explained by its exact removal effect,
its equivalent-kernel (hat-matrix) terms and its representer terms; a softmax-regression head on the same
(standardised) embeddings explained by traker (TRAK), dattri (explicit influence function, TracIn) and Captum
(TracInCP), each through its documented API and each attributing its own model. Per method: concentration
(top-1 / top-10 share of sum|.|, and sum|.|/|sum| for the additive views), LDS (Spearman over random half
subsets, each retrained exactly), flip rate and output drop after removing the top-K images (retrained;
carrot's by an exact Woodbury downdate, equal to a refit), the wall time of the attribution; for carrot
also the counterfactual-certificate sizes. Outputs: carrot's f_c(x); the peers' margin
z_c - logsumexp_{k != c} z_k (TRAK's output), c the model's predicted class.

    make bench-env && python benchmarks/bench_explanations.py --run runs/demo --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import write_results
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

KS = (1, 5, 10, 50)


def concentration(T: np.ndarray, additive: bool) -> dict[str, float]:
    A = np.abs(T)
    s = A.sum(1)
    top = -np.sort(-A, axis=1)
    out = {"top1_share": float(np.median(top[:, 0] / s)), "top10_share": float(np.median(top[:, :10].sum(1) / s))}
    if additive:
        out["abs_sum_over_sum"] = float(np.median(s / np.abs(T.sum(1))))
    return out


def lds_score(masks: np.ndarray, actual: np.ndarray, tau: np.ndarray) -> float:
    pred = masks.astype(np.float64) @ tau.T  # (subsets, m)
    return float(np.nanmean([spearmanr(pred[:, x], actual[:, x]).statistic for x in range(tau.shape[0])]))


# -- the peers' model: softmax regression on standardised embeddings, full-batch Adam, fixed recipe -----------
class Softmax(torch.nn.Module):
    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


LR = 0.05  # the peers' Adam learning rate, also TracIn's checkpoint weight


def train_softmax(X: torch.Tensor, y: torch.Tensor, c: int, steps: int = 150, lr: float = LR, wd: float = 1e-3,
                  n_ckpt: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = Softmax(X.shape[1], c)
    torch.nn.init.zeros_(model.linear.weight)
    torch.nn.init.zeros_(model.linear.bias)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    ckpts = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        if step % (steps // n_ckpt) == 0:
            ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, ckpts


def margin(model: torch.nn.Module, X: torch.Tensor, c: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        z = model(X)
    zc = z[torch.arange(len(c)), c]
    others = z.clone()
    others[torch.arange(len(c)), c] = -torch.inf
    return (zc - torch.logsumexp(others, 1)).numpy()


@contextmanager
def captum_tracincp(X: torch.Tensor, y: torch.Tensor, ckpts: list, c: int):
    """Captum's TracInCP over the saved training checkpoints (files live while the context is open)."""
    from captum.influence import TracInCP

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for j, ck in enumerate(ckpts):
            paths.append(str(Path(tmp) / f"ck{j}.pt"))
            torch.save(ck, paths[-1])

        def load(m, path):
            m.load_state_dict(torch.load(path, weights_only=True))
            return LR

        yield TracInCP(Softmax(X.shape[1], c), TensorDataset(X, y), checkpoints=paths, checkpoints_load_func=load,
                       loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=256, sample_wise_grads_per_batch=True)


def dattri_task(d: int, c: int, checkpoints):
    """dattri's AttributionTask for the softmax regression's cross-entropy, torch.func style."""
    from dattri.task import AttributionTask

    fmodel = Softmax(d, c)

    def loss_func(params, data):
        x, t = data  # one row (vmapped per-sample gradients) or a batch (the Hessian)
        z = torch.func.functional_call(fmodel, params, x.reshape(-1, x.shape[-1]))
        return torch.nn.functional.cross_entropy(z, t.reshape(-1))

    return AttributionTask(loss_func=loss_func, model=fmodel, checkpoints=checkpoints)


def peer_scores(X: torch.Tensor, y: torch.Tensor, Xt: torch.Tensor, ct: torch.Tensor, model, ckpts, c: int,
                proj_dims: tuple[int, ...]) -> dict[str, tuple[np.ndarray, float]]:
    """(m, n) scores (positive: the training image supports the test output) and seconds, per peer library."""
    from torch.utils.data import DataLoader

    out: dict[str, tuple[np.ndarray, float]] = {}
    n = len(y)
    # traker: TRAK on the final model (one checkpoint), CPU BasicProjector
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    n_params = sum(p.numel() for p in model.parameters())
    for pd in proj_dims:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            # traker 0.3.2 frees a single-block CPU projection matrix after featurizing and does not rebuild it
            # for scoring; a projector of two blocks regenerates each block (same seeded Gaussian JL sketch)
            proj = BasicProjector(grad_dim=n_params, proj_dim=pd, seed=0, proj_type=ProjectionType.normal, device="cpu",
                                  block_size=max(1, pd // 2))
            tr = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=tmp, device="cpu",
                        projector=proj, use_half_precision=False, logging_level=40)
            tr.load_checkpoint(model.state_dict(), model_id=0)
            for s in range(0, n, 256):
                tr.featurize(batch=(X[s : s + 256], y[s : s + 256]), num_samples=len(y[s : s + 256]))
            tr.finalize_features()
            tr.start_scoring_checkpoint(exp_name="bench", checkpoint=model.state_dict(), model_id=0, num_targets=len(ct))
            tr.score(batch=(Xt, ct), num_samples=len(ct))
            scores = tr.finalize_scores(exp_name="bench")
        out[f"traker TRAK (proj_dim {pd})"] = (np.asarray(scores).T, time.perf_counter() - t0)

    # dattri: explicit influence function and TracIn (learning-rate weighted checkpoints)
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.algorithm.tracin import TracInAttributor

    train_loader = DataLoader(TensorDataset(X, y), batch_size=n, shuffle=False)
    test_loader = DataLoader(TensorDataset(Xt, ct), batch_size=len(ct), shuffle=False)
    for reg in (1e-3,):
        t0 = time.perf_counter()
        att = IFAttributorExplicit(task=dattri_task(X.shape[1], c, model.state_dict()), regularization=reg)
        att.cache(train_loader)
        s = att.attribute(train_loader, test_loader)
        out[f"dattri IF explicit (reg {reg:g})"] = (s.detach().numpy().T, time.perf_counter() - t0)
    t0 = time.perf_counter()
    att = TracInAttributor(task=dattri_task(X.shape[1], c, ckpts), weight_list=torch.full((len(ckpts),), LR), normalized_grad=False,
                           projector_kwargs={"proj_dim": 512, "device": "cpu"})
    s = att.attribute(DataLoader(TensorDataset(X, y), batch_size=256, shuffle=False), test_loader)
    out["dattri TracIn"] = (s.detach().numpy().T, time.perf_counter() - t0)

    # Captum TracInCP over the saved checkpoints
    t0 = time.perf_counter()
    with captum_tracincp(X, y, ckpts, c) as tc:
        s = tc.influence((Xt, ct), show_progress=False)
    out["Captum TracInCP"] = (s.detach().numpy(), time.perf_counter() - t0)
    return out


def run_seed(G, y, Gt_all, head, seed: int, n_test: int, n_subsets: int, n_flip: int, cert_limit: int,
             proj_dims: tuple[int, ...]) -> list[dict]:

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(Gt_all), min(n_test, len(Gt_all)), replace=False))
    Gt = Gt_all[rows]
    n = len(y)
    masks = np.zeros((n_subsets, n), dtype=bool)
    for j in range(n_subsets):
        masks[j, rng.choice(n, n // 2, replace=False)] = True
    flip_rows = np.arange(min(n_flip, len(rows)))
    results = []

    # carrot: the run's head and its three exact views
    system = head.system(G, y)
    t0 = time.perf_counter()
    terms = system.training_terms(Gt)
    t_terms = (time.perf_counter() - t0) / len(rows)
    pred = system.decision(Gt).argmax(1)
    views = {"carrot exact removal (default)": (-terms.removal).numpy(),
             "carrot equivalent kernel": terms.equivalent_kernel.numpy(),
             "carrot representer": terms.representer.numpy()}
    actual = np.stack([system.refit(np.flatnonzero(mk)).decision(Gt)[torch.arange(len(rows)), pred].numpy() for mk in masks])
    F = system.decision(Gt)
    X = system.augment(Gt)
    certs = [system.certificate(g, cert_limit) for g in Gt]
    sizes = [len(c.indices) if c.found else None for c in certs]
    for name, T in views.items():
        row = {"seed": seed, "method": name, "model": "carrot ridge head", "library": "carrot",
               "seconds_per_image": t_terms, **concentration(T, additive="removal" not in name),
               "lds": lds_score(masks, actual, T)}
        for k in KS:
            drops, flips = [], []
            for x in flip_rows:
                idx = np.argsort(-T[x], kind="stable")[:k]
                f = X[x] @ system.updated_theta(idx)  # exact (Woodbury = refit)
                c = int(pred[x])
                drops.append(float(F[x, c] - f[c]))
                flips.append(int(f.argmax()) != c)
            row[f"drop_top{k}"], row[f"flip_top{k}"] = float(np.mean(drops)), float(np.mean(flips))
        if "removal" in name:
            known = [s for s in sizes if s is not None]
            row.update(certificate_found=len(known), certificate_n=len(sizes),
                       certificate_median=float(np.median(known)) if known else None,
                       certificate_seconds=float(np.median([c.seconds for c in certs])))
        results.append(row)
        print(row, file=sys.stderr)

    # the peers: softmax regression on standardised embeddings
    mu, sd = G.mean(0), G.std(0) + 1e-8
    Xs = torch.as_tensor((G - mu) / sd, dtype=torch.float32)
    Xts = torch.as_tensor((Gt - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor(np.searchsorted(head.classes_, y))
    C = len(head.classes_)
    model, ckpts = train_softmax(Xs, yt, C, seed=seed)
    with torch.no_grad():
        ct = model(Xts).argmax(1)
    base = margin(model, Xts, ct)
    actual_p = np.stack([margin(train_softmax(Xs[mk], yt[mk], C, seed=seed)[0], Xts, ct) for mk in masks])
    for name, (T, secs) in peer_scores(Xs, yt, Xts, ct, model, ckpts, C, proj_dims).items():
        row = {"seed": seed, "method": name, "model": "softmax regression", "library": name.split()[0],
               "seconds_per_image": secs / len(rows), **concentration(T, additive=False), "lds": lds_score(masks, actual_p, T)}
        for k in KS:
            drops, flips = [], []
            for x in flip_rows:
                keep = np.setdiff1d(np.arange(n), np.argsort(-T[x], kind="stable")[:k])
                m2 = train_softmax(Xs[keep], yt[keep], C, seed=seed)[0]
                drops.append(float(base[x] - margin(m2, Xts[x : x + 1], ct[x : x + 1])[0]))
                with torch.no_grad():
                    flips.append(int(m2(Xts[x : x + 1]).argmax()) != int(ct[x]))
            row[f"drop_top{k}"], row[f"flip_top{k}"] = float(np.mean(drops)), float(np.mean(flips))
        results.append(row)
        print(row, file=sys.stderr)
    return results


def mislabel_rows(G, y, head, seed: int, fraction: float = 0.1) -> list[dict]:
    """Label review: flip ``fraction`` of the training labels; ROC-AUC of each score at finding them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler
    from torch.utils.data import DataLoader

    from carrot.audit.evaluate import flip_labels
    from carrot.ridge.head import frozen_clone

    C = len(head.classes_)
    yn, flipped = flip_labels(y, fraction, C, seed)
    rows = []

    def add(method, library, score, seconds):
        rows.append({"seed": seed, "method": method, "library": library, "roc_auc": float(roc_auc_score(flipped, score)),
                     "seconds": seconds})

    t0 = time.perf_counter()
    system = frozen_clone(head).fit(G, yn).system(G, yn)
    loo = system.loo_logits()
    ce, _ = system.loo_cross_entropy(loo)
    t = time.perf_counter() - t0
    add("carrot exact LOO cross-entropy, calibrated (label review)", "carrot", ce.numpy(), t)
    add("carrot exact LOO squared loss", "carrot", ((loo - system.Y) ** 2).sum(1).numpy(), t)
    Xs_np = StandardScaler().fit_transform(G)
    for Cr in (0.1, 1.0):
        t0 = time.perf_counter()
        lr = LogisticRegression(C=Cr, max_iter=3000).fit(Xs_np, yn)
        p = lr.predict_proba(Xs_np)[np.arange(len(yn)), np.searchsorted(lr.classes_, yn)]
        add(f"plain loss, sklearn LogisticRegression (C = {Cr:g})", "sklearn", -np.log(p), time.perf_counter() - t0)
    Xs = torch.as_tensor(Xs_np, dtype=torch.float32)
    yt = torch.as_tensor(np.searchsorted(head.classes_, yn))
    model, ckpts = train_softmax(Xs, yt, C, seed=seed)
    t0 = time.perf_counter()
    with captum_tracincp(Xs, yt, ckpts, C) as tc:
        add("Captum TracInCP self-influence", "Captum", tc.self_influence(show_progress=False).detach().numpy(),
            time.perf_counter() - t0)
    from dattri.algorithm.influence_function import IFAttributorExplicit

    t0 = time.perf_counter()
    att = IFAttributorExplicit(task=dattri_task(Xs.shape[1], C, model.state_dict()), regularization=1e-3)
    loader = DataLoader(TensorDataset(Xs, yt), batch_size=len(yt), shuffle=False)
    att.cache(loader)
    add("dattri IF explicit self-influence", "dattri", att.self_attribute(loader).detach().numpy(), time.perf_counter() - t0)
    for r in rows:
        print(r, file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a fitted run directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--n-flip", type=int, default=20, help="test images whose top-K removal is retrained")
    ap.add_argument("--certificate-limit", type=int, default=50)
    ap.add_argument("--proj-dims", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--skip-attribution", action="store_true", help="only the label-review part")
    ap.add_argument("--out", default=None, help="default: results/explanations_<data>_<backbone>")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from carrot.run.pipeline import Carrot

    model = Carrot.load(a.run)
    y = np.array([r.label for r in model.train_records_])
    a.out = a.out or str(Path(__file__).parent / "results" / f"explanations_{model.config.data.kind}_{model.config.backbone.name}")
    rows, label_rows = [], []
    for seed in a.seeds:
        label_rows += mislabel_rows(model.train_embeddings_, y, model.head_, seed)
        rows += [] if a.skip_attribution else run_seed(model.train_embeddings_, y, model.test_embeddings_, model.head_, seed, a.n_test, a.subsets,
                         a.n_flip, a.certificate_limit, tuple(a.proj_dims))
    meta = {"run": str(Path(a.run).resolve()), "backbone": model.config.backbone.name, "data": model.config.data.kind,
            "n_train": len(y), "lam": model.head_.lam_, "machine": platform.platform(), "torch": torch.__version__,
            "args": vars(a)}
    print(write_results(a.out, rows, meta=meta, label_review=label_rows))


if __name__ == "__main__":
    main()
