"""Global tokens (class, registers) as the embedding's own exact part, and the last k blocks' tokens (issue 13, item 3):
the backbone against timm's own forward, the token cache (format 3), and runs whose explanations stay exact."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from carrot.cli import cli
from carrot.errors import CarrotError


def _blocks_by_hand(model, x, k):
    """timm's ViT forward written out: the last k blocks' outputs, each through the final norm."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(model.norm(h))
    return outs[-k:]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_backbone_reads_the_last_k_blocks_and_the_class_token(k):
    from carrot.features.backbone import create_backbone

    bb = create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu", blocks=k)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(k))
    H, C, grid = bb.with_globals(x)
    with torch.no_grad():
        ref = torch.cat(_blocks_by_hand(bb.model, x, k), -1)
    assert grid == (2, 2) and H.shape == (2, 4, 192 * k) and C.shape == (2, 1, 192 * k) and bb.token_dim == 192 * k
    torch.testing.assert_close(H, ref[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(C, ref[:, :1], rtol=1e-5, atol=1e-5)
    assert torch.equal(bb(x)[0], H)
    if k == 1:  # one block is the model's own forward_features
        with torch.no_grad():
            torch.testing.assert_close(torch.cat([C, H], 1), bb.model.forward_features(x), rtol=0, atol=0)


def test_blocks_and_global_tokens_are_refused_where_the_model_has_none(tmp_path):
    from carrot.config import RunConfig
    from carrot.features.backbone import create_backbone
    from carrot.run.pipeline import Carrot

    with pytest.raises(CarrotError, match="backbone.blocks: the last k blocks' tokens need a ViT-family model"):
        create_backbone("resnet18", img_size=64, pretrained=False, device="cpu", blocks=2)
    with pytest.raises(CarrotError, match="backbone.blocks: 'vit_tiny_patch16_224' has 12 blocks, expected at most 12, got 13"):
        create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu", blocks=13)
    cfg = RunConfig.from_dict({"backbone": {"name": "resnet18", "img_size": 64, "pretrained": False, "global_tokens": True}})
    with pytest.raises(CarrotError, match="backbone.global_tokens: 'resnet18' has no class or register tokens"):
        Carrot(cfg).backbone
    with pytest.raises(CarrotError, match=r"backbone.blocks: expected an integer in \[1, 48\] or 'auto', got 0"):
        RunConfig.from_dict({"backbone": {"blocks": 0}})
    bb = create_backbone("resnet18", img_size=64, pretrained=False, device="cpu")
    H, C, grid = bb.with_globals(torch.zeros(1, 3, 64, 64))
    assert C.shape == (1, 0, 512) and H.shape == (1, grid[0] * grid[1], 512)


def test_the_cache_keeps_the_global_tokens_before_the_patch_tokens(tmp_path, synthetic_root, tiny_vit):
    from carrot.data import load_imagefolder
    from carrot.features.cache import CACHE_VERSION, extract, open_store

    train, _ = load_imagefolder(synthetic_root)
    store = extract(tiny_vit, train, tmp_path, batch_size=4, progress=False)
    assert CACHE_VERSION == 4 and store.manifest["prefix"] == 1 and store.manifest["blocks"] == 1
    assert store.tokens.shape == (len(train), 4, 192) and store.globals.shape == (len(train), 1, 192)
    from carrot.data import load_image

    x = torch.stack([tiny_vit.transform()(load_image(r, tiny_vit.min_side)) for r in train.records[:3]])
    H, C, _ = tiny_vit.with_globals(x)
    np.testing.assert_array_equal(store.tokens[:3], H.numpy().astype(np.float16))
    np.testing.assert_array_equal(store.globals[:3], C.numpy().astype(np.float16))
    again = open_store(store.path, verify=True)
    assert np.array_equal(again.globals, store.globals)


@pytest.fixture(scope="module")
def global_run(tmp_path_factory, fit_tiny):
    return fit_tiny(tmp_path_factory.mktemp("globals") / "run", head={"kind": "ridge"},
                    backbone={"name": "vit_tiny_patch16_224", "img_size": 32, "pretrained": False, "batch_size": 8,
                              "global_tokens": True, "blocks": 2})


def test_the_embedding_is_the_readout_then_the_global_tokens(global_run):
    from carrot.run.pipeline import Carrot

    model = Carrot.load(global_run)
    assert model.train_embeddings_.shape[1] == 2 * 384  # patch part (2 blocks x 192), then the class token's
    path = model.test_records_[0][0]
    G, H, w, grid, _, C = model.embed_images([path])
    np.testing.assert_allclose(G[0], np.concatenate([w[0].numpy() @ H[0].numpy(), C[0].reshape(-1).numpy()]), atol=1e-12)
    row = [p for p, _ in model.test_records_].index(path)
    # the fit's cached path: the same up to float16 rounding flips of tokens between batch compositions
    np.testing.assert_allclose(model.test_embeddings_[row], G[0], rtol=1e-3, atol=1e-3)
    from carrot.features.backbone import patch_centres

    keep = torch.tensor([False, True, True, True])  # node removal leaves the global part as it is
    sub = model.embedder.embed_kept(H[0], patch_centres(grid, torch.float64), keep, globals=C[0])
    np.testing.assert_array_equal(sub[384:].numpy(), C[0].reshape(-1).numpy())
    x = model.inputs([path])
    np.testing.assert_allclose(model.pixel_logits(x), model.head_.decision_function(G), atol=1e-10)
    xg = x.clone().requires_grad_(True)
    model.torch_logits(xg)[0].sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_explain_reports_the_global_term_and_every_sum_stays_exact(global_run, tmp_path, explain_json):
    from carrot.run.pipeline import Carrot

    model = Carrot.load(global_run)
    path = model.test_records_[2][0]
    exp = explain_json(global_run, path, tmp_path, "--pixel-map", "split", "--node-removal")
    logit = exp["logits"][exp["predicted"]]
    assert exp["identity_error"]["regions"] < 1e-9 and "global_term" in exp["meaning"]
    assert exp["prior"] + exp["region_sum"] + exp["global_term"] == pytest.approx(logit, abs=1e-9)
    G, H, w, _, _, C = model.embed_images([path])
    c, d = exp["predicted_index"], H.shape[2]
    W, mu = model.head_.coef_[:, c].numpy(), model.head_.feature_mean_.numpy()
    assert exp["global_term"] == pytest.approx(float((C[0].reshape(-1).numpy() - mu[d:]) @ W[d:]), abs=1e-12)
    for row in exp["supporting"] + exp["inhibiting"]:
        assert row["pair_sum_error"] < 1e-9 and "pair_global" in row
    assert len(exp["node_removal"]) == 4 and np.isfinite(exp["node_removal"]).all()


def test_the_commands_run_with_global_tokens(global_run, tmp_path):
    for args in (["evaluate", str(global_run), "--what", "deletion,faithfulness,lds", "--k", "1,3",
                  "--out", str(tmp_path / "ev.json")],
                 ["bench", str(global_run), "--t", "0,1", "--out", str(tmp_path / "t.json")]):
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, (args, r.output)
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [row["t"] for row in rows] == [0.0, 1.0]
