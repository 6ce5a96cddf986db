"""Kernel ridge head against independent oracles: sklearn's kernels, the bordered normal equations solved
directly, and brute-force refits for leave-one-out, removal and the (gamma, lambda) search."""
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics.pairwise import laplacian_kernel, polynomial_kernel, rbf_kernel

from carrot.errors import CarrotError
from carrot.ridge.dual import DualSystem
from carrot.ridge.gram import KERNELS, kernel_matrix
from carrot.ridge.kernel import KernelRidgeHead


def data(seed: int, n: int = 24, d: int = 5, classes: int = 3, weights: bool = False):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    G = rng.normal(size=(n, d)) + y[:, None] * 0.8
    a = rng.uniform(0.2, 2.0, size=n) if weights else None
    if weights:
        a[3] = 0.0  # a zero weight: the image is in the set but not in the fit
    return G, y, a


def bordered(K: np.ndarray, Y: np.ndarray, a: np.ndarray, lam: float):
    """The weighted kernel ridge normal equations with an unpenalised intercept, solved directly:
    A (Y - K alpha - 1 b) = lam alpha, 1^T A (Y - K alpha - 1 b) = 0."""
    n = len(K)
    A = np.diag(a)
    top = np.hstack([A @ K + lam * np.eye(n), A @ np.ones((n, 1))])
    bottom = np.hstack([(np.ones(n) @ A @ K)[None], [[a.sum()]]])
    sol = np.linalg.solve(np.vstack([top, bottom]), np.vstack([A @ Y, (np.ones(n) @ A @ Y)[None]]))
    return sol[:n], sol[n]


@pytest.mark.parametrize("name,oracle", [("rbf", lambda X, Y, g: rbf_kernel(X, Y, gamma=g)),
                                         ("laplacian", lambda X, Y, g: laplacian_kernel(X, Y, gamma=g)),
                                         ("poly", lambda X, Y, g: polynomial_kernel(X, Y, degree=3, gamma=g, coef0=1.0))])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_equal_sklearns(name, oracle, seed):
    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(7, 4)), rng.normal(size=(5, 4))
    assert np.allclose(kernel_matrix(name, X, Y, 0.3).numpy(), oracle(X, Y, 0.3), rtol=1e-12, atol=1e-12)
    K = kernel_matrix(name, X, None, 0.3)
    assert torch.equal(K, K.T) and np.allclose(K.numpy(), oracle(X, X, 0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("seed,weights", [(0, False), (1, True), (2, False)])
def test_the_fit_solves_the_normal_equations(kernel, seed, weights):
    G, y, a = data(seed, weights=weights)
    head = KernelRidgeHead(kernel=kernel, gamma=0.7, lam=0.3, standardize=False).fit(G, y, a)
    K = kernel_matrix(kernel, G, None, 0.7).numpy()
    Y = np.eye(3)[y]
    alpha, b = bordered(K, Y, np.ones(len(y)) if a is None else a, 0.3)
    assert np.allclose(head.dual_coef_.numpy(), alpha, atol=1e-9)
    Gt = np.random.default_rng(seed + 100).normal(size=(6, G.shape[1]))
    f = kernel_matrix(kernel, Gt, G, 0.7).numpy() @ alpha + b
    assert np.allclose(head.decision_function(Gt), f, atol=1e-9)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("seed,weights,standardize", [(0, False, True), (1, True, False), (3, True, True)])
def test_exact_loo_equals_n_brute_force_refits(kernel, seed, weights, standardize):
    G, y, a = data(seed, weights=weights)
    head = KernelRidgeHead(kernel=kernel, gamma=0.5, lam=0.2, standardize=standardize).fit(G, y, a)
    loo = head.system().loo_logits().numpy()
    Z = head.X_fit_.numpy()  # the preprocessing is part of the feature map, fixed at fit
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        ref = KernelRidgeHead(kernel=kernel, gamma=0.5, lam=0.2, standardize=False).fit(
            Z[keep], y[keep], None if a is None else a[keep])
        assert np.allclose(loo[i], ref.decision_function(Z[i : i + 1])[0], atol=1e-9), i


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("seed,weights", [(0, False), (1, True)])
def test_representer_and_equivalent_kernel_identities(kernel, seed, weights):
    G, y, a = data(seed, weights=weights)
    head = KernelRidgeHead(kernel=kernel, gamma=0.5, lam=0.1).fit(G, y, a)
    Gt = np.random.default_rng(seed + 7).normal(size=(9, G.shape[1]))
    f = head.decision_function(Gt)
    for c in range(3):
        terms = (head.system().similarity(Gt) * head.dual_coef_[:, c]).numpy()
        assert np.abs(head.prior_[c].item() + terms.sum(1) - f[:, c]).max() < 1e-9
    L = head.system().equivalent_kernel(Gt).numpy()
    assert np.abs(L @ np.eye(3)[y] - f).max() < 1e-9
    if a is not None:
        assert np.abs(L[:, 3]).max() < 1e-12 and float(head.dual_coef_[3].abs().max()) < 1e-12  # zero weight: no say


@pytest.mark.parametrize("kernel", ["rbf", "laplacian"])
@pytest.mark.parametrize("seed,weights", [(0, False), (1, True)])
def test_removal_equals_a_refit_without_the_images(kernel, seed, weights):
    G, y, a = data(seed, weights=weights)
    head = KernelRidgeHead(kernel=kernel, gamma=0.5, lam=0.1, standardize=False).fit(G, y, a)
    Gt = np.random.default_rng(seed + 9).normal(size=(4, G.shape[1]))
    f = head.decision_function(Gt)
    single = -head.system().removal_effect(Gt, [0, 5, 11]).numpy()  # f - f_-i
    for col, i in enumerate([0, 5, 11]):
        keep = np.arange(len(y)) != i
        ref = KernelRidgeHead(kernel=kernel, gamma=0.5, lam=0.1, standardize=False).fit(G[keep], y[keep], None if a is None else a[keep])
        assert np.allclose(single[:, col], f - ref.decision_function(Gt), atol=1e-9)
    R = [2, 7, 8, 20]
    keep = ~np.isin(np.arange(len(y)), R)
    ref = KernelRidgeHead(kernel=kernel, gamma=0.5, lam=0.1, standardize=False).fit(G[keep], y[keep], None if a is None else a[keep])
    assert np.allclose(head.system().decision_without(Gt, R).numpy(), ref.decision_function(Gt), atol=1e-9)


def test_auto_picks_the_best_pair_by_brute_force_loo():
    G, y, _ = data(4, n=18)
    gammas, lams = (0.1, 1.0, 4.0), (0.01, 0.3, 10.0)
    head = KernelRidgeHead(gamma_grid=gammas, lam_grid=lams, standardize=False).fit(G, y)
    scores = {}
    for g in gammas:
        for lam in lams:
            hits, sq = 0, 0.0
            for i in range(len(y)):
                keep = np.arange(len(y)) != i
                f = KernelRidgeHead(gamma=g, lam=lam, standardize=False).fit(G[keep], y[keep]).decision_function(G[i : i + 1])[0]
                hits += int(f.argmax() == y[i])
                sq += float(((f - np.eye(3)[y[i]]) ** 2).sum())
            scores[(g, lam)] = (-hits, sq, -lam)
    best = min(scores, key=scores.get)
    assert (head.gamma_, head.lam_) == pytest.approx(best)
    assert len(head.loo_path_) == 3 and all(len(p["loo_accuracy"]) == 3 for p in head.loo_path_)


def test_save_load_clone_and_errors(tmp_path):
    G, y, a = data(5, weights=True)
    head = KernelRidgeHead(kernel="laplacian", lam=0.5).fit(G, y, a)
    head.save(tmp_path / "h.safetensors")
    back = KernelRidgeHead.load(tmp_path / "h.safetensors")
    Gt = np.random.default_rng(0).normal(size=(3, G.shape[1]))
    assert np.array_equal(back.decision_function(Gt), head.decision_function(Gt))
    assert np.allclose(back.system().loo_logits().numpy(), head.system().loo_logits().numpy(), atol=1e-10)
    assert clone(head).get_params() == head.get_params()
    for bad, match in [({"kernel": "cosine"}, "kernel: expected one of rbf, laplacian, poly"),
                       ({"gamma": -1.0}, "gamma: expected 'auto' or a finite number > 0"),
                       ({"lam": float("nan")}, "lam: expected"), ({"degree": 0}, "degree: expected an integer"),
                       ({"gamma_grid": ()}, "gamma_grid: expected a non-empty list")]:
        with pytest.raises(CarrotError, match=match):
            KernelRidgeHead(**bad).fit(G, y)
    with pytest.raises(CarrotError, match="G: expected 5 features"):
        head.decision_function(np.zeros((2, 4)))
    with pytest.raises(CarrotError, match="rows: expected training indices"):
        head.system().decision_without(Gt, [999])
    (tmp_path / "h.safetensors").write_bytes(b"garbage")
    with pytest.raises(CarrotError, match="corrupt|unreadable"):
        KernelRidgeHead.load(tmp_path / "h.safetensors")


def test_the_head_registry_loads_either_kind_and_refuses_missing_properties_by_name(tmp_path):
    from carrot.ridge.head import RidgeHead
    from carrot.ridge.heads import HEADS, PROPERTIES, kind_of, load_head, register_head, require

    G, y, _ = data(6)
    for head in (RidgeHead(lam=0.5).fit(G, y), KernelRidgeHead(lam=0.5, gamma=0.3).fit(G, y)):
        head.save(tmp_path / f"{type(head).__name__}.safetensors")
        back = load_head(tmp_path / f"{type(head).__name__}.safetensors")
        assert type(back) is type(head) and np.array_equal(back.decision_function(G), head.decision_function(G))
        assert kind_of(head).cls is type(head)
    require(RidgeHead(), "region_split", "explain")  # the ridge head keeps everything
    assert set(HEADS["ridge"].keeps) == set(PROPERTIES)
    with pytest.raises(CarrotError, match=r"explain: the kernel head has no additive split .* head\.kind: ridge"):
        require(KernelRidgeHead(), "region_split", "explain")
    with pytest.raises(ValueError, match="unknown properties"):
        register_head("x", frozenset({"telepathy"}), "")(RidgeHead)
    (tmp_path / "bad.safetensors.json").write_text('{"format": "carrot.Other"}')
    with pytest.raises(CarrotError, match="expected a head file of format carrot.RidgeHead, carrot.KernelRidgeHead"):
        load_head(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("kernel,weights", [("rbf", False), ("laplacian", True), ("poly", False)])
def test_training_terms_views_sum_to_the_logit_and_removal_is_a_refit(kernel, weights):
    G, y, a = data(7, weights=weights)
    head = KernelRidgeHead(kernel=kernel, gamma=0.4, lam=0.2, standardize=False).fit(G, y, a)
    Gt = np.random.default_rng(3).normal(size=(5, G.shape[1]))
    T = head.system().training_terms(Gt)
    f = head.decision_function(Gt)
    c = f.argmax(1)
    assert np.allclose(T.logit.numpy(), f[np.arange(5), c], atol=1e-12)
    for view in ("equivalent_kernel", "representer"):
        assert np.abs(T.prior.numpy() + getattr(T, view).sum(1).numpy() - T.logit.numpy()).max() < 1e-9
    for i in (1, 10):
        keep = np.arange(len(y)) != i
        ref = KernelRidgeHead(kernel=kernel, gamma=0.4, lam=0.2, standardize=False).fit(G[keep], y[keep], None if a is None else a[keep])
        assert np.allclose(T.removal[:, i].numpy(), ref.decision_function(Gt)[np.arange(5), c] - f[np.arange(5), c], atol=1e-9)


def test_the_exact_dual_beyond_memory_is_refused_or_approximated(monkeypatch):
    import carrot.ridge.kernel as kernel

    from carrot.config import RunConfig
    from carrot.ridge.heads import fit_head

    monkeypatch.setattr(kernel, "_memory", lambda dev: 8 * 9 * 24 * 24)  # too little for the exact dual of n = 24
    G, y, _ = data(0)
    with pytest.raises(CarrotError, match=r"G: the exact kernel head on n = 24 training images holds 10 n x n"):
        KernelRidgeHead(lam=1.0, gamma=1.0, approx="exact").fit(G, y)
    head = KernelRidgeHead(lam=1.0, gamma=1.0, n_landmarks=6).fit(G, y)  # auto: Nystroem, 8 n x m arrays fit
    assert head.approx_ == "nystroem" and head.landmarks_.shape == (6, G.shape[1])
    with pytest.raises(CarrotError, match=r"G: the Nystroem kernel head on n = 24 .* holds 8 n x m \(m = 24 landmarks\)"):
        KernelRidgeHead(lam=1.0, gamma=1.0, approx="nystroem").fit(G, y)
    cfg = {"head": {"kind": "auto", "landmarks": 6}, "device": "cpu"}
    head = fit_head(RunConfig.from_dict(cfg), G, y)  # both fit: the better by exact LOO
    assert head.head_choice_["kernel"] is not None
    head = fit_head(RunConfig.from_dict({**cfg, "head": {"kind": "auto"}}), G, y)  # auto keeps the ridge, says why
    assert type(head).__name__ == "RidgeHead" and "holds 8 n x m" in head.head_choice_["kernel_skipped"]


def test_auto_keeps_the_head_with_the_higher_exact_loo_accuracy():
    from carrot.config import RunConfig
    from carrot.ridge.head import RidgeHead
    from carrot.ridge.heads import fit_head, loo_accuracy

    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(60, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR: no linear head separates it, an RBF kernel does
    cfg = RunConfig.from_dict({"head": {"kind": "auto"}, "device": "cpu"})
    head = fit_head(cfg, X, y)
    assert type(head).__name__ == "KernelRidgeHead" and head.head_choice_["kernel"] > head.head_choice_["ridge"] + 0.2
    Xs = np.vstack([X[y == 0] - 3, X[y == 1] + 3])  # far apart: both are perfect, the tie keeps ridge
    assert type(fit_head(cfg, Xs, np.sort(y))).__name__ == "RidgeHead"
    for h in (RidgeHead(lam=0.3).fit(X, y), KernelRidgeHead(lam=0.3, gamma=2.0, standardize=False).fit(X, y)):  # no search
        hits = 0
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            hits += int(clone(h).fit(X[keep], y[keep]).predict(X[i : i + 1])[0] == y[i])
        assert loo_accuracy(h, X, y) == pytest.approx(hits / len(y))


@pytest.mark.parametrize("weights", [False, True])
def test_loss_change_and_label_review_equal_refits(weights):
    """The index page's harmful / helpful lists and label review for the kernel head, against brute-force refits."""
    G, y, a = data(8, weights=weights)
    head = KernelRidgeHead(gamma=0.6, lam=0.2, standardize=False).fit(G, y, a)
    rng = np.random.default_rng(9)
    Ge, ye = rng.normal(size=(7, G.shape[1])), rng.integers(0, 3, size=7)
    change = head.system().loo_loss_change(Ge, ye).numpy()
    Ye = np.eye(3)[ye]
    base = ((head.decision_function(Ge) - Ye) ** 2).sum()
    for i in (0, 4, 13):
        keep = np.arange(len(y)) != i
        ref = KernelRidgeHead(gamma=0.6, lam=0.2, standardize=False).fit(G[keep], y[keep], None if a is None else a[keep])
        assert change[i] == pytest.approx(((ref.decision_function(Ge) - Ye) ** 2).sum() - base, abs=1e-9)
    scores, T = head.system().loo_cross_entropy()
    loo = np.stack([KernelRidgeHead(gamma=0.6, lam=0.2, standardize=False).fit(
        G[np.arange(len(y)) != i], y[np.arange(len(y)) != i], None if a is None else a[np.arange(len(y)) != i]
    ).decision_function(G[i : i + 1])[0] for i in range(len(y))])
    ref = -torch.log_softmax(torch.as_tensor(loo) / T, 1)[torch.arange(len(y)), torch.as_tensor(y)].numpy()
    active = np.ones(len(y), bool) if a is None else a > 0
    assert np.allclose(scores.numpy()[active], ref[active], atol=1e-8) and T > 0


@pytest.mark.parametrize("name,bad", [("prior", lambda t: t.float()), ("scale_std", lambda t: t[:-1]),
                                      ("dual_coef", lambda t: t * float("nan")), ("X_fit", lambda t: t[:-1])])
def test_a_tampered_kernel_head_is_refused_in_one_line(tmp_path, name, bad):
    from safetensors.torch import load_file, save_file

    G, y, _ = data(2)
    KernelRidgeHead(lam=0.5, gamma=0.5).fit(G, y).save(tmp_path / "h.safetensors")
    t = load_file(str(tmp_path / "h.safetensors"))
    t[name] = bad(t[name]).contiguous()
    save_file(t, str(tmp_path / "h.safetensors"))
    with pytest.raises(CarrotError, match=f"{name} is not a finite float64 array of shape"):
        KernelRidgeHead.load(tmp_path / "h.safetensors")
    (tmp_path / "h.safetensors").unlink()
    with pytest.raises(CarrotError, match="head weights not found"):
        KernelRidgeHead.load(tmp_path / "h.safetensors")


@pytest.mark.parametrize("seed,weights", [(0, False), (1, True), (2, False)])
def test_the_certificate_is_the_greedy_of_brute_force_refits(seed, weights):
    """Each step removes the image whose removal (after the ones already removed) lowers the margin most, as n
    refits would find it; the margins along the way are the refits' own, and the final set changes the class."""
    G, y, a = data(seed, n=18, weights=weights)
    kw = dict(gamma=0.5, lam=0.3, standardize=False)
    head = KernelRidgeHead(**kw).fit(G, y, a)
    Gt = np.random.default_rng(seed + 11).normal(size=(6, G.shape[1])) * 0.3
    x = Gt[np.argmin(np.sort(head.decision_function(Gt), 1)[:, -1] - np.sort(head.decision_function(Gt), 1)[:, -2])]
    cert = head.system().certificate(x, limit=8)
    f0 = head.decision_function(x[None])[0]
    c = int(f0.argmax())
    w = np.ones(len(y)) if a is None else a.copy()

    def refit(removed):
        keep = np.setdiff1d(np.arange(len(y)), removed)
        return KernelRidgeHead(**kw).fit(G[keep], y[keep], w[keep]).decision_function(x[None])[0]

    removed: list[int] = []
    for step, i in enumerate(cert.indices if cert.found else cert.indices[:0]):
        f = refit(removed) if removed else f0
        k = int(np.argmax(np.where(np.arange(3) == c, -np.inf, f)))
        drops = {j: (f[c] - f[k]) - (lambda g: g[c] - g[k])(refit(removed + [j]))
                 for j in range(len(y)) if j not in removed and w[j] > 0}
        assert i == max(drops, key=drops.get)
        removed.append(i)
        g = refit(removed)
        assert cert.path[step] == pytest.approx(g[c] - np.max(np.delete(g, c)), abs=1e-8)
    if cert.found:
        assert int(refit(cert.indices).argmax()) == cert.new_class != c and cert.refit_max_abs_diff < 1e-8


def test_the_debug_loop_with_the_kernel_head_equals_refits():
    from carrot.audit.debugging import debug_loop

    G, y, _ = data(3, n=30)
    rng = np.random.default_rng(4)
    Gv, yv, Gt, yt = rng.normal(size=(9, 5)), np.arange(9) % 3, rng.normal(size=(8, 5)), np.arange(8) % 3
    head = KernelRidgeHead(gamma=0.5, lam=0.2, standardize=False).fit(G, y)
    res = debug_loop(G, y, Gv, yv, Gt, yt, head, ks=(2, 5), n_random=2)
    for row in res["rows"]:
        keep = np.setdiff1d(np.arange(len(y)), row["dropped"])
        ref = KernelRidgeHead(gamma=0.5, lam=0.2, standardize=False).fit(G[keep], y[keep])
        assert row["val_accuracy"] == pytest.approx(float((ref.predict(Gv) == yv).mean()))
        assert row["test_accuracy"] == pytest.approx(float((ref.predict(Gt) == yt).mean()))
    change = head.system().loo_loss_change(Gv, yv).numpy()
    assert res["rows"][0]["dropped"] == np.argsort(change, kind="stable")[:2].tolist()
    down = debug_loop(G, y, Gv, yv, Gt, yt, head, ks=(2, 5), n_random=2, downweight=0.3)
    assert [r["dropped"] for r in down["rows"]] == [r["dropped"] for r in res["rows"]]
    for row in down["rows"]:  # down-weighting: the dual solved again, against a refit with those weights
        a = np.ones(len(y))
        a[row["dropped"]] = 0.3
        ref = KernelRidgeHead(gamma=0.5, lam=0.2, standardize=False).fit(G, y, a)
        assert row["val_accuracy"] == pytest.approx(float((ref.predict(Gv) == yv).mean()))
        assert row["test_accuracy"] == pytest.approx(float((ref.predict(Gt) == yt).mean()))
        system = DualSystem.on_weights(head, head.X_fit_, head.train_targets_, torch.as_tensor(a))
        assert np.allclose(system.decision(Gt).numpy(), ref.decision_function(Gt), atol=1e-9)


def test_the_certificate_keeps_every_class_when_one_loses_its_images():
    """Binary data where the predicted class has one image: removing it leaves one class; the refit check keeps
    both columns (the empty class scores its prior 0) instead of failing to fit a single class."""
    rng = np.random.default_rng(5)
    G = np.vstack([rng.normal(size=(12, 3)), rng.normal(size=(1, 3)) + 4.0])
    y = np.array([0] * 12 + [1])
    head = KernelRidgeHead(gamma=0.3, lam=0.05, standardize=False).fit(G, y)
    x = G[12] + 0.1
    assert head.predict(x[None])[0] == 1
    cert = head.system().certificate(x, limit=5)
    assert cert.found and cert.indices == [12] and cert.new_class == 0
    assert np.isfinite(cert.margin) and cert.margin > 0 and cert.refit_max_abs_diff < 1e-8
    ref = head.system().refit(np.arange(12))
    assert ref.dual_coef.shape == (12, 2) and float(ref.prior[1]) == 0.0


def test_the_attribution_audits_with_the_kernel_head_equal_refits():
    """Faithfulness, LDS and agreement on a kernel head: its counterfactuals against plain fits with 0/1 weights (the
    eigendecomposition path, not the audits' Cholesky and Woodbury), and the LDS recomputed from those fits."""
    from scipy.stats import spearmanr

    from carrot.audit.evaluate import evaluate_embeddings

    G, y, _ = data(5, n=24)
    Gt = np.random.default_rng(6).normal(size=(5, G.shape[1]))
    settings = dict(gamma=0.5, lam=0.2, standardize=False)
    head = KernelRidgeHead(**settings).fit(G, y)

    def fit_on(mask):
        return KernelRidgeHead(**settings).fit(G, y, mask.astype(np.float64)).decision_function(Gt)

    cf = head.system()
    R, S = [1, 4, 9], np.arange(0, 24, 2)
    without, only = np.ones(24, bool), np.zeros(24, bool)
    without[R], only[S] = False, True
    assert np.allclose(cf.decision_without(Gt, R).numpy(), fit_on(without), atol=1e-9)
    assert np.allclose(cf.decision_only(Gt, S).numpy(), fit_on(only), atol=1e-9)
    f = head.decision_function(Gt)
    pred = f.argmax(1)
    support = np.zeros((5, 24))  # f_c(x) - f_-i(x)_c by refits
    for i in range(24):
        mask = np.ones(24, bool)
        mask[i] = False
        support[:, i] = f[np.arange(5), pred] - fit_on(mask)[np.arange(5), pred]
    assert np.allclose(-cf.removal_effect(Gt).numpy()[np.arange(5), :, pred], support, atol=1e-9)
    res = evaluate_embeddings(G, y, Gt, head, ["lds", "agreement", "faithfulness"], ks=(1, 3), n_test=5, n_subsets=6)
    assert set(res["lds"]) == {"exact_loo", "carrot_representer", "carrot_equivalent_kernel", "kernel_similarity"}
    agree = res["agreement_with_exact_loo"]
    assert set(agree) == {"carrot_representer", "carrot_equivalent_kernel", "kernel_similarity"}
    rep = head.system().training_terms(Gt, pred).representer.numpy()
    assert agree["carrot_representer"]["spearman"] == pytest.approx(
        np.mean([spearmanr(rep[x], support[x]).statistic for x in range(5)]), abs=1e-12)
    rng = np.random.default_rng(0)  # the LDS protocol's subsets, refitted here
    masks = np.zeros((6, 24), bool)
    actual = np.zeros((6, 5))
    for j in range(6):
        masks[j, np.sort(rng.choice(np.arange(24), 12, replace=False))] = True
        actual[j] = fit_on(masks[j])[np.arange(5), pred]
    rho = np.nanmean([spearmanr(masks.astype(float) @ support[x], actual[:, x]).statistic for x in range(5)])
    assert res["lds"]["exact_loo"] == pytest.approx(rho, abs=1e-9)
    drops = []
    for x in range(5):  # remove the top image of each test image's exact support: the refit's logit drop
        mask = np.ones(24, bool)
        mask[np.argsort(-support[x], kind="stable")[:1]] = False
        drops.append(f[x, pred[x]] - fit_on(mask)[x, pred[x]])
    assert res["faithfulness"]["exact_loo"]["1"]["remove_top"]["logit_drop"] == pytest.approx(np.mean(drops), abs=1e-9)


def test_refit_holds_the_feature_map_and_every_class():
    G, y, a = data(8, weights=True)
    head = KernelRidgeHead(gamma=0.6, lam=0.25).fit(G, y, a)  # standardised: the map is the head's own
    w = np.random.default_rng(1).uniform(0.2, 2.0, len(y))
    w[y == 2] = 0.0  # a class left with no weight keeps its column
    ref = head.refit(G, y, w)
    Z = head.X_fit_.numpy()
    plain = KernelRidgeHead(gamma=0.6, lam=0.25, standardize=False).fit(Z[w > 0], y[w > 0], w[w > 0])
    Gt = np.random.default_rng(2).normal(size=(4, G.shape[1]))
    zt = head.preprocess(torch.as_tensor(Gt)).numpy()
    assert ref.decision_function(Gt).shape == (4, 3)
    assert np.allclose(ref.decision_function(Gt)[:, :2], plain.decision_function(zt), atol=1e-9)
    assert np.allclose(ref.decision_function(Gt)[:, 2], 0.0, atol=1e-12)
    with pytest.raises(CarrotError, match="y"):
        head.refit(G, np.full(len(y), 7))


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_the_cholesky_loo_path_equals_the_spectrums(low_rank, weights):
    """A few lambdas are searched by one Cholesky each, a grid by one eigendecomposition: the same LOO path, and the
    solver returned solves at the best lambda."""
    from carrot.ridge import dual
    from carrot.ridge.gram import LowRankGram

    G, y, a = data(7, n=30, weights=weights)
    Z = torch.as_tensor(G)
    K = LowRankGram(Z @ torch.as_tensor(np.random.default_rng(0).normal(size=(5, 4)))) if low_rank else \
        kernel_matrix("rbf", Z, Z, 0.3)
    w = torch.ones(len(y), dtype=torch.float64) if a is None else torch.as_tensor(a)
    cg = dual.CentredGram.of(K, w)
    Y = torch.nn.functional.one_hot(torch.as_tensor(y)).double()
    lams = (0.01, 0.5, 3.0)
    path, solver = dual.loo_path(cg, Y, y, lams)
    ref = dual.Spectrum(cg).loo_path(Y, y, lams)
    assert isinstance(solver, dual.CholeskySolve) and solver.lam == ref.best_lambda == path.best_lambda
    assert np.allclose(path.accuracy, ref.accuracy) and np.allclose(path.mse, ref.mse, rtol=1e-10)
    V = cg.s.unsqueeze(1) * (Y - w @ Y / w.sum())
    assert torch.allclose(solver.solve(V, solver.lam), dual.Spectrum(cg).solve(V, solver.lam), atol=1e-10)
    assert torch.allclose(solver.solve(V + 1, solver.lam), dual.Spectrum(cg).solve(V + 1, solver.lam), atol=1e-10)
    assert torch.allclose(solver.mass(solver.lam), dual.Spectrum(cg).mass(solver.lam), atol=1e-10)
    grid = (0.01, 0.1, 0.5, 1.0, 3.0)
    assert isinstance(dual.loo_path(cg, Y, y, grid)[1], dual.Spectrum)


def test_the_inverse_diagonal_from_the_cholesky_factor():
    from carrot.ridge.dual import _inverse_diagonal

    for n in (1, 7, 40):
        A = torch.as_tensor(np.random.default_rng(n).normal(size=(n, n)))
        A = A @ A.T + 0.1 * torch.eye(n, dtype=torch.float64)
        d = _inverse_diagonal(torch.linalg.cholesky(A))
        assert torch.allclose(d, torch.linalg.inv(A).diagonal(), rtol=1e-10)


def test_the_class_stratified_subsample():
    from carrot.ridge.heads import class_stratified_subsample

    y = np.repeat(np.arange(5), [40, 30, 20, 5, 2])
    rows = class_stratified_subsample(y, 30, seed=0)
    counts = np.bincount(y[rows], minlength=5)
    assert len(set(rows)) == len(rows) and np.all(np.diff(rows) > 0) and abs(len(rows) - 30) <= 5
    assert counts.min() >= 2 and counts[0] > counts[2] > counts[3] - 1
    assert np.array_equal(rows, class_stratified_subsample(y, 30, seed=0))
    many = np.repeat(np.arange(100), 3)  # too many classes for two images each: some classes, whole
    rows = class_stratified_subsample(many, 50, seed=1)
    counts = np.bincount(many[rows], minlength=100)
    assert len(rows) == 48 and set(counts) == {0, 3}


def _xor(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 2))
    return X, (X[:, 0] * X[:, 1] > 0).astype(int)


def test_auto_decides_a_costly_search_on_a_subsample(monkeypatch):
    """Above the flop budget the heads meet first on a subsample: a losing kernel head is skipped with the subsample's
    numbers; a winning one is fitted on the whole with the subsample's gamma and three lambdas, and its LOO accuracy
    is the exact one on the whole."""
    import carrot.ridge.heads as heads
    from carrot.config import RunConfig
    from carrot.ridge.heads import fit_head, loo_accuracy

    cfg = RunConfig.from_dict({"head": {"kind": "auto"}, "device": "cpu"})
    X, y = _xor(120)
    assert "kernel_search" not in fit_head(cfg, X, y).head_choice_  # within the budget: the full search
    monkeypatch.setattr(heads, "SEARCH_FLOPS", {"cpu": 1e3, "other": 1e3})
    monkeypatch.setattr(heads, "SUBSAMPLE", 60)
    head = fit_head(cfg, X, y)
    rows = heads.class_stratified_subsample(y, 60, cfg.seed)
    sub = KernelRidgeHead(random_state=cfg.seed, device="cpu").fit(X[rows], y[rows])
    assert type(head).__name__ == "KernelRidgeHead" and head.gamma_ == pytest.approx(sub.gamma_)
    g = len(y) / len(rows)
    lams = [sub.lam_, sub.lam_ * g ** 0.5, sub.lam_ * g]
    assert min(abs(head.lam_ - v) / v for v in lams) < 1e-9
    assert len(head.loo_path_) == 1 and head.loo_path_[0]["lambdas"] == pytest.approx(lams)
    assert head.head_choice_["kernel"] == pytest.approx(loo_accuracy(head, X, y))
    assert "chosen on a class-stratified subsample of 60 images" in head.head_choice_["kernel_search"]
    from carrot.run.operations import head_line

    assert "; the kernel head searched gamma " in head_line(head, head.head_choice_)  # the index page says how
    Xs = np.vstack([X[y == 0] - 3, X[y == 1] + 3])  # both perfect on the subsample: the tie keeps the ridge head
    head = fit_head(cfg, Xs, np.sort(y))
    assert type(head).__name__ == "RidgeHead" and head.head_choice_["kernel"] is None
    assert head.head_choice_["kernel_skipped"].startswith("decided on a class-stratified subsample of 60 images")


@pytest.mark.parametrize("kernel", ["rbf", "laplacian", "poly"])
def test_a_search_shares_the_kernels_base_across_gammas_bitwise(kernel):
    """gram_over computes the distances (inner products) once; every gamma's Gram is kernel_matrix's, bitwise, and
    the kernel of a few rows against the training rows with their kept norms is too."""
    from carrot.ridge.gram import gram_over, kernel_matrix

    X = torch.randn(30, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gammas = [0.1, 0.5, 2.0]
    for K, gamma in zip(gram_over(kernel, X, gammas, 3, 1.0), gammas):
        assert torch.equal(K, kernel_matrix(kernel, X, None, gamma, 3, 1.0))
    Z = X[:4] + 0.01
    assert torch.equal(kernel_matrix(kernel, Z, X, 0.5, y_sq=(X * X).sum(1)), kernel_matrix(kernel, Z, X, 0.5))
