"""carrot-run end to end on tiny data, and its refusals of bad input (one line, exit 2)."""
import json
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from carrot.config import RunConfig, load_config
from carrot.errors import CarrotError
from carrot.cli import cli

TINY = {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "pretrained": False, "batch_size": 8}}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return str(p)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic_root, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = run("fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(out), "--quiet", "--json", "--lam", "0.5")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["n_train"] + metrics["n_test"] == 18
    return out


def test_fit_writes_a_complete_run(fitted):
    meta = json.loads((fitted / "run.json").read_text())
    assert meta["config"]["head"]["lam"] == 0.5
    assert meta["config"]["data"]["kind"] == "imagefolder"
    assert meta["backbone"]["timm_name"] == "vit_tiny_patch16_224"
    for f in ("head.safetensors", "head.safetensors.json", "train_embeddings.npy", "metrics.json"):
        assert (fitted / f).is_file()
    index = (fitted / "index.html").read_text()
    for heading in ("Per class", "Confusion matrix", "Most harmful training images", "Class flow",
                    "Training images carrying the most predictions"):
        assert f">{heading}" in index, heading


def test_run_summary_class_flow_rows_sum_to_the_mean_predicted_logit(fitted):
    from carrot.run.operations import run_embeddings, run_summary

    model, G, y, G_test, y_test = run_embeddings(fitted)
    s = run_summary(model, G, y, G_test, y_test)
    logits = model.head_.decision_function(G_test)
    pred = logits.argmax(1)
    for c in set(pred.tolist()):
        assert sum(s["class_flow"][c]) == pytest.approx((logits[pred == c, c] - model.head_.prior_[c].item()).mean(), rel=1e-9)
    assert s["carriers"][0]["score"] >= s["carriers"][-1]["score"]


def test_explain_folder_writes_exact_explanations(fitted, synthetic_root, tmp_path):
    r = run("explain", str(fitted), str(synthetic_root / "class_01"), "--top-k", "3", "--out", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert len(res) == 6
    for e in res:
        assert len(e["supporting"]) == 3 and len(e["inhibiting"]) == 3
        assert e["supporting"][0]["score"] >= e["supporting"][-1]["score"]
        logit = e["logits"][e["predicted"]]
        assert abs(e["prior"] + e["data_sum"] - logit) <= 1e-6 * max(1, abs(logit))
        # the class tokens of the default (auto) embedding, when it keeps them, are their own exact term
        assert abs(e["prior"] + e["region_sum"] + e.get("global_term", 0.0) - logit) <= 1e-6 * max(1, abs(logit))
        assert np.asarray(e["region_contributions"]).shape == tuple(e["grid"]) == (2, 2)
        png = Path(e["heatmap"])
        with Image.open(png) as im:
            assert im.format == "PNG"
    assert (tmp_path / "explanations.json").is_file()


def test_predict_matches_the_fitted_test_scores(fitted, tmp_path):
    import csv

    from carrot.run.pipeline import Carrot

    model = Carrot.load(fitted)
    test_paths = [p for p, _ in model.meta_["test_records"]]
    r = run("predict", str(fitted), *test_paths, "--out", str(tmp_path / "pred.json"), "--quiet", "--batch-size", "2")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "pred.json").read_text())
    # the same head on the embeddings saved at fit time gives the same scores (backbone re-run, float16 cache dtype)
    expected = model.head_.decision_function(np.load(fitted / "test_embeddings.npy"))
    assert [r["image"] for r in rows] == test_paths
    for row, e in zip(rows, expected):
        np.testing.assert_allclose(list(row["scores"].values()), e, rtol=1e-5, atol=1e-6)
        assert row["predicted"] == model.classes_[int(np.argmax(e))]
        own = np.sort(list(row["scores"].values()))
        assert row["margin"] == pytest.approx(own[-1] - own[-2], abs=1e-12) and row["score"] == own[-1]
    with open(tmp_path / "pred.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["image", "predicted", "score", "runner_up", "margin", *model.classes_]
    assert len(table) == 1 + len(rows) and table[1][1] == rows[0]["predicted"]
    assert len(r.output.strip().splitlines()) == len(rows)
    bad(["predict", str(fitted), test_paths[0], "--batch-size", "0"], "'--batch-size': 0 is not in the range")


def test_fit_without_token_cache_streams_and_explains(tmp_path, synthetic_root, tiny_config, fitted):
    out = tmp_path / "stream"
    r = run("fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(out), "--quiet", "--lam", "0.5",
            "--no-cache-tokens", "--cache-dir", str(tmp_path / "empty-cache"))
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["token_caches"] == [] and not (tmp_path / "empty-cache").exists()
    # the same model as the cached run: the tokens are rounded to the cache dtype either way
    np.testing.assert_allclose(np.load(out / "train_embeddings.npy"), np.load(fitted / "train_embeddings.npy"), rtol=1e-12, atol=1e-13)
    r = run("explain", str(out), str(synthetic_root / "class_00" / "img_000.png"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["supporting"][0]["train_regions"]  # training regions from the images themselves
    bad(["bench", str(out)], "no token caches (fitted with --no-cache-tokens")
    bad(["extract", "--config", tiny_config, "--data", str(synthetic_root), "--no-cache-tokens"], "there is no token cache to extract into")


def test_reweight_apply_writes_a_weighted_run(fitted, tmp_path, synthetic_root):
    from carrot.ridge.head import RidgeHead
    from carrot.run.pipeline import Carrot

    out = tmp_path / "reweighted"
    r = run("reweight", str(fitted), "--steps", "4", "--val-fraction", "0.3", "--out", str(tmp_path / "rw.json"), "--apply", str(out))
    assert r.exit_code == 0, r.output
    rw = json.loads((tmp_path / "rw.json").read_text())
    derived, parent = Carrot.load(out), Carrot.load(fitted)
    w = np.asarray(rw["weights"])
    np.testing.assert_array_equal(derived.sample_weight_, w)
    y = np.array([rec.label for rec in parent.train_records_])
    ref = RidgeHead(lam=parent.head_.lam_).fit(parent.train_embeddings_, y, w)
    np.testing.assert_allclose(derived.head_.coef_.numpy(), ref.coef_.numpy(), rtol=1e-10, atol=1e-12)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(rw["reweighted_test_accuracy"])  # the head RRO selected
    assert derived.meta_["derived_from"]["by"] == "reweight" and (out / "index.html").is_file()
    r = run("explain", str(out), str(synthetic_root / "class_02" / "img_001.png"), "--json", "--top-k", "2")
    assert r.exit_code == 0, r.output
    e = json.loads(r.stdout)[0]
    assert e["identity_error"]["data"] <= 1e-9 and all(s["index"] in np.flatnonzero(w > 0) for s in e["supporting"])
    assert all(s["weight"] == w[s["index"]] for s in e["supporting"] + e["inhibiting"])
    assert " weight " in Path(e["page"]).read_text()
    bad(["reweight", str(fitted), "--steps", "2", "--apply", str(out)], "already holds a fitted run")
    r = run("compare", str(fitted), str(out), "--out", str(tmp_path / "cmp.json"))
    assert r.exit_code == 0 and "McNemar exact p" in r.output, r.output
    cmp_ = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp_["accuracy_b"] == pytest.approx(metrics["test_accuracy"]) and cmp_["n"] == 6
    assert cmp_["fixed_by_b"] + cmp_["broken_by_b"] <= len(cmp_["changed"])
    assert run("compare", str(fitted), str(out)).exit_code == 0  # default: RUN_B/compare.json, shown on B's index
    assert ">Comparison with another run" in (out / "index.html").read_text()
    assert all(c["a"] != c["b"] for c in cmp_["changed"])

    dbg = tmp_path / "debugged"
    r = run("debug", str(fitted), "--drop", "1,2", "--val-fraction", "0.3", "--apply", str(dbg))
    assert r.exit_code == 0, r.output
    loop = json.loads((fitted / "debug.json").read_text())
    best = max(loop["rows"], key=lambda row: (row["val_accuracy"], -row["k"]))
    d = Carrot.load(dbg)
    assert d.meta_["derived_from"]["k"] == best["k"] and d.meta_["derived_from"]["by"] == "debug"
    assert json.loads((dbg / "metrics.json").read_text())["test_accuracy"] == pytest.approx(best["test_accuracy"])
    from carrot.data import stratified_indices

    _, val_rows = stratified_indices(y, parent.classes_, 0.3, parent.config.seed)
    assert (d.sample_weight_ == 0).sum() == len(val_rows) + best["k"]  # validation rows and the dropped ones
    assert all(d.sample_weight_[x["index"]] == 0 for x in best["dropped"])


def test_same_seed_same_model(tmp_path, synthetic_root, tiny_config, fitted):
    r = run("fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(tmp_path / "b"), "--quiet", "--lam", "0.5")
    assert r.exit_code == 0, r.output
    a = np.load(fitted / "train_embeddings.npy")
    b = np.load(tmp_path / "b" / "train_embeddings.npy")
    assert np.array_equal(a, b)


def test_builtin_efficientnet_end_to_end(tmp_path, synthetic_root):
    r = run("fit", "--backbone", "efficientnet_lite0", "--data", str(synthetic_root), "--out", str(tmp_path / "e"), "--quiet", "--t", "0.5")
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    r = run("explain", str(tmp_path / "e"), str(synthetic_root / "class_00" / "img_000.png"), "--top-k", "2")
    assert r.exit_code == 0, r.output
    assert "page:" in r.output and (tmp_path / "e" / "index.html").is_file()


def bad(args, match):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    assert match in r.output, r.output
    return r


def test_user_mistakes_give_one_line_errors(tmp_path, fitted, synthetic_root, tiny_config):
    bad(["fit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "does not exist")
    bad(["fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(tmp_path / "o"), "--lam", "0"], "head.lam: expected 'auto' or a finite number > 0")
    bad(["fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(tmp_path / "o"), "--t", "-1"], "'--t': -1.0 is not in the range x>=0")
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("head:\n  lamda: 2\n")
    bad(["fit", "--config", str(cfg), "--out", str(tmp_path / "o")], "unknown key(s) ['lamda']")
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(one / "only" / f"{i}.png")
    bad(["fit", "--config", tiny_config, "--data", str(one), "--out", str(tmp_path / "o")], "at least 2 class folders")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    Image.new("RGB", (32, 32)).save(empty / "a" / "x.png")
    bad(["fit", "--config", tiny_config, "--data", str(empty), "--out", str(tmp_path / "o")], "has no images")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bad(["explain", str(fitted), str(text)], "cannot read image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    bad(["explain", str(fitted), str(tiny)], "smaller than one 16-px patch")
    bad(["explain", str(fitted), str(synthetic_root / "class_00"), "--top-k", "1000"], "1 <= k <=")
    not_run = tmp_path / "not_run"
    not_run.mkdir()
    bad(["explain", str(not_run), str(synthetic_root / "class_00")], "run metadata not found")
    bad(["fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(tmp_path / "o"), "--device", "tpu"], "device")


def test_unwritable_output_is_a_one_line_error(monkeypatch, tmp_path, synthetic_root, tiny_config):
    import errno

    from carrot.run import commands as orchestration

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "head.safetensors"))

    monkeypatch.setattr(orchestration, "fit", full_disk)
    r = CliRunner().invoke(cli, ["fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"carrot-run: error: No space left on device: '{tmp_path / 'o' / 'head.safetensors'}'"]

    def bug(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(orchestration, "fit", bug)  # anything else is an internal error, not hidden
    r = CliRunner().invoke(cli, ["fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and isinstance(r.exception, OSError)


def test_explain_refuses_other_backbone_weights(tmp_path, fitted, synthetic_root):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fitted, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta["backbone"]["weights_id"] = "f" * 64
    (copy / "run.json").write_text(json.dumps(meta))
    bad(["explain", str(copy), str(synthetic_root / "class_00")], "differ from the run's")


def test_default_yaml_equals_code_defaults():
    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "configs" / "default.yaml") == RunConfig()
    assert load_config(root / "configs" / "cub.yaml").data.kind == "cub"
    with pytest.raises(CarrotError, match="unknown key 'bogus'"):
        RunConfig.from_dict({"bogus": 1})


def test_the_config_is_the_single_source_of_default_yaml_and_the_flags():
    """configs/default.yaml is generated from the config's fields (a key missing from it, or a stale default or help,
    fails here: run `make config`), and every flag's help is its field's own."""
    import yaml

    from carrot.config import config_keys, default_yaml

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "default.yaml").read_text()
    assert text == default_yaml(), "configs/default.yaml is stale: run `make config`"
    raw = yaml.safe_load(text)
    listed = {f"{s}.{k}" for s, v in raw.items() if isinstance(v, dict) for k in v} | {k for k, v in raw.items()
                                                                                      if not isinstance(v, dict)}
    keys = config_keys()
    assert listed == {k for k, _ in keys} and all(f.metadata["help"].strip() for _, f in keys)
    helps = {p.opts[0]: p.help for p in cli.commands["fit"].params if isinstance(p, click.Option)}
    for key, f in keys:
        if f.metadata["flag"]:
            assert helps[f.metadata["flag"]].startswith(f.metadata["help"]), key  # plus the default, when unsaid


def test_help_everywhere():
    for cmd in ([], ["fit"], ["explain"], ["demo"]):
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


def test_evaluate_and_reweight_commands(fitted, tmp_path):
    r = run("evaluate", str(fitted), "--k", "1,2", "--n-test", "3", "--subsets", "5", "--flip-fraction", "0.2", "--json",
            "--out", str(tmp_path / "ev.json"))
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ev.json").read_text())
    assert json.loads(r.stdout) == res
    assert {"mislabel", "faithfulness", "lds", "agreement_with_exact_loo"} <= set(res)
    assert res["agreement_with_exact_loo"]["carrot_representer"]["spearman"] <= 1.0
    r = run("reweight", str(fitted), "--steps", "3", "--val-fraction", "0.3", "--out", str(tmp_path / "rw.json"))
    assert r.exit_code == 0, r.output
    rw = json.loads((tmp_path / "rw.json").read_text())
    assert len(rw["history"]) == 4 and len(rw["weights"]) == 12
    bad(["evaluate", str(fitted), "--what", "speed"], "--what: expected some of accuracy, mislabel")
    r = run("evaluate", str(fitted), "--what", "accuracy", "--shots", "2", "--seeds", "0,1,2", "--out", str(tmp_path / "acc.json"))
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("accuracy (2-shot, 3 seeds): ") and r.stdout.strip().endswith("acc.json")
    acc = json.loads((tmp_path / "acc.json").read_text())["accuracy"]
    assert acc["seeds"] == [0, 1, 2] and all(p["n_train"] == 2 * 3 for p in acc["per_seed"])
    bad(["evaluate", str(fitted), "--what", "accuracy", "--shots", "50"], "shots: expected at most")
    bad(["evaluate", str(fitted), "--seeds", "-1"], "--seeds: expected integers >= 0")
    bad(["evaluate", str(fitted), "--k", "a,b"], "--k: expected comma-separated integers")
    bad(["evaluate", str(fitted), "--k", "100"], "K < n = 12")
    bad(["reweight", str(fitted), "--steps", "0"], "'--steps': 0 is not in the range x>=1")


def test_extract_and_bench_commands(fitted, tmp_path, synthetic_root, tiny_config):
    r = run("extract", "--config", tiny_config, "--data", str(synthetic_root), "--quiet")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["n"] == [12, 6] and Path(info["train"]).is_dir()
    r = run("bench", str(fitted), "--t", "0,1", "--out", str(tmp_path / "sweep.json"))
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [x["t"] for x in rows] == [0.0, 1.0] and (tmp_path / "sweep.csv").is_file()
    bad(["bench", str(fitted), "--t", "-1"], "t: expected diffusion times >= 0")
    bad(["bench", str(fitted), "--t", "x"], "--t: expected comma-separated numbers")


def test_explain_with_node_removal_and_region_mask(fitted, synthetic_root, tmp_path):
    img = synthetic_root / "class_02" / "img_001.png"
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = run("explain", str(fitted), str(img), "--node-removal", "--region-mask", str(tmp_path / "mask.png"),
            "--out", str(tmp_path / "x"), "--json", "--top-k", "2")
    assert r.exit_code == 0, r.output
    e = json.loads(r.stdout)[0]
    assert len(e["node_removal"]) == 4 and e["deletion"]["fractions"][0] == 0
    assert set(e["segments"]) == {"0", "1"}
    assert sum(e["segments"].values()) == pytest.approx(e["region_sum"], rel=1e-9)
    assert set(e["segment_removal"]) == {"0", "1"}
    bad(["explain", str(fitted), str(synthetic_root / "class_00"), "--region-mask", str(tmp_path / "mask.png")],
        "exactly one image")


def test_tracin_and_debug_commands(fitted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(fitted, run_dir)
    r = run("tracin", str(run_dir), "--n-test", "3", "--flag-fraction", "0.25", "--epochs", "4", "--checkpoints", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_checkpoints"] == 2
    assert {p.name for p in (run_dir / "tracin").iterdir()} == {"summary.json", "self_influence.json", "influence.json"}
    assert "TracIn analysis" in (run_dir / "index.html").read_text()
    r = run("debug", str(run_dir), "--drop", "1,2", "--val-fraction", "0.34")
    assert r.exit_code == 0, r.output
    assert [row["k"] for row in json.loads(r.stdout)["rows"]] == [1, 2]
    bad(["debug", str(run_dir), "--drop", "0"], "--drop: expected integers >= 1")
    bad(["tracin", str(run_dir), "--flag-fraction", "2"], "--flag-fraction")


def test_fit_refuses_to_overwrite_a_run_unless_asked(tmp_path, synthetic_root, tiny_config):
    out = tmp_path / "r"
    args = ["fit", "--config", tiny_config, "--data", str(synthetic_root), "--out", str(out), "--quiet"]
    assert run(*args).exit_code == 0
    (out / "explanations").mkdir()
    (out / "explanations" / "old.json").write_text("{}")
    bad(args, "already holds a fitted run; pass --overwrite")
    r = run(*args, "--overwrite", "--lam", "2")
    assert r.exit_code == 0, r.output
    assert not (out / "explanations").exists()
    assert json.loads((out / "run.json").read_text())["config"]["head"]["lam"] == 2.0


def test_evaluate_region_deletion(fitted, tmp_path):
    import torch

    from carrot.attribution.representer import region_contributions
    from carrot.features.backbone import patch_centres
    from carrot.run.pipeline import Carrot
    from carrot.attribution.regions import deletion_insertion
    from carrot.features.regions import RegionSet
    from carrot.audit.protocols import region_deletion
    from carrot.run.operations import cached_test_split

    r = run("evaluate", str(fitted), "--what", "deletion", "--n-test", "6", "--out", str(tmp_path / "d.json"))
    assert r.exit_code == 0 and "region deletion AUC (6 images" in r.output, r.output
    d = json.loads((tmp_path / "d.json").read_text())["deletion"]
    assert d["deletion"] < d["deletion_random"] and d["insertion"] > d["insertion_random"]  # the exact order is informative
    # one image: the pooled value is that image's (AUC - prior) / (logit - prior), by hand
    model = Carrot.load(fitted)
    one = region_deletion(model, cached_test_split(fitted, model), n_test=1, seed=3)
    store = cached_test_split(fitted, model)
    i = int(np.random.default_rng(3).choice(len(store), 1, replace=False)[0])
    H = torch.from_numpy(np.asarray(store.tokens[i], dtype=np.float64))
    P = patch_centres(store.grid, torch.float64)
    glob = torch.from_numpy(np.asarray(store.globals[i], dtype=np.float64)) if model.config.backbone.global_tokens else None
    G, w = model.embed_regions(RegionSet(H[None], P, store.grid, None if glob is None else glob[None]))
    logits = model.head_.decision_function(G.numpy())[0]
    c = int(logits.argmax())
    prior = float(model.head_.prior_[c])
    order = np.argsort(-region_contributions(model.head_, H, w[0], glob)[: H.shape[0], c].numpy(), kind="stable")
    dele, ins = deletion_insertion(model.head_, H, P, c, order, model.embedder, steps=8, globals=glob)
    assert one["deletion"] == pytest.approx((dele.auc - prior) / (logits[c] - prior), rel=1e-9)
    assert one["insertion"] == pytest.approx((ins.auc - prior) / (logits[c] - prior), rel=1e-9)


def test_evaluate_pointing_on_known_parts(fitted, tmp_path):
    r = run("evaluate", str(fitted), "--what", "pointing", "--out", str(tmp_path / "p.json"))
    assert r.exit_code == 0, r.output
    p = json.loads((tmp_path / "p.json").read_text())["pointing"]
    assert p["n"] == 6 and 0 <= p["hit_rate"] <= 1 and 0 < p["random_region_hit_rate"] <= 1
