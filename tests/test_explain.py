"""An explanation lists, per training image, three exact numbers, ranked by the one that measures best
(the exact removal effect), with region pairs in that metric and a counterfactual certificate."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from carrot.ridge.head import frozen_clone
from carrot.run.pipeline import Carrot
from cli.main import cli



@pytest.fixture(scope="module")
def fitted(tmp_path_factory, fit_tiny):
    return fit_tiny(tmp_path_factory.mktemp("explain") / "run", head={"lam": 0.3})


def test_listed_numbers_are_exact_and_ranked_by_removal(fitted, synthetic_root):
    model = Carrot.load(fitted)
    img = str(synthetic_root / "class_01" / "img_002.png")
    (exp,) = [e.to_json() for e in model.explain([img], k=3, certificate_limit=8)]
    G = model.embed_images([img])[0]
    y = np.array([r.label for r in model.train_records_])
    c = exp["predicted_index"]
    logit = exp["logits"][exp["predicted"]]
    assert exp["ranking"] == "removal" and {"score", "removal", "equivalent_kernel", "representer"} <= set(exp["meaning"])
    for view in ("data", "equivalent_kernel", "regions"):
        assert exp["identity_error"][view] <= 1e-9 * max(1.0, abs(logit)), view
    scores = [r["score"] for r in exp["supporting"]]
    assert scores == sorted(scores, reverse=True) and scores[0] >= max(r["score"] for r in exp["inhibiting"])
    for r in exp["supporting"] + exp["inhibiting"]:
        keep = np.arange(len(y)) != r["index"]
        refit = frozen_clone(model.head_).fit(model.train_embeddings_[keep], y[keep]).decision_function(G)[0, c]
        assert r["removal_effect"] == pytest.approx(refit - logit, abs=1e-9) and r["score"] == -r["removal_effect"]
        assert r["pair_sum_error"] <= 1e-9 * max(1.0, abs(r["score"]))
        total = sum(map(sum, r["test_regions"])) + r["pair_intercept"] + r.get("pair_global", 0.0)  # class tokens' part
        assert total == pytest.approx(r["score"], abs=1e-9)
    cert = exp["certificate"]
    assert cert["limit"] == 8 and cert["seconds"] >= 0
    if cert["found"]:
        removed = [x["index"] for x in cert["images"]]
        keep = np.setdiff1d(np.arange(len(y)), removed)
        f = frozen_clone(model.head_).fit(model.train_embeddings_[keep], y[keep]).decision_function(G)[0]
        assert model.classes_[int(f.argmax())] == cert["new_class"] != exp["predicted"]
    else:
        assert cert["images"] == [] and cert["new_class"] is None


def test_cli_json_has_the_python_api_fields_and_the_page_says_what_each_number_means(fitted, synthetic_root, tmp_path):
    img = str(synthetic_root / "class_02" / "img_000.png")
    r = CliRunner().invoke(cli, ["explain", str(fitted), img, "--json", "--top-k", "2", "--out", str(tmp_path / "x")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (cli_exp,) = json.loads(r.stdout)
    (api_exp,) = [e.to_json() for e in Carrot.load(fitted).explain([img], k=2)]
    assert set(api_exp) <= set(cli_exp) and set(cli_exp) - set(api_exp) == {"heatmap", "page"}
    assert set(api_exp["supporting"][0]) == set(cli_exp["supporting"][0])
    sec = cli_exp["seconds"]  # each part of the explanation by its own clock, the page written by the CLI
    parts = [sec[k] for k in ("token_map", "training_images", "certificate", "pixel_maps", "graph")]
    assert min(parts) >= 0 and sec["total"] == pytest.approx(sum(parts), rel=1e-6) and sec["page"] > 0
    assert sec["pixel_maps"] >= cli_exp["pixel_map_seconds"] > 0
    page = (tmp_path / "x").glob("*/explanation.html").__next__().read_text()
    assert "the exact change of this logit if the image is removed" in page and "Certificate:" in page


def test_certificate_audit_on_the_index(fitted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--what", "certificates", "--n-test", "4", "--certificate-limit", "5"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("certificates (4 predictions, up to 5 removals): ")
    c = json.loads((run / "evaluation.json").read_text())["certificates"]
    assert sum(n for _, n in c["histogram"]) == c["n"] == len(c["sizes"]) == 4
    assert [b for b, _ in c["histogram"]] == ["1", "2", "3-4", "5", "none up to 5"]
    assert c["found"] == sum(s is not None for s in c["sizes"]) and len(c["smallest"]) == c["found"]
    assert all(s["size"] == len(s["training_images"]) <= 5 and s["new_class"] != s["predicted"] for s in c["smallest"])
    assert "Counterfactual certificates" in (run / "index.html").read_text()
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--what", "certificates", "--certificate-limit", "0"])
    assert r.exit_code == 2 and "--certificate-limit" in r.output
