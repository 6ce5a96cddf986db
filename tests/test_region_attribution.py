from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from carrot.features.backbone import patch_centres
from carrot.config import DiffusionConfig, GraphConfig
from carrot.embed.embedder import Embedder
from carrot.errors import CarrotError
from carrot.embed.graph import affinity, normalized_laplacian
from carrot.ridge.head import RidgeHead
from carrot.attribution.regions import deletion_insertion, mask_to_grid, node_removal, segment_sum


@pytest.fixture(scope="module")
def setup():
    g = np.random.default_rng(0)
    G, y = g.normal(size=(60, 5)), np.tile([0, 1, 2], 20)
    head = RidgeHead(lam=0.5).fit(G, y)
    H = torch.from_numpy(g.normal(size=(12, 5)))
    return head, H, patch_centres((3, 4), torch.float64)


def test_node_removal_at_t0_is_mean_without_the_node(setup):
    head, H, P = setup
    drops = node_removal(head, H, P, 1, Embedder(GraphConfig(), DiffusionConfig(t=0.0), 'cpu'))
    full = head.decision_function(H.mean(0, keepdim=True).numpy())[0, 1]
    for j in (0, 5, 11):
        keep = np.arange(12) != j
        ref = full - head.decision_function(H[keep].mean(0, keepdim=True).numpy())[0, 1]
        assert drops[j] == pytest.approx(ref, rel=1e-10)


def test_node_removal_with_diffusion_matches_scipy(setup):
    head, H, P = setup
    gc = GraphConfig(sigma_space=0.8, sigma_feat=2.0)
    dc = DiffusionConfig(t=1.5)
    drops = node_removal(head, H, P, 2, Embedder(gc, dc, 'cpu'), groups=np.repeat([0, 1, 2], 4))

    def logit(keep):
        W = affinity(H[keep][None], P[keep], 0.8, 2.0)
        L = normalized_laplacian(W)[0].numpy()
        g = (scipy.linalg.expm(-1.5 * L) @ H[keep].numpy()).mean(0)
        return head.decision_function(g[None])[0, 2]

    full = logit(np.ones(12, dtype=bool))
    for gid in range(3):
        keep = np.repeat([0, 1, 2], 4) != gid
        assert drops[gid] == pytest.approx(full - logit(keep), rel=1e-9)


def test_deletion_insertion_endpoints(setup):
    head, H, P = setup
    order = np.random.default_rng(1).permutation(12)
    dc = DiffusionConfig(t=1.0)
    dele, ins = deletion_insertion(head, H, P, 0, order, Embedder(GraphConfig(), dc, 'cpu'), steps=4)
    full = dele.logits[0]
    assert ins.logits[-1] == pytest.approx(full, rel=1e-12)
    assert dele.logits[-1] == ins.logits[0] == pytest.approx(head.prior_[0].item())
    assert dele.fractions[0] == 0 and dele.fractions[-1] == 1 and len(dele.fractions) == 5
    assert dele.auc == pytest.approx(np.trapezoid(dele.logits, dele.fractions))
    with pytest.raises(CarrotError, match="permutation"):
        deletion_insertion(head, H, P, 0, [0, 1], Embedder(GraphConfig(), dc, 'cpu'))


@pytest.mark.parametrize("t,knn,method", [(0.0, None, "auto"), (0.7, None, "eigh"), (2.0, 3, "chebyshev"), (1.0, 20, "auto"),
                                          (1.0, None, "auto"), (6.0, None, "chebyshev")])
def test_batched_kept_graphs_equal_one_graph_at_a_time(setup, t, knn, method):
    """embed_kept (one recurrence on the full graph, or batches of equal size under eigh / kNN): each row equals its own
    graph built alone (scipy expm oracle)."""
    _, H, P = setup
    emb = Embedder(GraphConfig(knn=knn), DiffusionConfig(t=t, method=method), "cpu")
    g = np.random.default_rng(3)
    keep = torch.as_tensor(np.stack([g.random(12) < 0.6 for _ in range(9)] + [np.eye(12, dtype=bool)[4]]))
    keep[keep.sum(1) == 0, 0] = True
    sig = emb.bandwidths(H, P)
    got = emb.embed_kept(H, P, keep, sig)
    for r in range(len(keep)):
        Hk, Pk = H[keep[r]], P[keep[r]]
        if t == 0 or len(Hk) == 1:
            ref = Hk.mean(0).numpy()
        else:
            k = knn if knn is not None and knn < len(Hk) - 1 else None
            L = normalized_laplacian(affinity(Hk[None], Pk, sig[0], sig[1], k))[0].numpy()
            ref = (scipy.linalg.expm(-t * L) @ Hk.numpy()).mean(0)
        np.testing.assert_allclose(got[r].numpy(), ref, rtol=1e-9, atol=1e-11)
    with pytest.raises(CarrotError, match="at least one region must remain"):
        emb.embed_kept(H, P, torch.zeros(12, dtype=torch.bool))


def test_mask_to_grid_and_segment_sums():
    mask = np.zeros((30, 40), dtype=np.int64)
    mask[:, 20:] = 7
    mask[:10, :] = 3
    seg = mask_to_grid(mask, (3, 4))
    assert seg.reshape(3, 4).tolist() == [[3, 3, 3, 3], [0, 0, 7, 7], [0, 0, 7, 7]]
    r = np.arange(12, dtype=float)
    sums = segment_sum(r, seg)
    assert sums == {0: 4 + 5 + 8 + 9, 3: 0 + 1 + 2 + 3, 7: 6 + 7 + 10 + 11}
    assert sum(sums.values()) == r.sum()
    with pytest.raises(CarrotError, match="integer"):
        mask_to_grid(mask.astype(float), (3, 4))


def test_bandwidths_follow_the_graph_rule(setup):
    from carrot.embed.graph import median_bandwidth, pairwise_sq_dists
    _, H, P = setup
    ss, sf = Embedder(GraphConfig(sigma_space=0.3, sigma_feat="median*2")).bandwidths(H, P)
    assert ss == 0.3
    assert sf == pytest.approx(2 * float(median_bandwidth(pairwise_sq_dists(H[None]))[0]))


def test_boxed_outlines_the_right_cell():
    from PIL import Image

    from carrot.report.pages import boxed

    img = boxed(Image.new("RGB", (40, 30), (0, 0, 0)), (3, 4), cell=6)  # row 1, column 2
    a = np.asarray(img)
    assert a[10:20, 20:30].any() and not a[:10].any() and not a[20:].any()
    assert not a[:, :20].any() and not a[:, 30:].any()


def test_input_coordinates_follow_resize_and_center_crop():
    from torchvision import transforms as T

    from carrot.attribution.regions import to_input_coords

    tf = T.Compose([T.Resize(256), T.CenterCrop((224, 224))])
    # a 400 x 200 image: resized to 512 x 256, cropped 144 px from the left and 16 px from the top
    pts = to_input_coords(np.array([[0, 0], [200, 100], [400, 200]]), (400, 200), tf)
    np.testing.assert_allclose(pts, [[-144, -16], [112, 112], [368, 240]])


def test_pointing_game_hits_and_misses():
    from carrot.attribution.regions import pointing_game

    r = np.zeros((4, 4))
    r[1, 2] = 1.0  # cell centre (70, 42) on a 112 x 112 input
    assert pointing_game(r, (60, 30, 80, 50), (112, 112))
    assert not pointing_game(r, (0, 80, 20, 100), (112, 112))


def test_pointing_game_on_the_generated_parts_with_a_real_backbone(tmp_path):
    """EfficientNet-Lite0 (ImageNet weights) + ridge on the toy set: the most positive region of the
    predicted class sits on the coloured square (the generated ground-truth part) most of the time."""
    import json

    from carrot.config import RunConfig
    from carrot.data import load_imagefolder, make_synthetic
    from carrot.run.pipeline import Carrot
    from carrot.attribution.regions import pointing_game, to_input_coords

    root = make_synthetic(tmp_path / "toy", num_classes=3, per_class=12, size=64, seed=1)
    parts = json.loads((root / "parts.json").read_text())
    train, test = load_imagefolder(root, test_fraction=0.34, seed=0)
    model = Carrot(RunConfig().merged({"backbone.name": "efficientnet_lite0", "device": "cpu", "diffusion.t": 0.0, "backbone.blocks": 1,
                                      "backbone.global_tokens": False}))
    G, _, _, _, _, _ = model.embed_images(train.paths)
    model.fit(G, train.labels, train.records, train.classes)
    geo = model.backbone.display_transform()
    size = model.backbone.data_config["input_size"][1:]
    hits = []
    for exp in model.explain(test.paths, k=2):
        x, y, w, h = parts[str(Path(exp.image).relative_to(root))]
        (x0, y0), (x1, y1) = to_input_coords(np.array([[x, y], [x + w, y + h]]), (64, 64), geo)
        hits.append(pointing_game(np.asarray(exp.tokens.values), (x0, y0, x1, y1), size))
    assert np.mean(hits) >= 0.6, hits  # 11 of 12 when written; a random region hits about 1 in 4
