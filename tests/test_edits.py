"""The exact what-if of a training-set edit (carrot.ridge.edits) against a refit on the edited data, for every head."""
import numpy as np
import pytest
import torch

from carrot.errors import CarrotError
from carrot.ridge.edits import Edits, WhatIf
from carrot.ridge.head import RidgeHead
from carrot.ridge.kernel import KernelRidgeHead
from carrot.validation import index_labels

HEADS = {
    "ridge-primal": lambda: RidgeHead(lam=0.7),
    "ridge-dual": lambda: RidgeHead(lam=0.7, solver="dual"),
    "ridge-no-intercept": lambda: RidgeHead(lam=0.7, fit_intercept=False),
    "kernel-exact": lambda: KernelRidgeHead(gamma=0.3, lam=0.5, approx="exact"),
    "kernel-nystroem": lambda: KernelRidgeHead(gamma=0.3, lam=0.5, approx="nystroem", n_landmarks=9),
}


def problem(seed: int, n: int, d: int, C: int):
    g = np.random.default_rng(seed)
    y = np.arange(n) % C
    G = g.normal(size=(n, d)) + 1.5 * np.eye(C, d)[y]
    return G, y, g.normal(size=(7, d)), g


def random_actions(g, n: int, C: int, k: int) -> list[dict]:
    acts = []
    for i in g.choice(n, size=k, replace=False).tolist():
        what = ("remove", "relabel", "weight")[int(g.integers(3))]
        acts.append({"index": i, "action": what, **({"to": int(g.integers(C))} if what == "relabel" else {}),
                     **({"weight": float(g.uniform(0, 3))} if what == "weight" else {})})
    return acts


def refit(head, G, y, a, G_test):
    """Logits (m, C) of a plain refit on the edited data in the head's class columns (an emptied class: 0), and the
    refit's exact LOO logits (n, C) likewise."""
    ref = head.refit(G, y, a)
    cols = index_labels(head.classes_, ref.classes_)
    F = torch.zeros(len(G_test), len(head.classes_), dtype=torch.float64)
    F[:, cols] = torch.as_tensor(ref.decision_function(G_test))
    loo = torch.zeros(len(G), len(head.classes_), dtype=torch.float64)
    loo[:, cols] = ref.system(G, y, a).loo_logits() if isinstance(ref, RidgeHead) else ref.system().loo_logits()
    return F, loo


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("seed,n,d,C,k", [(0, 14, 5, 2, 1), (1, 30, 8, 3, 4), (2, 24, 40, 4, 7), (3, 45, 6, 5, 12)])
def test_edit_equals_refit(kind, seed, n, d, C, k):
    G, y, G_test, g = problem(seed, n, d, C)
    head = HEADS[kind]().fit(G, y)
    system = head.system(G, y) if isinstance(head, RidgeHead) else head.system()
    what_if = WhatIf(system, G_test)
    for trial in range(3):
        edits = Edits.of(system, random_actions(g, n, C, k))
        res = what_if(edits)
        a, y_new = edits.applied(system)
        F, loo = refit(head, G, head.classes_[y_new], a, G_test)
        scale = 1 + float(F.abs().max())
        assert (res.logits - F).abs().max() <= 1e-9 * scale, kind
        live = torch.as_tensor(a > 0)
        assert (res.loo_logits()[live] - loo[live]).abs().max() <= 1e-8 * scale, kind
        assert torch.equal(res.a, torch.as_tensor(a)) and torch.equal(res.Y.argmax(1), torch.as_tensor(y_new))


def test_no_edit_and_relabel_only_are_the_system():
    G, y, G_test, g = problem(4, 20, 6, 3)
    head = RidgeHead(lam=1.0).fit(G, y)
    system = head.system(G, y)
    what_if = WhatIf(system, G_test)
    res = what_if(Edits.of(system, []))
    assert torch.equal(res.logits, system.decision(G_test)) and torch.allclose(res.loo_logits(), system.loo_logits())
    res = what_if(Edits.of(system, [{"index": 3, "action": "relabel", "to": int(y[3])}]))  # to its own label
    assert torch.allclose(res.logits, system.decision(G_test), atol=1e-14)
    scores, _ = res.label_review()
    ref, _ = system.loo_cross_entropy()
    assert torch.allclose(scores, ref, atol=1e-10)


def test_edits_refused_by_name():
    G, y, _, _ = problem(5, 12, 4, 2)
    system = RidgeHead(lam=1.0).fit(G, y).system(G, y)
    bad = [([{"index": 12, "action": "remove"}], "index"), ([{"index": 1, "action": "drop"}], "action"),
           ([{"index": 1, "action": "relabel", "to": 2}], "to"), ([{"index": 1, "action": "weight", "weight": -1}], "weight"),
           ([{"index": 1, "action": "remove"}, {"index": 1, "action": "remove"}], "twice"), ({"index": 1}, "list"),
           ([{"index": True, "action": "remove"}], "index")]
    for acts, word in bad:
        with pytest.raises(CarrotError, match=word):
            Edits.of(system, acts)
    with pytest.raises(CarrotError, match="none with weight"):
        WhatIf(system, G)(Edits.of(system, [{"index": i, "action": "remove"} for i in range(12)]))


def test_weight_zero_rows_whole_classes_and_refusals():
    """Rows of weight 0 in the fit, a whole class removed, removed rows' leverage 0; relabelling a class away and
    duplicate rows refused by name."""
    G, y, G_test, g = problem(6, 24, 5, 3)
    a0 = np.ones(24)
    a0[[2, 9]] = 0  # out of the model from the start
    head = RidgeHead(lam=0.5).fit(G, y, a0)
    system = head.system(G, y, a0)
    what_if = WhatIf(system, G_test)
    whole = [i for i in range(24) if y[i] == 1 and a0[i] > 0]
    acts = [{"index": i, "action": "remove"} for i in whole] + [{"index": 2, "action": "relabel", "to": 0},
                                                               {"index": 3, "action": "weight", "weight": 3.0}]
    edits = Edits.of(system, acts)
    res = what_if(edits)
    a, y_new = edits.applied(system)
    F, loo = refit(head, G, head.classes_[y_new], a, G_test)
    assert (res.logits - F).abs().max() <= 1e-10 * (1 + float(F.abs().max()))
    live = torch.as_tensor(a > 0)
    assert (res.loo_logits()[live] - loo[live]).abs().max() <= 1e-9
    assert float(res.leverage[~live].abs().max()) == 0.0
    with pytest.raises(CarrotError, match="weight 0"):
        Edits.of(system, [{"index": 9, "action": "weight", "weight": 1.0}])
    with pytest.raises(CarrotError, match="no training image left"):
        Edits.of(system, [{"index": i, "action": "relabel", "to": 0} for i in range(24) if y[i] == 1])
    with pytest.raises(CarrotError, match="twice"):
        Edits(np.array([1, 1]), np.zeros(2), np.zeros(2, dtype=np.int64), ("remove", "remove"))


@pytest.mark.parametrize("kind", ["ridge-primal", "kernel-exact", "kernel-nystroem"])
def test_loo_loss_change_from_prepared_inputs(kind):
    """The LOO loss change read from inputs prepared once (counterfactuals) equals the streamed one; inputs of another
    system or size are refused."""
    G, y, G_test, g = problem(8, 30, 6, 3)
    head = HEADS[kind]().fit(G, y)
    system = head.system(G, y) if isinstance(head, RidgeHead) else head.system()
    y_test = g.integers(3, size=len(G_test))
    inputs = system.counterfactuals(G_test)
    ref = system.loo_loss_change(G_test, y_test, chunk=3)
    got = system.loo_loss_change(G_test, y_test, chunk=3, inputs=inputs)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(CarrotError, match="inputs"):
        system.loo_loss_change(G_test[:4], y_test[:4], inputs=inputs)
