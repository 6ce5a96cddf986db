"""Stanford Cars / FGVC-Aircraft / Flowers-102 read from local copies in their original layouts.

Each test writes a tiny copy in the exact on-disk format torchvision's loader reads, then holds the
records carrot builds against torchvision's own ``__getitem__`` (label and pixels) as the oracle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carrot.config import RunConfig
from carrot.data import load_image, load_splits, load_torchvision
from carrot.errors import CarrotError

tvd = pytest.importorskip("torchvision.datasets")
scipy_io = pytest.importorskip("scipy.io")


def _jpg(path: Path, rng: np.random.Generator, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)


def _make_cars(root: Path, rng) -> dict:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy_io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(["AM General Hummer", "Acura RL", "Audi R8"], dtype=object)})
    boxes = {}
    for split, folder, mat in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                               ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
        n = 7 if split == "train" else 4
        dt = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
        ann = np.zeros(n, dtype=dt)
        for i in range(n):
            fname = f"{i + 1:05d}.jpg"
            _jpg(base / folder / fname, rng)
            x1, y1 = int(rng.integers(1, 10)), int(rng.integers(1, 8))
            x2, y2 = x1 + int(rng.integers(15, 30)), y1 + int(rng.integers(10, 20))
            ann[i] = (x1, y1, x2, y2, 1 + i % 3, fname)
            boxes[(split, fname)] = (x1, y1, x2, y2)
        scipy_io.savemat(mat, {"annotations": ann})
    return boxes


def _make_aircraft(root: Path, rng) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172"]
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    boxes, box_lines, k = {}, [], 0
    for split, n in (("trainval", 6), ("test", 3)):
        lines = []
        for i in range(n):
            img_id = f"{1000000 + k:07d}"
            k += 1
            _jpg(data / "images" / f"{img_id}.jpg", rng)
            lines.append(f"{img_id} {variants[i % 3]}")
            x0, y0 = int(rng.integers(1, 8)), int(rng.integers(1, 6))
            x1, y1 = x0 + 20, y0 + 15
            box_lines.append(f"{img_id} {x0} {y0} {x1} {y1}")
            boxes[f"{img_id}.jpg"] = (x0, y0, x1, y1)
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    (data / "images_box.txt").write_text("\n".join(box_lines) + "\n")
    return boxes


def _make_flowers(root: Path, rng) -> None:
    base = root / "flowers-102"
    labels = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    for i in range(len(labels)):
        _jpg(base / "jpg" / f"image_{i + 1:05d}.jpg", rng)
    scipy_io.savemat(base / "imagelabels.mat", {"labels": labels})
    scipy_io.savemat(base / "setid.mat", {"trnid": np.array([1, 2, 3, 4]), "valid": np.array([5, 6, 7]),
                                          "tstid": np.array([8, 9, 10, 11, 12])})


@pytest.fixture
def flowers_unchecked(monkeypatch):
    # torchvision checks the real files' MD5 sums; a generated copy cannot pass that, so it is switched off
    monkeypatch.setattr(tvd.Flowers102, "_check_integrity", lambda self: True)


def _assert_matches_torchvision(ds, tv) -> None:
    assert len(ds) == len(tv)
    for rec, i in zip(ds.records, range(len(tv))):
        img, target = tv[i]
        assert rec.label == target
        np.testing.assert_array_equal(np.asarray(load_image(rec)), np.asarray(img.convert("RGB")))


def test_stanford_cars_layout_matches_torchvision(tmp_path):
    rng = np.random.default_rng(0)
    boxes = _make_cars(tmp_path, rng)
    train, test = load_torchvision("cars", tmp_path)
    assert (len(train), len(test)) == (7, 4)
    assert train.classes == ["AM General Hummer", "Acura RL", "Audi R8"] == test.classes
    _assert_matches_torchvision(train, tvd.StanfordCars(str(tmp_path), split="train"))
    _assert_matches_torchvision(test, tvd.StanfordCars(str(tmp_path), split="test"))
    # root may also be the stanford_cars folder itself
    again, _ = load_torchvision("cars", tmp_path / "stanford_cars")
    assert again.records == train.records

    cropped, cropped_test = load_torchvision("cars", tmp_path, bbox_crop=True)
    for split, ds in (("train", cropped), ("test", cropped_test)):
        for rec in ds.records:
            x1, y1, x2, y2 = boxes[(split, Path(rec.path).name)]
            full = np.asarray(Image.open(rec.path).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(load_image(rec)), full[y1 - 1:y2, x1 - 1:x2])


def test_fgvc_aircraft_layout_matches_torchvision(tmp_path):
    rng = np.random.default_rng(1)
    boxes = _make_aircraft(tmp_path, rng)
    train, test = load_torchvision("aircraft", tmp_path)
    assert (len(train), len(test)) == (6, 3)
    assert train.classes == ["707-320", "A300B4", "Cessna 172"]
    _assert_matches_torchvision(train, tvd.FGVCAircraft(str(tmp_path), split="trainval"))
    _assert_matches_torchvision(test, tvd.FGVCAircraft(str(tmp_path), split="test"))
    cropped, _ = load_torchvision("aircraft", tmp_path, bbox_crop=True)
    for rec in cropped.records:
        x0, y0, x1, y1 = boxes[Path(rec.path).name]
        assert load_image(rec).size == (x1 - x0 + 1, y1 - y0 + 1)


def test_flowers102_trains_on_train_plus_val(tmp_path, flowers_unchecked):
    rng = np.random.default_rng(2)
    _make_flowers(tmp_path, rng)
    train, test = load_torchvision("flowers102", tmp_path)
    assert [Path(r.path).name for r in train.records] == [f"image_{i:05d}.jpg" for i in range(1, 8)]
    assert test.labels.tolist() == [1, 2, 0, 1, 2]
    assert train.name == "flowers102/train+val"
    tv_train = [tvd.Flowers102(str(tmp_path), split=s) for s in ("train", "val")]
    assert train.labels.tolist() == [tv[i][1] for tv in tv_train for i in range(len(tv))]
    _assert_matches_torchvision(test, tvd.Flowers102(str(tmp_path), split="test"))
    assert len(train.classes) == 102  # torchvision's class names
    with pytest.raises(CarrotError, match="Flowers-102 has no bounding boxes"):
        load_torchvision("flowers102", tmp_path, bbox_crop=True)


def test_load_splits_dispatches_and_errors_name_the_layout(tmp_path):
    _make_aircraft(tmp_path / "a", np.random.default_rng(3))
    cfg = RunConfig.from_dict({"data": {"kind": "aircraft", "root": str(tmp_path / "a")}})
    train, test = load_splits(cfg)
    assert (len(train), len(test)) == (6, 3)
    with pytest.raises(CarrotError, match="data.root: a cars data set needs a root"):
        load_splits(RunConfig.from_dict({"data": {"kind": "cars"}}))
    (tmp_path / "empty").mkdir()
    for kind, folder in (("cars", "stanford_cars"), ("aircraft", "fgvc-aircraft-2013b"), ("flowers102", "flowers-102")):
        with pytest.raises(CarrotError, match=f"data.root: no readable .* expects '.*{folder}'"):
            load_torchvision(kind, tmp_path / "empty")
    with pytest.raises(CarrotError, match="data.kind: expected one of"):
        RunConfig.from_dict({"data": {"kind": "cars196"}})


def test_aircraft_missing_box_is_named(tmp_path):
    _make_aircraft(tmp_path, np.random.default_rng(4))
    box_file = tmp_path / "fgvc-aircraft-2013b" / "data" / "images_box.txt"
    box_file.write_text("\n".join(box_file.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(CarrotError, match="no bounding box for '1000000.jpg'"):
        load_torchvision("aircraft", tmp_path, bbox_crop=True)


def test_cli_fits_an_aircraft_copy_with_box_crop(tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from carrot.cli import cli

    _make_aircraft(tmp_path / "air", np.random.default_rng(5))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "pretrained": False}}))
    r = CliRunner().invoke(cli, ["fit", "--config", str(cfg), "--data", str(tmp_path / "air"), "--data-kind", "aircraft",
                                 "--bbox-crop", "--lam", "1", "--out", str(tmp_path / "run"), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert meta["n_train"] == 6 and meta["n_test"] == 3
    r = CliRunner().invoke(cli, ["fit", "--data", str(tmp_path / "air"), "--data-kind", "cars", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "data.root: no readable StanfordCars copy" in r.output
