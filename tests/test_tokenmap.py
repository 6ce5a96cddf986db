"""Token feature maps (carrot.embed.tokenmap) against sklearn's own transforms and the RBF kernel, their file, and a
run fitted with one: the readout sums phi of the tokens, so the region split and pairs stay exact."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.kernel_approximation import Nystroem, RBFSampler
from sklearn.metrics.pairwise import rbf_kernel

from carrot.cli import cli
from carrot.embed.tokenmap import TokenMap, sample_tokens
from carrot.errors import CarrotError
from conftest import TINY_BACKBONE


def tokens(seed: int, n: int = 400, d: int = 12) -> np.ndarray:
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)) * r.uniform(0.5, 3, d) + r.normal(size=d)  # dimensions of unequal scale and mean


@pytest.mark.parametrize("kind", ["rff", "nystroem"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_torch_map_is_sklearns_transform(kind, seed):
    X = tokens(seed)
    tm = TokenMap(kind, 48, seed=seed).fit(X)
    Z = (X - X.mean(0)) / X.std(0)  # the standardisation, recomputed
    if kind == "rff":
        ref = RBFSampler(gamma=tm.gamma_, n_components=48)
        ref.random_weights_, ref.random_offset_, ref.n_features_in_ = tm.weights_, tm.offset_, X.shape[1]
    else:
        ref = Nystroem(gamma=tm.gamma_, n_components=48)
        ref.components_, ref.normalization_, ref.n_features_in_ = tm.landmarks_, tm.normalization_.T, X.shape[1]
        ref.component_indices_ = np.arange(48)
    got = tm(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(got, ref.transform(Z), rtol=1e-10, atol=1e-12)
    i, j = np.random.default_rng(seed).integers(0, len(Z), (2, 4000))
    assert tm.gamma_ == pytest.approx(1 / np.median(((Z[i] - Z[j]) ** 2).sum(1)), rel=0.1)  # the median heuristic


def test_the_nystroem_map_reproduces_the_kernel_with_its_landmarks():
    """phi(x) . phi(c) = k(x, C) K_CC^-1 k(C, c) = k(x, c) for every landmark c (the projection is exact there)."""
    X = tokens(2)
    tm = TokenMap("nystroem", 40, seed=2).fit(X)
    C = tm.landmarks_ * tm.scale_ + tm.mean_  # back to token coordinates
    phi_x, phi_c = tm(torch.as_tensor(X[:50])).numpy(), tm(torch.as_tensor(C)).numpy()
    exact = rbf_kernel((X[:50] - tm.mean_) / tm.scale_, tm.landmarks_, gamma=tm.gamma_)
    np.testing.assert_allclose(phi_x @ phi_c.T, exact, atol=1e-8)


def test_random_fourier_features_approach_the_kernel_as_m_grows():
    X = tokens(3, n=200)
    Z = (X - X.mean(0)) / X.std(0)
    errs = []
    for m in (256, 16384):
        tm = TokenMap("rff", m, seed=3).fit(X)
        phi = tm(torch.as_tensor(X)).numpy()
        errs.append(np.abs(phi @ phi.T - rbf_kernel(Z, gamma=tm.gamma_)).mean())
    assert errs[1] < 0.02 and errs[1] < errs[0] / 4  # Monte Carlo error ~ 1 / sqrt(m)


def test_gamma_given_is_kept_and_bad_settings_are_refused():
    assert TokenMap("rff", 8, gamma=0.25).fit(tokens(0)).gamma_ == 0.25
    with pytest.raises(CarrotError, match="token_map.dim: the Nystroem map needs at least dim = 500"):
        TokenMap("nystroem", 500).fit(tokens(0))
    with pytest.raises(CarrotError, match="token_map.kind: expected none, rff, nystroem, got 'pca'"):
        TokenMap("pca", 8).fit(tokens(0))
    with pytest.raises(CarrotError, match="token_map.kind: 'none' has no map"):
        TokenMap("none", 8).fit(tokens(0))
    with pytest.raises(CarrotError, match="token_map.gamma: expected 'auto' or a finite number > 0, got -1"):
        TokenMap("rff", 8, gamma=-1).fit(tokens(0))
    with pytest.raises(CarrotError, match=r"tokens: expected a \(M, D\) array"):
        TokenMap("rff", 8).fit(np.zeros(5))
    with pytest.raises(CarrotError, match="every sampled pair of training tokens is identical"):
        TokenMap("rff", 8).fit(np.ones((30, 3)))
    with pytest.raises(CarrotError, match="expected 12 features per token"):
        TokenMap("rff", 8).fit(tokens(0))(torch.zeros(3, 5))
    with pytest.raises(CarrotError, match="not fitted"):
        TokenMap("rff", 8)(torch.zeros(3, 5))


@pytest.mark.parametrize("kind", ["rff", "nystroem"])
def test_the_file_round_trips_and_damage_is_refused(kind, tmp_path):
    tm = TokenMap(kind, 16, seed=4).fit(tokens(4))
    tm.save(tmp_path / "m.safetensors")
    back = TokenMap.load(tmp_path / "m.safetensors")
    H = torch.as_tensor(tokens(5, n=7))
    assert torch.equal(back(H), tm(H)) and back.gamma_ == tm.gamma_ and repr(back) == repr(tm)
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CarrotError, match="is corrupt"):
        TokenMap.load(tmp_path / "cut.safetensors")
    with pytest.raises(CarrotError, match="not found"):
        TokenMap.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(3, dtype=torch.float64)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CarrotError, match="is not a carrot token map"):
        TokenMap.load(tmp_path / "other.safetensors")
    tm.dim = 17  # metadata that does not match the arrays
    tm.save(tmp_path / "bad.safetensors")
    with pytest.raises(CarrotError, match="is not a finite float64 array of shape"):
        TokenMap.load(tmp_path / "bad.safetensors")


def test_the_token_sample_reads_whole_images_then_thins():
    T = np.random.default_rng(0).normal(size=(30, 4, 3)).astype(np.float16)
    s = sample_tokens(T, seed=0, limit=10)
    assert s.shape == (10, 3) and s.dtype == np.float32
    assert all(any(np.array_equal(row, t) for t in T.reshape(-1, 3).astype(np.float32)) for row in s)
    assert np.array_equal(s, sample_tokens(T, seed=0, limit=10)) and not np.array_equal(s, sample_tokens(T, seed=1, limit=10))


# -- a run with a token map ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mapped_run(tmp_path_factory, fit_tiny):
    return fit_tiny(tmp_path_factory.mktemp("tokenmap") / "run", head={"kind": "ridge"},
                    backbone={**TINY_BACKBONE, "global_tokens": False},  # the map's split alone (the class tokens: their own tests)
                    token_map={"kind": "nystroem", "dim": 24}, diffusion={"t": 1.0})


def test_the_run_embeds_phi_of_the_tokens_and_saves_the_map(mapped_run):
    from carrot.features.backbone import patch_centres
    from carrot.run.pipeline import Carrot

    model = Carrot.load(mapped_run)
    meta = json.loads((mapped_run / "run.json").read_text())
    assert meta["config"]["token_map"] == {"kind": "nystroem", "dim": 24, "gamma": "auto"}
    assert "token_map.safetensors" in meta["files"] and model.train_embeddings_.shape[1] == 24
    path = model.test_records_[0][0]
    G, H, w, grid, _, _ = model.embed_images([path])
    tm = model.token_map_
    phi = rbf_kernel((H[0].numpy() - tm.mean_) / tm.scale_, tm.landmarks_, gamma=tm.gamma_) @ tm.normalization_
    np.testing.assert_allclose(G[0], w[0].numpy() @ phi, rtol=1e-10, atol=1e-12)  # g = sum_j w_j phi(h_j)
    row = [p for p, _ in model.test_records_].index(path)
    # the fit's cached path: the same up to a float16 rounding flip of a token between batch compositions
    np.testing.assert_allclose(model.test_embeddings_[row], G[0], atol=1e-5)
    keep = torch.tensor([True, False, True, True])  # node removal: the graph of the kept tokens, phi read out
    sub = model.embedder.embed_kept(H[0], patch_centres(grid, torch.float64), keep)
    Hk = H[0][keep].unsqueeze(0)
    wk = model.embedder.weights(Hk, patch_centres(grid, torch.float64)[keep], sigmas=model.embedder.bandwidths(
        H[0], patch_centres(grid, torch.float64)))[0]
    np.testing.assert_allclose(sub.numpy(), (wk[0].numpy() @ phi[keep.numpy()]), atol=1e-12)
    x = model.inputs([path])
    assert np.allclose(model.pixel_logits(x), model.head_.decision_function(G), atol=1e-10)
    xg = x.clone().requires_grad_(True)
    model.torch_logits(xg)[0, 0].backward()  # the map is differentiable: the pixel split integrates through it
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_explain_with_a_token_map_keeps_the_exact_region_split_and_pairs(mapped_run, tmp_path, explain_json):
    from carrot.run.pipeline import Carrot

    model = Carrot.load(mapped_run)
    path = model.test_records_[1][0]
    exp = explain_json(mapped_run, path, tmp_path, "--pixel-map", "split")
    assert exp["identity_error"]["regions"] < 1e-9 and exp["identity_error"]["data"] < 1e-9
    c = exp["predicted_index"]
    assert exp["prior"] + exp["region_sum"] == pytest.approx(exp["logits"][exp["predicted"]], abs=1e-9)
    assert all(row["pair_sum_error"] < 1e-9 and row["pairs"] for row in exp["supporting"] + exp["inhibiting"])
    G, H, w, _, _, _ = model.embed_images([path])
    phi = model.token_map_(H[0])
    manual = ((w[0].unsqueeze(1) * phi - model.head_.feature_mean_ / phi.shape[0]) @ model.head_.coef_)[:, c]
    np.testing.assert_allclose(np.asarray(exp["region_contributions"]).ravel(), manual.numpy(), atol=1e-12)


def test_the_commands_run_with_a_token_map(mapped_run, tmp_path):
    from carrot.run.pipeline import Carrot

    images = [p for p, _ in Carrot.load(mapped_run).test_records_[:2]]
    for args in (["predict", str(mapped_run), *images, "--out", str(tmp_path / "pred.json"), "--quiet"],
                 ["evaluate", str(mapped_run), "--what", "deletion,faithfulness", "--k", "1,3", "--out", str(tmp_path / "ev.json")],
                 ["reweight", str(mapped_run), "--steps", "2", "--out", str(tmp_path / "rw.json"), "--apply", str(tmp_path / "rw")]):
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, (args, r.output)
    model = Carrot.load(mapped_run)
    pred = json.loads((tmp_path / "pred.json").read_text())
    logits = model.head_.decision_function(model.embed_images(images)[0])  # g = sum_j w_j phi(h_j), then the head
    assert [p["predicted"] for p in pred] == [model.classes_[c] for c in logits.argmax(1)]
    np.testing.assert_allclose([p["score"] for p in pred], logits.max(1), atol=1e-9)
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert "deletion" in ev and "faithfulness" in ev
    from carrot.run.pipeline import Carrot

    derived = Carrot.load(tmp_path / "rw")  # the applied run keeps the parent's map: its embeddings are the parent's
    assert derived.token_map_ is not None and np.array_equal(derived.token_map_.landmarks_, Carrot.load(mapped_run).token_map_.landmarks_)


def test_a_run_whose_map_is_missing_or_mismatched_is_refused(mapped_run, tmp_path):
    import shutil

    from carrot.run.pipeline import Carrot

    copy = tmp_path / "copy"
    shutil.copytree(mapped_run, copy)
    (copy / "token_map.safetensors").unlink()
    with pytest.raises(CarrotError, match="token_map.safetensors is missing"):
        Carrot.load(copy)
    model = Carrot.load(mapped_run)
    model.token_map_ = None
    with pytest.raises(CarrotError, match="token_map.kind is 'nystroem': fit_token_map"):
        model.fit(model.train_embeddings_, np.zeros(len(model.train_records_), int), model.train_records_, model.classes_)
