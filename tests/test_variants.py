import numpy as np
import pytest

from carrot.audit.debugging import debug_loop
from carrot.errors import CarrotError
from carrot.audit.evaluate import flip_labels
from carrot.ridge.head import RidgeHead
from carrot.audit.tracin import sample_ids, tracin_report


def blobs(n, d=10, c=4, seed=0):
    """n points from 4 fixed Gaussian classes (the same means for every split)."""
    g = np.random.default_rng(seed)
    means = np.random.default_rng(100).normal(size=(c, d))
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)])
    return means[y] + g.normal(size=(n, d)), y


def test_sample_ids_are_unique():
    assert sample_ids(["a/x.png", "b/x.png", "c/y.png"]) == ["x#0", "x#1", "y"]


def test_tracin_report_structure_and_flags():
    G, y = blobs(200, seed=1)
    yn, mask = flip_labels(y, 0.1, 4, seed=0)
    Gt, yt = blobs(30, seed=2)
    paths = [f"img/{i:04d}.png" for i in range(200)]
    rep = tracin_report(G, yn, paths, ["a", "b", "c", "d"], Gt, yt, [f"t/{i}.png" for i in range(30)], 1.0,
                        n_test=5, flag_fraction=0.1, tracin={"epochs": 10, "n_checkpoints": 5})
    s = rep["summary"]
    assert set(rep["self_influence"]) == set(sample_ids(paths)) and s["n_checkpoints"] == 5
    entry = rep["self_influence"]["0000"]
    assert entry["tracin_self_influence"] == pytest.approx(sum(entry["per_checkpoint"]))
    assert len(rep["influence"]["0000"]) == 5
    q = s["self_influence_quantiles"]
    assert q["q25"] <= q["q50"] <= q["q75"] <= q["q90"]
    flagged = {f["id"] for f in s["flagged_for_review"]}
    assert len(flagged) == 20
    flipped_ids = {sample_ids(paths)[i] for i in np.flatnonzero(mask)}
    assert len(flagged & flipped_ids) >= 8  # high self-influence finds flipped labels
    assert 0 < s["comparison_with_carrot"]["spearman_self_influence_vs_exact_loo_loss"] <= 1


def test_debug_loop_removing_harmful_images_helps_validation():
    G, y = blobs(400, seed=3)
    yn, flipped = flip_labels(y, 0.2, 4, seed=1)
    Gv, yv = blobs(150, seed=4)
    Gt, yt = blobs(1000, seed=5)
    res = debug_loop(G, yn, Gv, yv, Gt, yt, 1.0, ks=(10, 40))
    r40 = res["rows"][1]
    assert r40["val_accuracy"] > res["baseline"]["val_accuracy"]
    assert r40["test_accuracy"] > r40["random_test_accuracy_mean"] + 0.01
    assert flipped[r40["dropped"]].mean() > 0.8  # the harmful images are the flipped ones
    # Woodbury removal equals a refit without those images
    keep = np.setdiff1d(np.arange(400), r40["dropped"])
    ref = RidgeHead(lam=1.0).fit(G[keep], yn[keep])
    assert (ref.predict(Gt) == yt).mean() == pytest.approx(r40["test_accuracy"])
    with pytest.raises(CarrotError, match="downweight"):
        debug_loop(G, yn, Gv, yv, Gt, yt, 1.0, downweight=1.0)
