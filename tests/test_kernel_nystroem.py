"""The Nystroem kernel head (the large-n path) against independent oracles: sklearn's Nystroem features and sklearn's
Ridge on them (the approximate model it explains), brute-force refits for leave-one-out and removal, finite
differences for the RRO weight gradient, and the exact head when every training image is a landmark."""
import json

import numpy as np
import pytest
import torch
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import Ridge

import carrot.ridge.kernel as kmod
from carrot.errors import CarrotError
from carrot.ridge.dual import DualSystem
from carrot.ridge.gram import LowRankGram
from carrot.ridge.kernel import KernelRidgeHead

SK_KERNEL = {"rbf": "rbf", "laplacian": "laplacian", "poly": "polynomial"}


def data(seed: int, n: int = 40, d: int = 5, classes: int = 3, weights: bool = False):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    G = rng.normal(size=(n, d)) + y[:, None] * 0.7
    a = rng.uniform(0.2, 2.0, size=n) if weights else None
    if weights:
        a[5] = 0.0  # in the set, not in the fit (and never a landmark)
    return G, y, a


def sk_features(head: KernelRidgeHead, Z: np.ndarray, a: np.ndarray | None) -> Nystroem:
    """sklearn's own Nystroem on the head's preprocessed training rows of weight > 0 (same seed, same landmarks)."""
    rows = Z if a is None else Z[a > 0]
    return Nystroem(kernel=SK_KERNEL[head.kernel], gamma=head.gamma_, degree=head.degree, coef0=head.coef0,
                    n_components=len(head.landmarks_), random_state=head.random_state).fit(rows)


def sk_ridge(F: np.ndarray, y: np.ndarray, a: np.ndarray | None, lam: float, classes: int = 3) -> Ridge:
    """Weighted ridge with an unpenalised intercept on features F and one-hot targets: the head's model."""
    return Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(F, np.eye(classes)[y], sample_weight=a)


@pytest.mark.parametrize("kernel", ["rbf", "laplacian", "poly"])
@pytest.mark.parametrize("seed,weights,m", [(0, False, 8), (1, True, 12), (2, False, 20)])
def test_the_head_is_sklearns_ridge_on_sklearns_nystroem_features(kernel, seed, weights, m):
    G, y, a = data(seed, weights=weights)
    head = KernelRidgeHead(kernel=kernel, gamma=0.6, lam=0.3, approx="nystroem", n_landmarks=m, random_state=seed).fit(G, y, a)
    Z = head.X_fit_.numpy()
    ny = sk_features(head, Z, a)
    assert np.allclose(head.landmarks_.numpy(), ny.components_, atol=0)
    Gt = np.random.default_rng(seed + 50).normal(size=(7, G.shape[1]))
    Zt = head.preprocess(torch.as_tensor(Gt)).numpy()
    assert np.allclose(head.phi(torch.as_tensor(Zt)).numpy(), ny.transform(Zt), rtol=1e-10, atol=1e-10)
    ridge = sk_ridge(ny.transform(Z), y, a, 0.3)
    assert np.allclose(head.decision_function(Gt), ridge.predict(ny.transform(Zt)), atol=1e-8)
    # the training-image identities hold for this model: representer + prior = logit, the kernel is phi . phi
    T = head.system().training_terms(Gt)
    assert torch.allclose(T.representer.sum(1) + T.prior, T.logit, atol=1e-9)
    assert torch.allclose(T.equivalent_kernel.sum(1) + T.prior, T.logit, atol=1e-9)
    k = (head.phi(torch.as_tensor(Zt)) @ head.train_gram().F.T).numpy()
    assert np.allclose(k, ny.transform(Zt) @ ny.transform(Z).T, atol=1e-9)


def test_every_training_image_a_landmark_is_the_exact_head():
    G, y, _ = data(3, n=30)
    exact = KernelRidgeHead(gamma=0.8, lam=0.5).fit(G, y)
    ny = KernelRidgeHead(gamma=0.8, lam=0.5, approx="nystroem", n_landmarks=500).fit(G, y)  # m = min(500, n)
    assert exact.approx_ == "exact" and ny.approx_ == "nystroem" and len(ny.landmarks_) == 30
    Gt = np.random.default_rng(0).normal(size=(6, G.shape[1]))
    assert np.allclose(ny.decision_function(Gt), exact.decision_function(Gt), atol=1e-6)
    assert torch.allclose(ny.system().loo_logits(), exact.system().loo_logits(), atol=1e-6)


@pytest.mark.parametrize("seed,weights", [(0, False), (1, True)])
def test_exact_loo_and_removal_equal_brute_force_refits_of_the_approximate_model(seed, weights):
    G, y, a = data(seed, weights=weights)
    head = KernelRidgeHead(gamma=0.5, lam=0.2, approx="nystroem", n_landmarks=10).fit(G, y, a)
    Z = head.X_fit_.numpy()
    F = sk_features(head, Z, a).transform(Z)  # the feature map is held: refits change the rows, not the landmarks
    w = np.ones(len(y)) if a is None else a
    loo = head.system().loo_logits().numpy()
    Gt = np.random.default_rng(seed + 9).normal(size=(4, G.shape[1]))
    Ft = sk_features(head, Z, a).transform(head.preprocess(torch.as_tensor(Gt)).numpy())
    f = head.decision_function(Gt)
    effect = -head.system().removal_effect(Gt).numpy()  # (m, n, C) f - f_-i
    for i in range(len(y)):
        if w[i] == 0:
            continue
        keep = np.arange(len(y)) != i
        ref = sk_ridge(F[keep], y[keep], w[keep], 0.2)
        assert np.allclose(loo[i], ref.predict(F[i : i + 1])[0], atol=1e-8)
        assert np.allclose(effect[:, i], f - ref.predict(Ft), atol=1e-8)
    rows = [0, 4, 7, 11]
    keep = np.setdiff1d(np.arange(len(y)), rows)
    ref = sk_ridge(F[keep], y[keep], w[keep], 0.2)
    assert np.allclose(head.system().decision_without(Gt, rows).numpy(), ref.predict(Ft), atol=1e-8)  # block Woodbury
    only = [1, 2, 3, 6, 8, 9, 13, 17, 21]
    ref = sk_ridge(F[only], y[only], w[only], 0.2)
    assert np.allclose(head.system().decision_only(Gt, only).numpy(), ref.predict(Ft), atol=1e-8)
    assert np.allclose(head.system().refit(keep).decision(Gt), head.system().decision_without(Gt, rows).numpy(), atol=1e-8)


def test_the_weighted_dual_and_its_gradient_on_the_factored_gram():
    G, y, _ = data(4)
    head = KernelRidgeHead(gamma=0.5, lam=0.2, approx="nystroem", n_landmarks=9).fit(G, y)
    Z = head.X_fit_
    F = sk_features(head, Z.numpy(), None).transform(Z.numpy())
    a = torch.as_tensor(np.random.default_rng(1).uniform(0.3, 1.7, len(y)))
    Y = torch.as_tensor(np.eye(3)[y])
    system = DualSystem.on_weights(head, Z, Y, a)
    assert isinstance(system.train_gram(), LowRankGram)
    Gv = np.random.default_rng(2).normal(size=(5, G.shape[1]))
    Fv = sk_features(head, Z.numpy(), None).transform(head.preprocess(torch.as_tensor(Gv)).numpy())
    assert np.allclose(system.decision(Gv).numpy(), sk_ridge(F, y, a.numpy(), 0.2).predict(Fv), atol=1e-8)
    dF = torch.as_tensor(np.random.default_rng(3).normal(size=(5, 3)))
    grad = system.weight_gradient(Gv, dF).numpy()

    def loss(w: np.ndarray) -> float:
        return float((sk_ridge(F, y, w, 0.2).predict(Fv) * dF.numpy()).sum())

    eps = 1e-6
    for i in (0, 7, 19):
        e = np.zeros(len(y))
        e[i] = eps
        fd = (loss(a.numpy() + e) - loss(a.numpy() - e)) / (2 * eps)
        assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_the_certificate_of_the_approximate_model_is_verified_by_a_refit():
    G, y, _ = data(5, n=36)
    head = KernelRidgeHead(gamma=0.5, lam=0.5, approx="nystroem", n_landmarks=10).fit(G, y)
    Z = head.X_fit_.numpy()
    F = sk_features(head, Z, None).transform(Z)
    x = (G[y == 0].mean(0) + G[y == 1].mean(0)) / 2  # near a boundary: a few removals flip it
    cert = head.system().certificate(x, limit=20)
    assert cert.found and cert.indices and cert.refit_max_abs_diff < 1e-8
    keep = np.setdiff1d(np.arange(len(y)), cert.indices)
    fx = sk_features(head, Z, None).transform(head.preprocess(torch.as_tensor(x[None])).numpy())
    refit = sk_ridge(F[keep], y[keep], None, 0.5).predict(fx)[0]
    c = int(head.decision_function(x[None])[0].argmax())
    assert int(refit.argmax()) == cert.new_class != c
    assert cert.margin == pytest.approx(refit[cert.new_class] - refit[c], abs=1e-8)


def test_auto_switches_to_nystroem_above_the_documented_n(monkeypatch):
    G, y, _ = data(6, n=40)
    monkeypatch.setattr(kmod, "NYSTROEM_ABOVE", 39)
    head = KernelRidgeHead(n_landmarks=12).fit(G, y)  # gamma and lambda 'auto': one LOO search over the factored Gram
    assert head.approx_ == "nystroem" and len(head.loo_path_) == len(kmod.GAMMA_MULTIPLIERS)
    Z = head.X_fit_.numpy()
    F = sk_features(head, Z, None).transform(Z)
    hits = sum(int(sk_ridge(F[np.arange(40) != i], y[np.arange(40) != i], None, head.lam_).predict(F[i : i + 1])[0].argmax()
                   == y[i]) for i in range(40))
    chosen = [p for p in head.loo_path_ if p["gamma"] == head.gamma_][0]
    assert max(chosen["loo_accuracy"]) == pytest.approx(hits / 40)
    monkeypatch.setattr(kmod, "NYSTROEM_ABOVE", 40)
    assert KernelRidgeHead(n_landmarks=12).fit(G, y).approx_ == "exact"


def test_save_load_round_trip_and_refusals(tmp_path):
    G, y, a = data(7, weights=True)
    head = KernelRidgeHead(kernel="laplacian", gamma=0.4, lam=0.3, approx="nystroem", n_landmarks=11).fit(G, y, a)
    head.save(tmp_path / "h")
    back = KernelRidgeHead.load(tmp_path / "h")
    Gt = np.random.default_rng(0).normal(size=(5, G.shape[1]))
    assert back.approx_ == "nystroem" and np.array_equal(back.decision_function(Gt), head.decision_function(Gt))
    assert torch.allclose(back.system().loo_logits(), head.system().loo_logits(), atol=1e-12)
    meta = json.loads((tmp_path / "h.json").read_text())
    assert meta["version"] == 2 and meta["approx_"] == "nystroem" and meta["params"]["n_landmarks"] == 11
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "h"))
    save_file({**t, "landmarks": t["landmarks"][:, :2].contiguous()}, str(tmp_path / "bad"))
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    with pytest.raises(CarrotError, match=r"landmarks is not a finite float64 array of shape \(11, 5\)"):
        KernelRidgeHead.load(tmp_path / "bad")
    (tmp_path / "bad.json").write_text(json.dumps({**meta, "approx_": "sketch"}))
    with pytest.raises(CarrotError, match="approx_ must be exact or nystroem, got 'sketch'"):
        KernelRidgeHead.load(tmp_path / "bad")
    exact = KernelRidgeHead(gamma=0.4, lam=0.3, approx="exact").fit(G, y)  # a version 1 file: the exact dual
    exact.save(tmp_path / "v1")
    old = json.loads((tmp_path / "v1.json").read_text())
    old.pop("approx_")
    for k in ("approx", "n_landmarks", "random_state"):
        old["params"].pop(k)
    (tmp_path / "v1.json").write_text(json.dumps({**old, "version": 1}))
    v1 = KernelRidgeHead.load(tmp_path / "v1")
    assert v1.approx_ == v1.approx == "exact"  # its clones stay exact whatever n
    assert np.allclose(v1.decision_function(Gt), exact.decision_function(Gt), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,value,match", [("approx", "svd", "approx: expected one of auto, exact, nystroem, got 'svd'"),
                                              ("n_landmarks", 0, "n_landmarks: expected a positive integer, got 0"),
                                              ("random_state", -1, "random_state: expected an integer >= 0, got -1")])
def test_bad_settings_are_refused_by_name(name, value, match):
    G, y, _ = data(0)
    with pytest.raises(CarrotError, match=match):
        KernelRidgeHead(**{name: value}).fit(G, y)


@pytest.mark.parametrize("key,value,match", [("approx", "svd", "head.approx: expected auto, exact, nystroem, got 'svd'"),
                                             ("landmarks", 0, r"head.landmarks: expected an integer in \[1, 65536\], got 0")])
def test_head_approx_config_keys_are_checked(key, value, match):
    from carrot.config import RunConfig

    with pytest.raises(CarrotError, match=match):
        RunConfig.from_dict({"head": {key: value}})


def test_the_cli_flags_set_the_approximation():
    from carrot.cli import build_config
    from carrot.ridge.heads import head_from_config

    cfg = build_config(None, head="kernel", kernel_approx="nystroem", landmarks=64, seed=3)
    assert (cfg.head.approx, cfg.head.landmarks) == ("nystroem", 64)
    head = head_from_config(cfg)
    assert (head.approx, head.n_landmarks, head.random_state) == ("nystroem", 64, 3)
    assert build_config(None).head.approx == "auto" and build_config(None).head.landmarks == kmod.N_LANDMARKS


def test_an_audit_clone_refits_the_same_approximation():
    from carrot.ridge.head import frozen_clone

    G, y, _ = data(8)
    head = KernelRidgeHead(gamma=0.5, lam="auto", approx="auto", n_landmarks=10)
    kmod_above = kmod.NYSTROEM_ABOVE
    try:
        kmod.NYSTROEM_ABOVE = 20  # n = 40: auto takes Nystroem
        head.fit(G, y)
    finally:
        kmod.NYSTROEM_ABOVE = kmod_above
    clone = frozen_clone(head)
    assert head.approx_ == "nystroem" and (clone.approx, clone.lam, clone.gamma) == ("nystroem", head.lam_, 0.5)
    assert clone.fit(G[:30], y[:30]).approx_ == "nystroem"  # 30 images, under the default threshold: still Nystroem


@pytest.mark.parametrize("linear", [False, True])
def test_removal_effects_are_blocked_over_test_images_and_equal_refits(monkeypatch, linear):
    """The audits' (m, n) LOO effects come a block of test images at a time (memory bounded at large n); every block
    size gives the refit values."""
    import carrot.audit.evaluate as ev
    from carrot.ridge.head import RidgeHead

    G, y, _ = data(9)
    Gt = np.random.default_rng(1).normal(size=(5, G.shape[1]))
    if linear:
        head = RidgeHead(lam=0.5).fit(G, y)
        system = head.system(G, y)
    else:
        head = KernelRidgeHead(gamma=0.5, lam=0.2, approx="nystroem", n_landmarks=10).fit(G, y)
        system = head.system()
    classes = head.decision_function(Gt).argmax(1)
    whole = ev.removal_effects(system, Gt, classes)
    monkeypatch.setattr(ev, "EFFECT_BLOCK", 2 * len(y) * 3)  # two test images a block
    blocked = ev.removal_effects(system, Gt, classes)
    assert blocked.shape == (5, len(y)) and np.allclose(blocked, whole, atol=1e-12)
    i = 7
    keep = np.arange(len(y)) != i
    if linear:
        ref = RidgeHead(lam=0.5).fit(G[keep], y[keep]).decision_function(Gt)
    else:
        Z = head.X_fit_.numpy()
        F = sk_features(head, Z, None).transform(Z)
        ref = sk_ridge(F[keep], y[keep], None, 0.2).predict(sk_features(head, Z, None).transform(
            head.preprocess(torch.as_tensor(Gt)).numpy()))
    f = head.decision_function(Gt)
    assert np.allclose(blocked[:, i], (ref - f)[np.arange(5), classes], atol=1e-8)
