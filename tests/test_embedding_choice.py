"""backbone.blocks / backbone.global_tokens 'auto' (issue 29): candidate embeddings from one extraction of the last
blocks, compared by the exact LOO accuracy of their best head; checked against runs fitted with each candidate pinned
(their own extraction) and a brute-force leave-one-out refit."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from carrot.cli import cli
from carrot.config import RunConfig
from carrot.errors import CarrotError

from conftest import TINY_BACKBONE

PINNED = {(1, False): "last block", (1, True): "last block + class tokens", (4, True): "last 4 blocks + class tokens"}


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _brute_force_loo(run: Path) -> float:
    """Leave-one-out accuracy of the run's head by refitting it without each training image (its settings held)."""
    from carrot.run.pipeline import Carrot

    model = Carrot.load(run)
    G = model.train_embeddings_
    y = np.array([r.label for r in model.train_records_])
    hits = [model.head_.refit(np.delete(G, i, 0), np.delete(y, i)).predict(G[i : i + 1])[0] == y[i] for i in range(len(y))]
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def auto_and_pinned(fit_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    auto = fit_tiny(root / "auto")
    pinned = {key: fit_tiny(root / f"b{key[0]}g{int(key[1])}",
                            backbone={**TINY_BACKBONE, "blocks": key[0], "global_tokens": key[1]}) for key in PINNED}
    return auto, pinned


def test_config_takes_auto_and_refuses_the_rest_by_name():
    b = RunConfig().backbone
    assert b.blocks == "auto" and b.global_tokens == "auto"
    assert RunConfig.from_dict({"backbone": {"blocks": 4, "global_tokens": False}}).backbone.blocks == 4
    with pytest.raises(CarrotError, match=r"backbone.blocks: expected an integer in \[1, 48\] or 'auto', got 'all'"):
        RunConfig.from_dict({"backbone": {"blocks": "all"}})
    with pytest.raises(CarrotError, match=r"backbone.global_tokens: expected true, false or auto, got 'yes'"):
        RunConfig.from_dict({"backbone": {"global_tokens": "yes"}})
    from carrot.cli import build_config

    assert build_config(blocks="4").backbone.blocks == 4 and build_config(blocks="auto").backbone.blocks == "auto"
    with pytest.raises(CarrotError, match=r"--blocks: expected an integer or 'auto', got '2.5'"):
        build_config(blocks="2.5")
    from carrot.embed.embedder import Embedder

    with pytest.raises(CarrotError, match="backbone.global_tokens: 'auto' is chosen when a run is fitted"):
        Embedder.from_config(RunConfig())


def test_candidates_follow_the_backbone_and_the_config(tiny_vit):
    from carrot.embed.choice import Candidate, candidates, read_blocks
    from carrot.features.backbone import create_backbone

    def cands(bb, **backbone):
        cfg = RunConfig.from_dict({"backbone": backbone}) if "token_map" not in backbone else \
            RunConfig.from_dict({"token_map": backbone.pop("token_map"), "backbone": backbone})
        bb.blocks = read_blocks(cfg, bb)
        return candidates(cfg, bb)

    vit = create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu")
    got, line = cands(vit)
    assert got == [Candidate(1, False), Candidate(1, True), Candidate(4, True)] and vit.blocks == 4
    assert line == "compared by exact LOO: last block, last block + class tokens, last 4 blocks + class tokens"
    assert cands(vit, global_tokens=False)[0] == [Candidate(1, False), Candidate(4, False)]
    assert cands(vit, blocks=2)[0] == [Candidate(2, False), Candidate(2, True)]
    assert cands(vit, blocks=1, global_tokens=True)[0] == [Candidate(1, True)]
    got, line = cands(vit, token_map={"kind": "rff", "dim": 16})
    assert got == [Candidate(1, False), Candidate(1, True)] and "a token map is fitted on one block's tokens" in line
    conv = create_backbone("resnet18", img_size=64, pretrained=False, device="cpu")
    got, line = cands(conv)
    assert got == [Candidate(1, False)] and conv.blocks == 1
    assert "one embedding (last block)" in line and "ConvNet" in line and "no class or register tokens" in line


def test_a_cache_of_more_blocks_serves_fewer_bitwise(tiny_vit, tmp_path):
    """The last k blocks' columns of a K-block extraction are the tokens a k-block backbone gives, patch and global
    tokens, whole images and kept cells (the pixel map's runs)."""
    from carrot.features.backbone import create_backbone
    from carrot.features.cache import TokenStore

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    wide = create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu", blocks=4)
    Hw, Cw, _ = wide.with_globals(x)
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    Kw, idx_w, Gw = wide.kept_tokens(x, keep)
    for k in (1, 2, 4):
        narrow = create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu", blocks=k)
        H, C, _ = narrow.with_globals(x)
        assert torch.equal(H, Hw[..., -192 * k:]) and torch.equal(C, Cw[..., -192 * k:])
        Kn, idx_n, Gn = narrow.kept_tokens(x, keep)
        assert torch.equal(idx_n, idx_w) and torch.equal(Kn, Kw[..., -192 * k:]) and torch.equal(Gn, Gw[..., -192 * k:])
    tokens = np.arange(2 * 5 * 8, dtype=np.float32).reshape(2, 5, 8)
    store = TokenStore(tmp_path, {"blocks": 4, "grid": [2, 2]}, tokens[:, 1:], np.zeros(2, int), tokens[:, :1])
    two = store.last_blocks(2)
    assert two.blocks == 2 and np.array_equal(two.tokens, tokens[:, 1:, 4:]) and np.array_equal(two.globals, tokens[:, :1, 4:])
    assert two.last_blocks(1).tokens.shape == (2, 4, 2) and np.array_equal(two.last_blocks(1).tokens, tokens[:, 1:, 6:])
    with pytest.raises(CarrotError, match=r"backbone.blocks: the token cache .* holds the last 2 blocks' tokens, expected "
                                          r"1 to 2 of them, got 3"):
        two.last_blocks(3)


def test_auto_keeps_the_candidate_with_the_best_exact_loo(auto_and_pinned):
    """Every candidate's LOO accuracy equals the pinned run's (its own extraction) and a brute-force leave-one-out
    refit; the kept one is the best (ties: the first), and its embeddings are the pinned run's, bitwise, from one
    extraction of the last 4 blocks."""
    auto, pinned = auto_and_pinned
    m = _metrics(auto)
    rows = m["embedding_choice"]["candidates"]
    assert [r["embedding"] for r in rows] == list(PINNED.values())
    for r, key in zip(rows, PINNED):
        pm = _metrics(pinned[key])
        assert pm["embedding_choice"] is None and pm["embedding"] is None
        assert r["loo_accuracy"] == pytest.approx(_brute_force_loo(pinned[key]), abs=1e-12)
        assert r["head"] == pm["head"] and r["features"] == np.load(pinned[key] / "train_embeddings.npy").shape[1]
    accs = [r["loo_accuracy"] for r in rows]
    best = int(np.argmax(accs))
    key = list(PINNED)[best]
    assert m["embedding"] == m["embedding_choice"]["chosen"] == PINNED[key]
    for split in ("train", "test"):
        assert np.array_equal(np.load(auto / f"{split}_embeddings.npy"), np.load(pinned[key] / f"{split}_embeddings.npy"))
    assert m["test_accuracy"] == _metrics(pinned[key])["test_accuracy"]
    run = json.loads((auto / "run.json").read_text())
    assert run["config"]["backbone"]["blocks"] == key[0] and run["config"]["backbone"]["global_tokens"] == key[1]
    manifests = [json.loads((Path(c) / "manifest.json").read_text()) for c in m["token_caches"]]
    assert [mf["blocks"] for mf in manifests] == [4, 4] and manifests[0]["dim"] == 4 * 192
    assert "chosen by backbone auto (exact LOO accuracy: last block" in (auto / "index.html").read_text()


def test_an_auto_run_explains_and_audits_as_its_pinned_twin(auto_and_pinned, explain_json, synthetic_root, tmp_path):
    auto, pinned = auto_and_pinned
    chosen = next(k for k, v in PINNED.items() if v == _metrics(auto)["embedding"])
    image = sorted(p for p in synthetic_root.rglob("*.png"))[0]
    a = explain_json(auto, image, tmp_path / "a")
    b = explain_json(pinned[chosen], image, tmp_path / "b")
    assert a["predicted"] == b["predicted"] and max(a["identity_error"].values()) < 1e-9
    assert a["identity_error"] == b["identity_error"]
    assert [s["index"] for s in a["supporting"]] == [s["index"] for s in b["supporting"]]
    got = []
    for run, name in ((auto, "a"), (pinned[chosen], "b")):
        r = CliRunner().invoke(cli, ["evaluate", str(run), "--what", "faithfulness", "--k", "1,2", "--n-test", "3",
                                     "--out", str(tmp_path / f"{name}.json"), "--quiet"])
        assert r.exit_code == 0, r.output
        got.append(json.loads((tmp_path / f"{name}.json").read_text())["faithfulness"])

    def numbers(d):
        return {k: v for k, v in d.items() if "second" not in k} if isinstance(d, dict) else d

    assert numbers(got[0]) == numbers(got[1])


def test_streaming_without_a_cache_chooses_the_same(auto_and_pinned, fit_tiny, tmp_path):
    auto, _ = auto_and_pinned
    streamed = fit_tiny(tmp_path / "streamed", backbone={**TINY_BACKBONE, "cache_tokens": False})
    a, s = _metrics(auto), _metrics(streamed)
    assert s["embedding_choice"]["candidates"] == a["embedding_choice"]["candidates"] and s["token_caches"] == []
    assert np.array_equal(np.load(auto / "train_embeddings.npy"), np.load(streamed / "train_embeddings.npy"))


def test_a_convnet_keeps_its_one_embedding_and_says_so(fit_tiny, tmp_path):
    run = fit_tiny(tmp_path / "conv", backbone={"name": "resnet18", "img_size": 64, "pretrained": False, "batch_size": 8})
    m = _metrics(run)
    assert [r["embedding"] for r in m["embedding_choice"]["candidates"]] == ["last block"]
    assert "ConvNet" in m["embedding_choice"]["note"]
    assert "the only one" in (run / "index.html").read_text()


def test_the_wide_cache_is_bounded_by_the_free_disk(monkeypatch, synthetic_root, tmp_path, capsys):
    """With too little free disk for the last 4 blocks' cache, auto reads the last block only and says so."""
    from carrot.progress import set_quiet
    from carrot.run import commands

    real = shutil.disk_usage

    def small(path):
        u = real(path)
        return type(u)(u.total, u.used, 100_000)  # the 4-block caches of 18 tiny images need 138 kB, one block 35 kB

    monkeypatch.setattr(commands.shutil, "disk_usage", small)
    set_quiet(False)
    cfg = RunConfig.from_dict({"backbone": TINY_BACKBONE, "data": {"kind": "imagefolder", "root": str(synthetic_root)},
                               "cache_dir": str(tmp_path / "cache")})
    m = commands.fit(cfg, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "embedding auto: the last blocks' token cache would take" in err and "reading the last block only" in err
    assert "token cache:" in err
    assert [r["embedding"] for r in m["embedding_choice"]["candidates"]] == ["last block", "last block + class tokens"]
    assert "the cache of more blocks would not fit" in m["embedding_choice"]["note"]
    assert [json.loads((Path(c) / "manifest.json").read_text())["blocks"] for c in m["token_caches"]] == [1, 1]


def test_releasing_the_mapped_pages_keeps_the_rows(tmp_path):
    """A pass over the cache gives its resident pages back after each batch; the rows read again are the same."""
    from carrot.features.cache import open_store

    tokens = np.lib.format.open_memmap(tmp_path / "tokens.npy", mode="w+", dtype=np.float16, shape=(5, 5, 8))
    tokens[:] = np.random.default_rng(0).standard_normal((5, 5, 8))
    tokens.flush()
    want = np.array(tokens)
    del tokens
    manifest = {"version": 3, "n": 5, "dim": 8, "grid": [2, 2], "prefix": 1, "dtype": "float16", "blocks": 2,
                "labels": [0] * 5, "complete": True}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store = open_store(tmp_path, blocks=1)
    first = np.array(store.tokens)
    store.release()
    assert np.array_equal(first, want[:, 1:, 4:]) and np.array_equal(np.array(store.tokens), first)
    assert np.array_equal(np.array(store.globals), want[:, :1, 4:])


def test_a_run_from_before_the_keys_loads_with_the_last_block(fit_tiny, tmp_path):
    """run.json written before backbone.blocks / global_tokens existed has neither: it is the last block alone, as
    then, not 'auto'."""
    from carrot.run.pipeline import Carrot

    run = fit_tiny(tmp_path / "old", backbone={**TINY_BACKBONE, "blocks": 1, "global_tokens": False})
    meta = json.loads((run / "run.json").read_text())
    for key in ("blocks", "global_tokens"):
        del meta["config"]["backbone"][key]
    (run / "run.json").write_text(json.dumps(meta))
    model = Carrot.load(run)
    assert model.config.backbone.blocks == 1 and model.config.backbone.global_tokens is False
    assert model.embedder.global_tokens is False
