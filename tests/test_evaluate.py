import numpy as np
import pytest
import torch

from carrot.attribution.representer import class_summary, region_pairs
from carrot.ridge.baselines import TracInHead
from carrot.errors import CarrotError
from carrot.audit.evaluate import (
    accuracy_over_seeds, estimator_scores, faithfulness, flip_labels, lds, mislabel_detection, mislabel_scores, rank_agreement,
)
from carrot.audit.compare import compare_predictions
from carrot.ridge.head import RidgeHead


def blobs(n=150, d=10, c=4, seed=0, sep=1.2):
    g = np.random.default_rng(seed)
    means = g.normal(size=(c, d)) * sep
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    yt = g.integers(0, c, 12)
    return means[y] + g.normal(size=(n, d)), y, means[yt] + g.normal(size=(12, d))


def test_flip_labels_flips_exactly():
    y = np.arange(100) % 5
    yn, mask = flip_labels(y, 0.2, 5, seed=1)
    assert mask.sum() == 20 and np.all(yn[mask] != y[mask]) and np.all(yn[~mask] == y[~mask])
    with pytest.raises(CarrotError, match="flip fraction"):
        flip_labels(y, 1.0, 5)


def test_mislabel_detection_finds_flips():
    G, y, _ = blobs(n=300, seed=1, sep=2.0)
    yn, mask = flip_labels(y, 0.1, 4, seed=0)
    scores = mislabel_scores(G, yn, 1.0, tracin={"epochs": 10, "n_checkpoints": 3})
    res = mislabel_detection(scores, mask)
    assert set(res) >= {"carrot_loo_loss", "tracin_self_influence", "train_loss"}
    assert res["carrot_loo_loss"]["roc_auc"] > 0.85
    assert res["carrot_loo_margin"]["found_in_top"]["0.2"] > 0.6
    toy = mislabel_detection({"s": np.array([5.0, 4, 3, 2, 1])}, np.array([True, False, True, False, False]), (0.2, 0.6))
    assert toy["s"]["found_in_top"] == {"0.2": 0.5, "0.6": 1.0}
    assert toy["s"]["roc_auc"] == pytest.approx(5 / 6)


@pytest.fixture(scope="module")
def fitted():
    G, y, Gt = blobs()
    head = RidgeHead(lam=0.5).fit(G, y)
    return G, y, Gt, head, head.system(G, y)


def test_faithfulness_with_exact_scores(fitted):
    G, y, Gt, head, system = fitted
    loo_support, est = estimator_scores(system, G, y, Gt)
    res = faithfulness(system, Gt, loo_support, ks=(1, 10), n_random=2)
    # with the exact LOO support as the ranking, removing the top-1 drops the logit by exactly its max
    assert res["1"]["remove_top"]["logit_drop"] == pytest.approx(loo_support.max(1).mean(), rel=1e-9)
    for k in ("1", "10"):
        r = res[k]
        assert r["remove_top"]["logit_drop"] > r["remove_random"]["logit_drop"] > r["remove_bottom"]["logit_drop"]
    rep = faithfulness(system, Gt, est["carrot_representer"], ks=(10,), n_random=2)["10"]
    assert rep["remove_top"]["logit_drop"] > rep["remove_random"]["logit_drop"]
    assert rep["keep_top"]["logit_drop"] < rep["keep_random"]["logit_drop"]
    with pytest.raises(CarrotError, match="every K < n"):
        faithfulness(system, Gt, loo_support, ks=(len(y),))


def test_lds_and_rank_agreement(fitted):
    G, y, Gt, head, system = fitted
    pred = head.decision_function(Gt).argmax(1)
    loo_support, est = estimator_scores(system, G, y, Gt, TracInHead.fit(G, y, epochs=10, n_checkpoints=3), head.classes_)
    noise = np.random.default_rng(0).normal(size=loo_support.shape)
    scores = lds(system, Gt, pred, {"loo": loo_support, "noise": noise, **est}, n_subsets=30)
    assert scores["loo"] > 0.5 and abs(scores["noise"]) < 0.25
    assert scores["carrot_representer"] > 0.5
    agree = rank_agreement({"same": loo_support, **est}, loo_support)
    assert agree["same"]["spearman"] == pytest.approx(1.0) and agree["same"]["kendall"] == pytest.approx(1.0)
    assert agree["carrot_representer"]["spearman"] > 0.5


def test_class_summary_and_region_pairs(fitted):
    G, y, Gt, head, _ = fitted
    s = class_summary(head.system(G, y), Gt)
    logits = head.decision_function(Gt)
    pred = s["predicted"]
    for c in set(pred.tolist()):
        rows = pred == c
        np.testing.assert_allclose(s["class_flow"][c].sum(), (logits[rows, c] - head.prior_[c].item()).mean(), rtol=1e-9)
    chunked = class_summary(head.system(G, y), Gt, chunk=5)  # streamed over test rows: the same numbers
    np.testing.assert_allclose(chunked["class_flow"], s["class_flow"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunked["total_contribution"], s["total_contribution"], rtol=1e-12, atol=1e-14)
    g = torch.Generator().manual_seed(0)
    Hx, Hi = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    wx, wi = torch.rand(6, generator=g, dtype=torch.float64) / 3, torch.rand(4, generator=g, dtype=torch.float64) / 2
    P = region_pairs(head, Hx, wx, Hi, wi, beta_ic=0.7)
    k = ((Hx.T @ wx - head.feature_mean_) @ (Hi.T @ wi - head.feature_mean_)).item()
    assert P.shape == (6, 4) and P.sum().item() == pytest.approx(0.7 * k, rel=1e-10)


def test_accuracy_over_seeds_is_a_plain_refit_per_seed():
    G, y, _ = blobs(n=120, c=4, seed=3, sep=0.8)
    Gt, yt = G[:40], y[:40]
    G, y = G[40:], y[40:]
    classes = ["a", "b", "c", "d"]
    # no subsample, no resplit: every seed is the same head, which is the one sklearn-style refit gives
    fixed = accuracy_over_seeds(G, y, Gt, yt, 2.0, classes, seeds=(0, 1, 2))
    ref = (RidgeHead(lam=2.0).fit(G, y).predict(Gt) == yt).mean()
    assert fixed["mean"] == pytest.approx(ref) and fixed["std"] == 0.0 and fixed["seeds"] == [0]  # one fit is enough
    # few-shot: seed s trains on the 3 images per class drawn by default_rng(s), in index order
    few = accuracy_over_seeds(G, y, Gt, yt, 2.0, classes, seeds=(0, 1, 2, 3), shots=3)
    accs = []
    for s in (0, 1, 2, 3):
        rng = np.random.default_rng(s)
        keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), 3, replace=False) for c in range(4)]))
        pred = RidgeHead(lam=2.0).fit(G[keep], y[keep]).predict(Gt)
        accs.append((pred == yt).mean())
        per = few["per_seed"][s]
        assert per["n_train"] == 12 and per["accuracy"] == pytest.approx(accs[-1])
    assert few["mean"] == pytest.approx(np.mean(accs)) and few["std"] == pytest.approx(np.std(accs, ddof=1))
    assert few["std"] > 0  # different subsamples, different heads
    assert set(few["per_class"]) == set(classes)
    # resplit: same test share of the pooled rows, stratified, and 'auto' picks lambda per seed
    rs = accuracy_over_seeds(G, y, Gt, yt, "auto", classes, seeds=(0, 1), resplit=True)
    assert all(abs(r["n_test"] - 40) <= 4 for r in rs["per_seed"])
    assert all(r["n_train"] + r["n_test"] == 120 for r in rs["per_seed"])
    with pytest.raises(CarrotError, match="shots: expected at most"):
        accuracy_over_seeds(G, y, Gt, yt, 2.0, classes, shots=1000)
    with pytest.raises(CarrotError, match="seeds: expected at least one"):
        accuracy_over_seeds(G, y, Gt, yt, 2.0, classes, seeds=())


def test_compare_predictions_mcnemar_exact():
    from math import comb

    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    a = np.array([0, 1, 2, 1, 1, 0, 0, 2, 2, 1])  # 6 right
    b = np.array([0, 1, 2, 0, 1, 2, 0, 2, 1, 1])  # fixes rows 3 and 5, breaks row 8
    r = compare_predictions(a, b, y, ["x", "y", "z"])
    assert (r["accuracy_a"], r["accuracy_b"], r["fixed_by_b"], r["broken_by_b"]) == (0.6, 0.7, 2, 1)
    # two-sided exact binomial on 3 discordant pairs: P(X <= 1) + P(X >= 2) under p = 1/2 = 1
    assert r["mcnemar_exact_p"] == pytest.approx(sum(comb(3, k) for k in range(4)) / 8)
    many = compare_predictions(np.zeros(30, int), y.repeat(3), y.repeat(3), ["x", "y", "z"])  # 18 fixed, 0 broken
    assert many["fixed_by_b"] == 18 and many["mcnemar_exact_p"] == pytest.approx(2 * 0.5 ** 18)
    assert r["per_class"]["x"] == {"a": 0.5, "b": 0.75, "change": 0.25}  # rows 0, 3, 6, 9
    with pytest.raises(CarrotError, match="predictions: expected equal 1-D shapes"):
        compare_predictions(a[:3], b, y, ["x", "y", "z"])
