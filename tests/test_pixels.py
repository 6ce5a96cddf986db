"""Pixel-faithful region maps: exact cell occlusion and the pixel deletion / insertion protocol, against
brute-force re-runs of the model."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from click.testing import CliRunner

from carrot.attribution.pixels import (PixelFill, blur, cell_boxes, default_sigma, occlusion_map, path_split, pixel_curves, shapley_map,
                                      summarise)
from carrot.cli import cli
from carrot.errors import CarrotError


@pytest.mark.parametrize("grid,size", [((16, 16), (224, 224)), ((7, 7), (224, 224)), ((3, 5), (30, 50)), ((1, 1), (9, 9)),
                                       ((4, 4), (30, 30))])
def test_cells_tile_the_input_once_in_token_order(grid, size):
    boxes = cell_boxes(grid, size)
    cover = np.zeros(size, dtype=int)
    for y0, y1, x0, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert len(boxes) == grid[0] * grid[1] and (cover == 1).all()
    assert len(boxes) == 1 or boxes[1][2] > boxes[0][2] or grid[1] == 1  # row-major: the second cell is to the right of the first


def test_cells_refuse_a_grid_finer_than_the_pixels():
    with pytest.raises(CarrotError, match="grid: expected"):
        cell_boxes((40, 4), (30, 30))


def test_blur_keeps_constants_and_is_linear():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 20, 24, generator=g)
    const = torch.full((3, 20, 24), 0.7)
    assert torch.allclose(blur(const, 3.0), const, atol=1e-6)
    assert torch.allclose(blur(2 * a + b, 3.0), 2 * blur(a, 3.0) + blur(b, 3.0), atol=1e-5)


def linear_model(seed: int, shape=(3, 12, 16), classes: int = 3):
    """logits = flatten(x) A: additive over pixels, so every protocol number has a closed form."""
    A = torch.randn(int(np.prod(shape)), classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def logits(x: torch.Tensor) -> np.ndarray:
        return (x.reshape(len(x), -1).to(torch.float64) @ A).numpy()

    return logits


@pytest.mark.parametrize("seed,grid", [(0, (3, 4)), (1, (4, 4)), (2, (2, 8)), (3, (1, 1))])
def test_occlusion_equals_a_rerun_with_each_cell_blurred(seed, grid):
    logits = linear_model(seed)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed + 10))
    sigma = default_sigma(grid, (12, 16))
    xb = blur(x[None], sigma)[0]
    occ = occlusion_map(PixelFill(logits, x, grid), 1, batch=5)
    full = logits(x[None])[0, 1]
    for j, (y0, y1, x0, x1) in enumerate(cell_boxes(grid, (12, 16))):
        xj = x.clone()
        xj[:, y0:y1, x0:x1] = xb[:, y0:y1, x0:x1]
        assert occ.ravel()[j] == pytest.approx(full - logits(xj[None])[0, 1], abs=1e-9)


def nonlinear_model(seed: int, shape=(3, 12, 16)):
    """Logits with interactions between cells (products and saturation), so Shapley values differ from occlusion."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(int(np.prod(shape)), 4, generator=g, dtype=torch.float64) / 10

    def logits(x: torch.Tensor) -> np.ndarray:
        z = x.reshape(len(x), -1).to(torch.float64) @ A
        return torch.stack([torch.tanh(z[:, 0]) * z[:, 1] + z[:, 2] ** 2, z[:, 3] * z[:, 0]], 1).numpy()

    return logits


def exact_shapley(logits, x: torch.Tensor, c: int, grid) -> np.ndarray:
    """Shapley values of the blur game by enumerating every subset of cells: phi_j = sum over S not holding j of
    |S|! (N - |S| - 1)! / N! (v(S + j) - v(S)), v(S) = f(x) - f(x with S blurred)."""
    from itertools import combinations
    from math import factorial

    size = tuple(x.shape[-2:])
    boxes = cell_boxes(grid, size)
    n = len(boxes)
    xb = blur(x[None], default_sigma(grid, size))[0]

    def f(S) -> float:
        y = x.clone()
        for j in S:
            y0, y1, x0, x1 = boxes[j]
            y[:, y0:y1, x0:x1] = xb[:, y0:y1, x0:x1]
        return float(logits(y[None])[0, c])

    value = {S: f(S) for k in range(n + 1) for S in combinations(range(n), k)}
    phi = np.zeros(n)
    for S, fS in value.items():
        for j in set(range(n)) - set(S):
            weight = factorial(len(S)) * factorial(n - len(S) - 1) / factorial(n)
            phi[j] += weight * (fS - value[tuple(sorted(S + (j,)))])
    return phi.reshape(grid)


@pytest.mark.parametrize("seed,grid,K", [(0, (2, 2), 2), (1, (2, 2), 6), (2, (2, 3), 4), (3, (1, 1), 2), (4, (3, 4), 8),
                                         (5, (4, 4), 2)])
def test_the_shapley_map_sums_exactly_for_any_number_of_orders(seed, grid, K):
    logits = nonlinear_model(seed)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed + 20))
    phi, info = shapley_map(PixelFill(logits, x, grid), 0, permutations=K, batch=7, seed=seed)
    xb = blur(x[None], default_sigma(grid, (12, 16)))[0]
    ends = logits(torch.stack([x, xb]))[:, 0]
    assert phi.shape == info["sem"].shape == grid and info["permutations"] == K
    assert phi.sum() == pytest.approx(ends[0] - ends[1], rel=1e-12, abs=1e-12)
    assert info["completeness_error"] < 1e-12 * max(1.0, abs(ends[0] - ends[1]))
    assert np.isnan(info["sem"]).all() == (K == 2)


@pytest.mark.parametrize("seed,grid", [(0, (2, 2)), (1, (2, 3)), (2, (1, 5))])
def test_the_shapley_map_converges_to_the_exact_shapley_values(seed, grid):
    """Against subset enumeration: the sampled values lie within a few of their own standard errors."""
    logits = nonlinear_model(seed)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed + 30))
    exact = exact_shapley(logits, x, 0, grid)
    phi, info = shapley_map(PixelFill(logits, x, grid), 0, permutations=400, batch=64, seed=seed)
    assert np.all(np.abs(phi - exact) <= 5 * info["sem"] + 1e-10), (phi, exact, info["sem"])
    assert not np.allclose(exact, occlusion_map(PixelFill(logits, x, grid), 0), atol=1e-3)  # the game has interactions


@pytest.mark.parametrize("seed", [0, 1])
def test_two_cells_need_one_antithetic_pair(seed):
    """With two cells an order and its reverse are every order: the estimate is the exact Shapley value."""
    logits = nonlinear_model(seed)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed))
    phi, _ = shapley_map(PixelFill(logits, x, (1, 2)), 1, permutations=2, seed=seed)
    assert np.allclose(phi, exact_shapley(logits, x, 1, (1, 2)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed,grid", [(0, (2, 3)), (1, (3, 3)), (2, (1, 7))])
def test_one_antithetic_pair_is_exact_for_pairwise_interactions(seed, grid):
    """f = (x . u)^2 has only pairwise interactions between cells: each pair of cells comes in both orders across
    an order and its reverse, so K = 2 gives the exact Shapley values (it fails without the reverse)."""
    u = torch.randn(3 * 12 * 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / 10

    def quad(inp):
        z = inp.reshape(len(inp), -1).to(torch.float64) @ u
        return torch.stack([z ** 2, z], 1).numpy()

    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed + 50))
    phi, _ = shapley_map(PixelFill(quad, x, grid), 0, permutations=2, seed=seed)
    assert np.allclose(phi, exact_shapley(quad, x, 0, grid), rtol=1e-9, atol=1e-12)


def test_the_standard_error_matches_the_spread_over_seeds():
    logits = nonlinear_model(3)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(3))
    runs = [shapley_map(PixelFill(logits, x, (2, 3)), 0, permutations=8, seed=s) for s in range(150)]
    spread = np.std([r[0] for r in runs], axis=0, ddof=1)
    sem = np.mean([r[1]["sem"] for r in runs], axis=0)
    assert spread.min() > 0 and np.all((sem / spread > 0.67) & (sem / spread < 1.5)), sem / spread


@pytest.mark.parametrize("seed,grid", [(0, (3, 4)), (1, (2, 8))])
def test_the_shapley_map_of_an_additive_model_is_occlusion(seed, grid):
    logits = linear_model(seed)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed + 40))
    phi, info = shapley_map(PixelFill(logits, x, grid), 2, permutations=4, seed=seed)
    assert np.allclose(phi, occlusion_map(PixelFill(logits, x, grid), 2), rtol=1e-9, atol=1e-9)
    assert np.allclose(info["sem"], 0, atol=1e-9)


@pytest.mark.parametrize("bad", [0, 1, 3, -2, 2.0, True, "4"])
def test_the_shapley_map_refuses_an_odd_number_of_orders_or_a_bad_batch(bad):
    with pytest.raises(CarrotError, match="permutations: expected an even integer >= 2"):
        shapley_map(PixelFill(linear_model(0), torch.zeros(3, 12, 16), (2, 2)), 0, permutations=bad)
    if bad != 1 and bad != 3:
        with pytest.raises(CarrotError, match="batch: expected an integer >= 1"):
            shapley_map(PixelFill(linear_model(0), torch.zeros(3, 12, 16), (2, 2)), 0, batch=bad)


@pytest.mark.parametrize("seed,grid", [(0, (3, 4)), (1, (2, 8)), (2, (1, 1))])
def test_the_pixel_split_of_a_linear_model_is_its_closed_form(seed, grid):
    """For f = flatten(x) A the path integral is exact: cell share = sum over the cell of (x - blur x) A_c."""
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed))
    A = torch.randn(3 * 12 * 16, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def lin(inp):
        return inp.reshape(len(inp), -1).to(torch.float64) @ A

    split, info = path_split(lin, x, 1, grid, nodes=4)
    xb = blur(x[None], default_sigma(grid, (12, 16)))[0]
    contrib = ((x - xb).reshape(-1).to(torch.float64) * A[:, 1]).reshape(3, 12, 16).sum(0).numpy()
    for j, (y0, y1, x0, x1) in enumerate(cell_boxes(grid, (12, 16))):
        # float32 inputs: the gradient reaches the pixels in float32 (relative rounding ~1e-7)
        assert split.ravel()[j] == pytest.approx(contrib[y0:y1, x0:x1].sum(), rel=1e-6, abs=1e-6)
    assert info["completeness_error"] < 1e-6 * max(1.0, abs(info["full"]))


@pytest.mark.parametrize("seed", range(3))
def test_the_pixel_split_sums_to_the_logit_change_for_a_nonlinear_model(seed):
    """A smooth nonlinear model: 16 Gauss-Legendre nodes give completeness to 1e-8, and agree with a 4096-step
    midpoint rule (an independent quadrature of the same path integral)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3 * 12 * 16, 8, generator=g, dtype=torch.float64) / 20
    B = torch.randn(8, 3, generator=g, dtype=torch.float64)

    def f(inp):
        return torch.tanh(inp.reshape(len(inp), -1).to(torch.float64) @ A) @ B

    x = torch.randn(3, 12, 16, generator=g)
    grid = (3, 4)
    split, info = path_split(f, x, 2, grid, nodes=16)
    assert info["completeness_error"] < 1e-6 * max(1.0, abs(info["full"]))  # float32 inputs
    xb = blur(x[None], default_sigma(grid, (12, 16)))[0]
    m = 4096
    alphas = (torch.arange(m, dtype=torch.float32) + 0.5) / m
    grad = torch.zeros(3, 12, 16, dtype=torch.float64)
    for s in range(0, m, 512):
        inp = (xb[None] + alphas[s : s + 512].view(-1, 1, 1, 1) * (x - xb)[None]).requires_grad_(True)
        grad += torch.autograd.grad(f(inp)[:, 2].sum(), inp)[0].to(torch.float64).sum(0) / m
    ref = (grad * (x - xb).to(torch.float64)).sum(0).numpy()
    cells = [ref[y0:y1, x0:x1].sum() for y0, y1, x0, x1 in cell_boxes(grid, (12, 16))]
    assert np.allclose(split.ravel(), cells, atol=1e-5)


@pytest.mark.parametrize("seed,steps", [(0, 4), (1, 16), (2, 3)])
def test_curves_equal_reruns_and_end_at_the_image_and_the_blur(seed, steps):
    logits = linear_model(seed)
    grid, size = (3, 4), (12, 16)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *size, generator=g)
    order = np.random.default_rng(seed).permutation(12)
    cur = pixel_curves(PixelFill(logits, x, grid), 2, order, steps=steps, batch=7)
    xb = blur(x[None], default_sigma(grid, size))[0]
    boxes = cell_boxes(grid, size)
    for f, d, ins in zip(cur.fractions, cur.deletion, cur.insertion):
        k = int(round(f * 12))
        xd, xi = x.clone(), xb.clone()
        for j in order[:k]:
            y0, y1, x0, x1 = boxes[j]
            xd[:, y0:y1, x0:x1] = xb[:, y0:y1, x0:x1]
            xi[:, y0:y1, x0:x1] = x[:, y0:y1, x0:x1]
        assert d == pytest.approx(logits(xd[None])[0, 2], abs=1e-9)
        assert ins == pytest.approx(logits(xi[None])[0, 2], abs=1e-9)
    assert cur.fractions[0] == 0 and cur.fractions[-1] == 1
    assert cur.deletion[0] == pytest.approx(cur.full) and cur.deletion[-1] == pytest.approx(cur.removed)
    assert cur.insertion[0] == pytest.approx(cur.removed) and cur.insertion[-1] == pytest.approx(cur.full)
    v = (cur.deletion - cur.removed) / (cur.full - cur.removed)
    if cur.full > cur.removed:
        assert cur.auc("deletion") == pytest.approx(float(np.trapezoid(v, cur.fractions)))
    else:
        assert np.isnan(cur.auc("deletion"))


@pytest.mark.parametrize("seed", range(4))
def test_for_an_additive_model_the_occlusion_order_deletes_best(seed):
    """When blurring cells adds up (a linear model), the occlusion order is the best deletion order at every
    step, so its AUC is at most that of any other order, and its insertion AUC at least."""
    logits = linear_model(seed)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed))
    c, grid = 0, (3, 4)
    occ = occlusion_map(PixelFill(logits, x, grid), c).ravel()
    best = pixel_curves(PixelFill(logits, x, grid), c, np.argsort(-occ, kind="stable"), steps=12)
    rng = np.random.default_rng(seed)
    for _ in range(10):
        other = pixel_curves(PixelFill(logits, x, grid), c, rng.permutation(12), steps=12)
        assert (best.deletion <= other.deletion + 1e-9).all() and (best.insertion >= other.insertion - 1e-9).all()
        if best.full > best.removed:
            assert best.auc("deletion") <= other.auc("deletion") + 1e-9
            assert best.auc("insertion") >= other.auc("insertion") - 1e-9
        else:  # the blurred image scores the class higher: nothing to delete, left out of the means
            assert np.isnan(best.auc("deletion")) and np.isnan(other.auc("insertion"))


def test_curves_refuse_a_bad_order_and_steps():
    logits = linear_model(0)
    x = torch.zeros(3, 12, 16)
    with pytest.raises(CarrotError, match="order: expected a permutation of the 12 cells"):
        pixel_curves(PixelFill(logits, x, (3, 4)), 0, [0, 1, 2])
    with pytest.raises(CarrotError, match="steps: expected an integer >= 1"):
        pixel_curves(PixelFill(logits, x, (3, 4)), 0, range(12), steps=0)


def test_pooling_weighs_images_by_their_span_and_leaves_out_the_rest():
    from carrot.attribution.pixels import pooled

    p = pooled([0.2, 0.8, 5.0, float("nan")], [3.0, 1.0, -1.0, 2.0])
    assert p["mean"] == pytest.approx((0.2 * 3 + 0.8 * 1) / 4) and p["n"] == 2 and p["left_out"] == 2
    assert p["sem"] > 0
    one = pooled([0.5], [1.0])
    assert one["mean"] == 0.5 and np.isnan(one["sem"])


def test_summary_leaves_out_images_whose_blur_changes_nothing():
    s = summarise([0.2, 0.4, float("nan")])
    assert s["n"] == 2 and s["left_out"] == 1 and s["mean"] == pytest.approx(0.3) and s["sem"] == pytest.approx(0.1)


# -- the fitted model: the pixel path is the model, the page's default map is exact for the pixels ---------
@pytest.fixture(scope="module")
def run(tmp_path_factory, fit_tiny):
    return fit_tiny(tmp_path_factory.mktemp("pixels") / "run", backbone={"name": "vit_tiny_patch16_224", "img_size": 64,
                                                                          "pretrained": False, "batch_size": 8})


def test_pixel_logits_are_the_models_logits(run):
    from carrot.run.pipeline import Carrot

    model = Carrot.load(run)
    paths = [p for p, _ in model.test_records_[:3]]
    G = model.embed_images(paths)[0]
    assert np.allclose(model.pixel_logits(model.inputs(paths)), model.head_.decision_function(G), atol=1e-12)


def test_explain_gives_the_exact_pixel_map_beside_the_token_map(run, tmp_path, explain_json):
    from carrot.run.pipeline import Carrot

    model = Carrot.load(run)
    path = model.test_records_[0][0]
    exp = explain_json(run, path, tmp_path, "--occlusion", "--pixel-map", "split", "--removal", "blur")
    assert exp["pixel_map_method"] == "split" and "path" in exp["meaning"]["pixel_map"]
    split = np.asarray(exp["pixel_map"])
    assert split.shape == tuple(exp["grid"]) == (4, 4)
    assert {"pixel_map", "pixel_occlusion", "region_contributions"} <= set(exp["meaning"])
    full = exp["logits"][exp["predicted"]]  # the split sums to logit(image) - logit(blurred image)
    x = model.inputs([path])[0]
    xb = blur(x[None], default_sigma((4, 4), tuple(x.shape[-2:])))[0]
    with torch.no_grad():  # the unrounded model the split integrates, recomputed independently
        ends = model.torch_logits(torch.stack([x, xb]))[:, exp["predicted_index"]].numpy()
    assert exp["pixel_map_removed_logit"] == pytest.approx(ends[1], abs=1e-9)
    assert abs(split.sum() - (ends[0] - ends[1])) == pytest.approx(exp["pixel_map_completeness_error"], abs=1e-9)
    assert exp["pixel_map_completeness_error"] < 1e-2 * abs(ends[0] - ends[1])  # 32 nodes on a random-init ViT
    assert abs(ends[0] - full) < 1e-2 * max(1.0, abs(full))  # unrounded vs cache-rounded tokens
    pm = np.asarray(exp["pixel_occlusion"])
    x = model.inputs([path])[0]
    c = exp["predicted_index"]
    xb = blur(x[None], default_sigma((4, 4), tuple(x.shape[-2:])))[0]
    full = model.pixel_logits(x[None])[0, c]
    for j in (0, 5, 15):  # brute force: blur one cell, re-run everything
        y0, y1, x0, x1 = cell_boxes((4, 4), tuple(x.shape[-2:]))[j]
        xj = x.clone()
        xj[:, y0:y1, x0:x1] = xb[:, y0:y1, x0:x1]
        assert pm.ravel()[j] == pytest.approx(full - model.pixel_logits(xj[None])[0, c], abs=1e-9)
    html = next(tmp_path.glob("0000_*/explanation.html")).read_text()
    assert "pixels &rarr;" in html and "tokens &rarr;" in html and "occlusion &rarr;" in html


def test_explain_defaults_to_the_shapley_map_which_sums_exactly(run, tmp_path, explain_json):
    """The default pixel map: its values sum to f(x) - f(blurred x) of the model explain re-runs (recomputed here
    independently), each cell has a standard error, and the page says what the map is."""
    from carrot.run.pipeline import Carrot

    model = Carrot.load(run)
    path = model.test_records_[1][0]
    exp = explain_json(run, path, tmp_path, "--removal", "blur")
    assert exp["pixel_map_method"] == "shapley" and exp["pixel_map_permutations"] == 4 and exp["pixel_map_removal"] == "blur"
    assert "Shapley" in exp["meaning"]["pixel_map"] and "pixel_occlusion" not in exp
    phi, sem = np.asarray(exp["pixel_map"]), np.asarray(exp["pixel_map_sem"], dtype=float)
    assert phi.shape == sem.shape == (4, 4) and (sem >= 0).all()
    x = model.inputs([path])[0]
    xb = blur(x[None], default_sigma((4, 4), tuple(x.shape[-2:])))[0]
    ends = model.pixel_logits(torch.stack([x, xb]))[:, exp["predicted_index"]]
    assert ends[0] == pytest.approx(exp["logits"][exp["predicted"]], abs=1e-9)
    assert phi.sum() == pytest.approx(ends[0] - ends[1], rel=1e-12, abs=1e-12)
    assert exp["pixel_map_completeness_error"] < 1e-12 * max(1.0, abs(ends[0] - ends[1]))
    page = next(tmp_path.glob("0000_*/explanation.html")).read_text()
    assert "Shapley value" in page and "4 random orders" in page
    r = CliRunner().invoke(cli, ["explain", str(run), path, "--out", str(tmp_path / "b"), "--json", "--permutations", "3"])
    assert r.exit_code == 2 and "--permutations" in r.output and "expected an even number" in r.output
    for bad in (["shapley"], False, "ig"):
        with pytest.raises(CarrotError, match="pixel_map: expected one of shapley, split or None"):
            model.explain([path], pixel_map=bad)
    r = CliRunner().invoke(cli, ["explain", str(run), path, "--out", str(tmp_path / "c"), "--json", "--pixel-map", "none"])
    none = json.loads(r.stdout)[0]
    assert r.exit_code == 0 and "pixel_map" not in none and "pixel_map" not in none["meaning"]


def test_evaluate_pixel_deletion_reports_each_map_under_each_removal(run):
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--what", "pixel-deletion", "--n-test", "3", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["pixel_deletion"]
    maps = {"shapley", "split", "occlusion", "token", "random"}
    assert p["n"] == 3 and p["grid"] == [4, 4] and set(p["maps"]) == maps
    assert p["removals"] == ["blur", "mean", "inpaint", "drop"] == list(p["scores"]) and p["removal"] == "drop"  # a ViT: drop too, and its maps' default
    for r_, scores in p["scores"].items():
        assert set(scores) == maps and set(p["paired"][r_]) == maps - {"shapley"}
        for v in scores.values():
            assert v["deletion"]["n"] + v["deletion"]["left_out"] == 3
            assert v["raw_deletion"]["n"] + v["raw_deletion"]["left_out"] == 3
        for m, d in p["paired"][r_].items():  # paired raw deletion difference from the Shapley map, per image
            per = np.subtract(p["per_image"]["auc"][r_][m]["raw_deletion"], p["per_image"]["auc"][r_]["shapley"]["raw_deletion"])
            per = per[np.isfinite(per)]
            assert d["n"] == len(per) and d["lower"] == int((per < 0).sum())
            assert d["mean"] == pytest.approx(per.mean()) if len(per) else np.isnan(d["mean"])
    page = (run / "index.html").read_text()
    assert "Pixel deletion and insertion" in page and "raw deletion AUC" in page


def test_pixel_deletion_draws_no_map_where_no_removal_lowers_the_logit(run, monkeypatch):
    from carrot.audit import protocols
    from carrot.run.pipeline import Carrot

    drawn = []
    monkeypatch.setattr(protocols, "region_scores", lambda *a, **k: drawn.append(a[1]) or np.zeros(16))
    monkeypatch.setattr(Carrot, "pixel_logits", lambda self, x: np.zeros((len(x), 3)))
    monkeypatch.setattr(Carrot, "kept_logits", lambda self, x, keep: np.zeros((len(x), 3)))
    p = protocols.pixel_deletion(Carrot.load(run), n_test=2, maps=("shapley", "token"))
    assert drawn == [] and p["n"] == 2 and np.isnan(p["maps"]["shapley"]["seconds_per_image"])
    for scores in p["scores"].values():
        for v in scores.values():
            assert v["deletion"]["n"] == 0 and v["deletion"]["left_out"] == 2


def test_the_t_sweep_and_the_pointing_game_report_the_pixel_protocol(run):
    r = CliRunner().invoke(cli, ["bench", str(run), "--t", "0,1", "--pixel-images", "2"])
    assert r.exit_code == 0, r.output
    rows = json.loads((run / "t_sweep.json").read_text())
    assert [row["t"] for row in rows] == [0.0, 1.0]
    for row in rows:
        for key in ("pixel_deletion_shapley", "pixel_insertion_shapley", "pixel_deletion_token", "pixel_insertion_token"):
            assert key in row
        assert row["pixel_removal"] == "drop"  # the unsuffixed columns: the run's removal; the others suffixed
        for r in ("blur", "mean", "inpaint"):
            assert f"pixel_raw_deletion_shapley_{r}" in row and f"pixel_deletion_token_{r}" in row
    assert "Shapley map deletion" in (run / "index.html").read_text()
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--what", "pointing", "--n-test", "2", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["pointing"]
    assert p["n_pixel"] == 2 and 0 <= p["pixel_hit_rate"] <= 1 and 0 <= p["token_hit_rate_same_images"] <= 1


@pytest.mark.parametrize("name,size", [("swin_tiny_patch4_window7_224", 224), ("efficientnet_b0", 64)])
def test_the_pixel_map_follows_the_backbones_grid(name, size, synthetic_root, tmp_path):
    """Hierarchical and convolutional backbones: the cells are the backbone's own grid over the input."""
    from carrot.data import load_imagefolder
    from carrot.features.backbone import create_backbone
    from carrot.run.pipeline import Carrot

    bb = create_backbone(name, img_size=size, pretrained=False, device="cpu")
    train, _ = load_imagefolder(synthetic_root)
    from carrot.config import RunConfig

    model = Carrot(RunConfig().merged({"backbone.blocks": 1, "backbone.global_tokens": False}), backbone=bb)
    assert model.pixel_removal() == "blur"  # auto: no tokens to drop (a ConvNet, a hierarchical ViT)
    G = model.embed_images(train.paths)[0]
    model.fit(G, train.labels, train.records, train.classes)
    x = model.inputs(train.paths[:1])[0]
    with torch.no_grad():
        _, grid = bb(x[None])
    occ = occlusion_map(PixelFill(model.pixel_logits, x, grid), 0)
    assert occ.shape == grid and np.isfinite(occ).all()
    cur = pixel_curves(PixelFill(model.pixel_logits, x, grid), 0, np.argsort(-occ.ravel()), steps=4)
    assert cur.deletion[0] == pytest.approx(cur.full) and cur.deletion[-1] == pytest.approx(cur.removed)


def test_cell_blocks_tile_the_grid_row_major():
    from carrot.attribution.pixels import cell_blocks

    assert cell_blocks((3, 5), 2).reshape(3, 5).tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    assert cell_blocks((2, 3), 1).tolist() == list(range(6)) and cell_blocks((2, 3), 9).tolist() == [0] * 6
    for bad in (0, -1, 1.5, True):
        with pytest.raises(CarrotError, match="block: expected an integer >= 1"):
            cell_blocks((2, 2), bad)


@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_of_cells_are_the_players_and_their_values_split_evenly(seed):
    """Two blocks of 2 x 2 cells: one antithetic pair is the exact two-player Shapley value of each block (against
    the four games played directly); the map spreads it evenly over the block's cells and sums exactly."""
    logits = nonlinear_model(seed)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(seed + 60))
    grid = (2, 4)
    phi, info = shapley_map(PixelFill(logits, x, grid), 0, permutations=2, seed=seed, block=2)
    xb = blur(x[None], default_sigma(grid, (12, 16)))[0]
    left = torch.zeros(1, 12, 16)
    left[..., :8] = 1
    f = {S: float(logits((x * (1 - m) + xb * m)[None])[0, 0])
         for S, m in (("", torch.zeros(1, 12, 16)), ("A", left), ("B", 1 - left), ("AB", torch.ones(1, 12, 16)))}
    phi_a = ((f[""] - f["A"]) + (f["B"] - f["AB"])) / 2
    phi_b = ((f[""] - f["B"]) + (f["A"] - f["AB"])) / 2
    assert np.allclose(phi, np.array([[phi_a / 4] * 2 + [phi_b / 4] * 2] * 2), rtol=1e-9, atol=1e-12)
    assert phi.sum() == pytest.approx(f[""] - f["AB"], rel=1e-12, abs=1e-12) and info["block"] == 2
    lin = linear_model(seed)  # additive: a block's value is the sum of its cells' occlusion drops
    phi, _ = shapley_map(PixelFill(lin, x, (3, 4)), 1, permutations=4, seed=seed, block=2)
    occ = occlusion_map(PixelFill(lin, x, (3, 4)), 1).ravel()
    from carrot.attribution.pixels import cell_blocks

    owner = cell_blocks((3, 4), 2)
    want = np.array([occ[owner == owner[j]].sum() / (owner == owner[j]).sum() for j in range(12)]).reshape(3, 4)
    assert np.allclose(phi, want, rtol=1e-9, atol=1e-9)


# -- removals: blur, mean colour, token dropping ----------------------------------------------------------------
@pytest.mark.parametrize("blocks", [1, 3])
def test_kept_tokens_equal_timms_own_forward_with_the_removed_patches_masked(blocks):
    """Dropping the removed patches' tokens is the model with those tokens hidden from every attention (timm's own
    forward_features with a key mask, an independent route); images keeping different numbers of patches in one call
    do not see each other; keeping everything is the plain forward."""
    import inspect

    from timm.models.vision_transformer import Block

    from carrot.features.backbone import create_backbone

    if "attn_mask" not in inspect.signature(Block.forward).parameters:
        pytest.skip("this timm's ViT blocks take no attention mask (the oracle needs one)")
    bb = create_backbone("vit_tiny_patch16_224", img_size=64, pretrained=False, device="cpu", blocks=blocks)
    g = torch.Generator().manual_seed(blocks)
    x = torch.randn(4, 3, 64, 64, generator=g)
    H, glob, _ = bb.with_globals(x)
    Hk, idx, gk = bb.kept_tokens(x, torch.ones(4, 16, dtype=torch.bool))
    assert torch.equal(Hk, H) and torch.equal(gk, glob) and torch.equal(idx, torch.arange(16).expand(4, 16))
    keep = torch.rand(4, 16, generator=g) > 0.5
    keep[0] = False
    keep[0, 3] = True  # one patch kept
    Hk, idx, gk = bb.kept_tokens(x, keep)
    P = bb.num_prefix_tokens
    for b in range(4):
        k = int(keep[b].sum())
        assert idx[b, :k].tolist() == torch.nonzero(keep[b]).flatten().tolist() and (idx[b, k:] == -1).all()
        mask = torch.cat([torch.ones(P, dtype=torch.bool), keep[b]])[None, None, None]
        with torch.no_grad():
            if blocks == 1:
                ref = bb.model.forward_features(x[b : b + 1], attn_mask=mask)
            else:
                t = bb.model.norm_pre(bb.model._pos_embed(bb.model.patch_embed(x[b : b + 1])))
                outs = []
                for i, blk in enumerate(bb.model.blocks):
                    t = blk(t, attn_mask=mask)
                    if i >= len(bb.model.blocks) - blocks:
                        outs.append(bb.model.norm(t))
                ref = torch.cat(outs, -1)
        assert torch.allclose(Hk[b, :k], ref[0, P:][keep[b]], atol=1e-5)
        assert torch.allclose(gk[b], ref[0, :P], atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=40))
def test_padded_passes_cover_every_row_once_and_pad_little(counts):
    """Every row with tokens is in exactly one pass, none without; within a pass the longest row is at most 10% (and
    4 tokens) longer than any other, and each pass's longest row is shorter than the previous pass's shortest."""
    from carrot.features.backbone import padded_passes

    c = torch.as_tensor(counts)
    passes = padded_passes(c)
    rows = torch.cat(passes).tolist() if passes else []
    assert sorted(rows) == [r for r in range(len(counts)) if counts[r] > 0]
    for p in passes:
        k = c[p]
        assert int(k.max() - k.min()) <= max(4, 0.1 * int(k.max()))
    assert all(int(c[a].min()) > int(c[b].max()) for a, b in zip(passes, passes[1:]))


def test_a_padded_pass_equals_each_row_run_alone():
    """Rows of 10, 8 and 7 kept patches run as one padded pass (key mask, timm's unfused attention on the CPU); each
    equals its own unpadded run (the fused kernel), and the model's attention is left as it was."""
    from carrot.features.backbone import create_backbone, padded_passes

    bb = create_backbone("vit_tiny_patch16_224", img_size=64, pretrained=False, device="cpu", blocks=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 64, 64, generator=g).expand(3, -1, -1, -1)
    keep = torch.zeros(3, 16, dtype=torch.bool)
    for r, k in enumerate((10, 8, 7)):
        keep[r, torch.randperm(16, generator=g)[:k]] = True
    assert len(padded_passes(keep.sum(1))) == 1
    Hk, idx, gk = bb.kept_tokens(x, keep)
    assert all(b.attn.fused_attn == bb.model.blocks[0].attn.fused_attn for b in bb.model.blocks)
    for r in range(3):
        H1, idx1, g1 = bb.kept_tokens(x[r : r + 1], keep[r : r + 1])
        k = int(keep[r].sum())
        assert torch.equal(idx[r, :k], idx1[0]) and (idx[r, k:] == -1).all() and (Hk[r, k:] == 0).all()
        assert torch.allclose(Hk[r, :k], H1[0], atol=1e-5) and torch.allclose(gk[r], g1[0], atol=1e-5)


def test_a_convnet_cannot_drop_tokens(synthetic_root):
    from carrot.features.backbone import create_backbone

    bb = create_backbone("efficientnet_b0", img_size=64, pretrained=False, device="cpu")
    assert not bb.drops_tokens
    with pytest.raises(CarrotError, match="removal 'drop'.*expected removal blur, mean or inpaint"):
        bb.kept_tokens(torch.zeros(1, 3, 64, 64), torch.ones(1, 4, dtype=torch.bool))


def test_the_mean_fill_game_is_a_rerun_with_the_cells_in_the_mean_colour():
    logits = linear_model(0)
    x = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(7))
    game = PixelFill(logits, x, (3, 4), "mean")
    removed = torch.zeros(2, 12, dtype=torch.bool)
    removed[0, [0, 5]] = True
    removed[1] = True
    xm = x.clone()
    for j in (0, 5):
        y0, y1, x0, x1 = cell_boxes((3, 4), (12, 16))[j]
        xm[:, y0:y1, x0:x1] = x.mean((1, 2))[:, None, None]
    want = logits(torch.stack([xm, x.mean((1, 2))[:, None, None].expand_as(x)]))
    assert np.allclose(game(removed), want, atol=1e-9)
    with pytest.raises(CarrotError, match="removal: expected blur, mean, inpaint for a pixel fill, got 'drop'"):
        PixelFill(logits, x, (3, 4), "drop")


def test_the_token_drop_game_of_the_fitted_model(run):
    """Dropping cells: every row equals the model run on that row alone (batching and padding invisible), dropping
    everything gives the head's prior, keeping everything the model's logits, and the Shapley map sums exactly to
    f(x) - prior."""
    from carrot.attribution.pixels import shapley_map
    from carrot.run.pipeline import Carrot

    model = Carrot.load(run)
    model.backbone.precision = "float32"  # bfloat16 (auto on this CPU) rounds differently in every batch shape
    x = model.inputs([model.test_records_[0][0]])[0]
    game = model.cell_game(x, (4, 4), "drop")
    removed = torch.rand(6, 16, generator=torch.Generator().manual_seed(0)) > 0.4
    removed[0], removed[1] = False, True
    out = game(removed)
    for b in range(6):  # tokens agree to 1e-5 (above); rounded to the cache's float16, a few may flip one ulp
        assert np.allclose(out[b], game(removed[b : b + 1])[0], rtol=1e-3, atol=1e-4)
    assert np.allclose(out[0], model.pixel_logits(x[None])[0], atol=1e-9)
    prior = np.asarray(model.head_.prior_, dtype=np.float64)
    assert np.array_equal(out[1], prior)
    c = int(out[0].argmax())
    phi, info = shapley_map(game, c, permutations=2, batch=5)
    assert info["removal"] == "drop" and info["removed"] == prior[c]
    assert phi.sum() == pytest.approx(out[0, c] - prior[c], rel=1e-12, abs=1e-12)
    with pytest.raises(CarrotError, match="removal: expected auto or one of blur, mean, inpaint, drop, got 'zero'"):
        model.cell_game(x, (4, 4), "zero")


def test_explain_names_the_removal_its_map_is_exact_for(run, tmp_path, explain_json):
    from carrot.run.pipeline import Carrot

    model = Carrot.load(run)
    path = model.test_records_[2][0]
    exp = explain_json(run, path, tmp_path, "--removal", "drop", "--permutations", "2", "--occlusion")
    c, prior = exp["predicted_index"], np.asarray(model.head_.prior_, dtype=np.float64)
    assert exp["pixel_map_removal"] == "drop" and exp["pixel_map_removed_logit"] == pytest.approx(prior[c])
    assert "tokens dropped" in exp["meaning"]["pixel_map"] and "the prior" in exp["meaning"]["pixel_map"]
    assert "tokens dropped" in exp["meaning"]["pixel_occlusion"]
    phi = np.asarray(exp["pixel_map"])
    assert phi.sum() == pytest.approx(exp["logits"][exp["predicted"]] - prior[c], abs=1e-9)
    page = next(tmp_path.glob("0000_*/explanation.html")).read_text()
    assert "tokens dropped" in page
    exp = explain_json(run, path, tmp_path / "m", "--removal", "mean", "--permutations", "2", "--block", "2")
    assert exp["pixel_map_removal"] == "mean" and "mean colour" in exp["meaning"]["pixel_map"]
    assert len(set(np.asarray(exp["pixel_map"])[:2, :2].ravel().tolist())) == 1  # one block's value, split evenly
    r = CliRunner().invoke(cli, ["explain", str(run), path, "--out", str(tmp_path / "s"), "--pixel-map", "split",
                                 "--removal", "drop"])
    assert r.exit_code != 0 and "removal: the pixel split integrates along a straight path" in r.output


@pytest.mark.parametrize("seed,sigma", [(0, 2.0), (1, 3.5), (2, 1.0)])
def test_inpainting_is_the_normalised_convolution_of_the_kept_pixels(seed, sigma):
    """Against scipy's Gaussian filter (zero outside the image): each removed pixel is the kept pixels' Gaussian
    average (plus eps of the mean colour), kept pixels stay, and with every pixel removed the fill is the mean colour."""
    import math

    from scipy.ndimage import gaussian_filter

    from carrot.attribution.pixels import inpaint

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, 16, generator=g, dtype=torch.float64)
    m = (torch.rand(2, 1, 12, 16, generator=g) > 0.6).to(torch.float64)
    m[1] = 1.0
    out = inpaint(x, m, sigma)
    r = math.ceil(3 * sigma)
    xn, mn = x.numpy(), m.numpy()
    for b in range(2):
        keep = 1 - mn[b, 0]
        den = gaussian_filter(keep, sigma, mode="constant", radius=r)
        for ch in range(3):
            num = gaussian_filter(xn[ch] * keep, sigma, mode="constant", radius=r)
            want = xn[ch] * keep + (num + 1e-3 * xn[ch].mean()) / (den + 1e-3) * mn[b, 0]
            assert np.allclose(out[b, ch].numpy(), want, atol=1e-10)
    assert torch.allclose(out[1], x.mean((1, 2), keepdim=True).expand_as(x), atol=1e-12)
    game = PixelFill(linear_model(seed), x.float(), (3, 4), "inpaint")
    assert np.allclose(game.ends()[1], linear_model(seed)(x.float().mean((1, 2), keepdim=True).expand_as(x)[None])[0],
                       atol=1e-9)


def test_the_default_map_drops_a_vits_tokens_in_blocks_of_at_most_64_players(run, tmp_path, explain_json):
    """explain's default for a ViT: token dropping (sums to logit - prior), blocks from auto_block."""
    from carrot.attribution.pixels import auto_block
    from carrot.run.pipeline import Carrot

    assert [auto_block(g) for g in ((4, 4), (7, 7), (8, 8), (9, 9), (16, 16), (37, 37))] == [1, 1, 1, 2, 2, 5]
    assert auto_block((16, 16), players=256) == 1 and auto_block((16, 16), players=1) == 16
    model = Carrot.load(run)
    assert model.pixel_removal() == "drop" and model.pixel_removal("auto", "split") == "blur"
    exp = explain_json(run, model.test_records_[3][0], tmp_path)
    prior = np.asarray(model.head_.prior_, dtype=np.float64)[exp["predicted_index"]]
    assert exp["pixel_map_removal"] == "drop" and exp["pixel_map_block"] == 1 and exp["pixel_map_removed_logit"] == prior
    assert np.sum(exp["pixel_map"]) == pytest.approx(exp["logits"][exp["predicted"]] - prior, abs=1e-9)
    r = CliRunner().invoke(cli, ["explain", str(run), model.test_records_[3][0], "--out", str(tmp_path / "b"), "--block", "0"])
    assert r.exit_code == 2 and "expected auto or an integer >= 1, got '0'" in r.output
