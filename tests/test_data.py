from pathlib import Path
import json

import numpy as np
import pytest
from PIL import Image

from carrot.data import (
    ImageRecord, load_cub, load_elpv, load_image, load_imagefolder, load_splits, make_synthetic, stratified_split,
)
from carrot.config import RunConfig
from carrot.errors import CarrotError


def test_synthetic_imagefolder_split_is_stratified_and_seeded(synthetic_root):
    train, test = load_imagefolder(synthetic_root, test_fraction=0.25, seed=3)
    assert train.classes == test.classes == ["class_00", "class_01", "class_02"]
    assert len(train) + len(test) == 18
    assert set(test.labels.tolist()) == {0, 1, 2}
    assert not set(train.paths) & set(test.paths)
    again, _ = load_imagefolder(synthetic_root, test_fraction=0.25, seed=3)
    assert again.paths == train.paths
    parts = json.loads((synthetic_root / "parts.json").read_text())
    assert len(parts) == 18
    x, y, w, h = parts[str(Path(train.paths[0]).relative_to(synthetic_root))]
    assert train.records[0].parts == ((x, y, x + w, y + h),)


def test_train_test_subfolders_are_used(tmp_path):
    make_synthetic(tmp_path / "train", num_classes=2, per_class=3)
    make_synthetic(tmp_path / "val", num_classes=2, per_class=2, seed=1)
    train, test = load_imagefolder(tmp_path)
    assert (len(train), len(test)) == (6, 4)
    (tmp_path / "val" / "class_09").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "val" / "class_09" / "x.png")
    with pytest.raises(CarrotError, match="differ from the training classes"):
        load_imagefolder(tmp_path)


def test_empty_class_folder_and_missing_root(tmp_path):
    make_synthetic(tmp_path, num_classes=2, per_class=3)
    (tmp_path / "class_empty").mkdir()
    (tmp_path / "class_empty" / "notes.txt").write_text("no images here")
    with pytest.raises(CarrotError, match="class folder 'class_empty' has no images"):
        load_imagefolder(tmp_path)
    with pytest.raises(CarrotError, match="expected a directory"):
        load_imagefolder(tmp_path / "nope")


def test_class_with_one_image_cannot_be_split(tmp_path):
    make_synthetic(tmp_path, num_classes=2, per_class=1)
    with pytest.raises(CarrotError, match="has 1 image"):
        load_imagefolder(tmp_path)


def test_image_modes_are_converted_and_bad_files_named(tmp_path):
    arr = (np.random.default_rng(0).uniform(0, 255, (20, 30))).astype(np.uint8)
    Image.fromarray(arr, "L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([arr] * 3 + [arr]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(arr.astype(np.uint16) * 200).save(tmp_path / "deep.png")
    for name in ("gray.png", "rgba.png", "deep.png"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (30, 20)
    (tmp_path / "fake.jpg").write_text("this is text, not a JPEG")
    with pytest.raises(CarrotError, match="cannot read image .*fake.jpg"):
        load_image(tmp_path / "fake.jpg")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.dstack([arr] * 3)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(CarrotError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(CarrotError, match="5x5 px, smaller than one 14-px patch"):
        Image.new("RGB", (5, 5)).save(tmp_path / "tiny.png")
        load_image(tmp_path / "tiny.png", min_side=14)
    with pytest.raises(CarrotError, match="image not found"):
        load_image(tmp_path / "absent.png")


def _fake_cub(root, n_classes=3, per_class=4):
    (root / "images").mkdir(parents=True)
    lines, labels, split, boxes, classes = [], [], [], [], []
    i = 0
    for c in range(1, n_classes + 1):
        classes.append(f"{c} {c:03d}.Bird_{c}")
        d = root / "images" / f"{c:03d}.Bird_{c}"
        d.mkdir()
        for k in range(per_class):
            i += 1
            Image.new("RGB", (60, 40), (c * 50, 10, 10)).save(d / f"b{k}.jpg")
            lines.append(f"{i} {d.name}/b{k}.jpg")
            labels.append(f"{i} {c}")
            split.append(f"{i} {int(k % 2 == 0)}")
            boxes.append(f"{i} 10.0 5.0 30.0 20.0")
    (root / "parts").mkdir()
    (root / "parts" / "part_locs.txt").write_text("1 1 20.0 10.0 1\n1 2 0.0 0.0 0\n2 1 15.0 12.0 1\n")
    for name, rows in [("images.txt", lines), ("image_class_labels.txt", labels), ("train_test_split.txt", split),
                       ("bounding_boxes.txt", boxes), ("classes.txt", classes)]:
        (root / name).write_text("\n".join(rows) + "\n")


def test_cub_layout_with_bbox_crop(tmp_path):
    _fake_cub(tmp_path / "CUB_200_2011")
    train, test = load_cub(tmp_path, bbox_crop=True)
    assert (len(train), len(test)) == (6, 6)
    assert train.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert load_image(train.records[0]).size == (30, 20)
    # part points move into the bounding-box crop; invisible parts are dropped
    assert train.records[0].parts == ((10.0, 5.0, 10.0, 5.0),)
    assert test.records[0].parts == ((5.0, 7.0, 5.0, 7.0),)
    (tmp_path / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(CarrotError, match="missing 'train_test_split.txt'"):
        load_cub(tmp_path)


def test_elpv_package_is_the_real_data():
    train, test = load_elpv(test_fraction=0.25, seed=0)
    assert len(train) + len(test) == 2624
    assert len(train.classes) == 8
    img = load_image(train.records[0])
    assert img.size == (300, 300)
    small, _ = load_elpv(max_per_class=5)
    assert np.bincount(small.labels).max() <= 5
    assert train.fingerprint() != test.fingerprint()


def test_fingerprint_changes_with_content(tmp_path):
    make_synthetic(tmp_path, num_classes=2, per_class=2)
    tr, _ = load_imagefolder(tmp_path, test_fraction=0.5)
    before = tr.fingerprint()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tr.paths[0])
    assert tr.fingerprint() != before


def test_split_rejects_bad_fraction(synthetic_root):
    train, _ = load_imagefolder(synthetic_root)
    with pytest.raises(CarrotError, match="test_fraction"):
        stratified_split(train, 1.5, 0)
    assert isinstance(train.records[0], ImageRecord)


def test_nabirds_layout_class_names_with_spaces_and_unused_inner_nodes(tmp_path):
    root = tmp_path / "nabirds"
    (root / "images" / "0295").mkdir(parents=True)
    (root / "images" / "0296").mkdir(parents=True)
    ids = ["0000139e-21dc-4d0c-bfe1-4cae3c85c829", "0000d9fc-4e02-4c06-a0af-a55cfb16b12b",
           "00019306-9d83-4334-b255-a447742edce3", "0001afd4-99a1-4a67-b940-d419413e23b3"]
    lines, labels, split = [], [], []
    for k, uid in enumerate(ids):
        folder = "0295" if k < 2 else "0296"
        Image.new("RGB", (50, 40), (k * 60, 20, 20)).save(root / "images" / folder / f"{uid.replace('-', '')}.jpg")
        lines.append(f"{uid} {folder}/{uid.replace('-', '')}.jpg")
        labels.append(f"{uid} {int(folder)}")
        split.append(f"{uid} {k % 2}")
    (root / "classes.txt").write_text("0 Birds\n1 Perching Birds\n295 Common Loon\n296 Pacific Loon\n")
    for name, rows in [("images.txt", lines), ("image_class_labels.txt", labels), ("train_test_split.txt", split)]:
        (root / name).write_text("\n".join(rows) + "\n")
    cfg = RunConfig.from_dict({"data": {"kind": "nabirds", "root": str(root)}})
    train, test = load_splits(cfg)
    assert train.classes == ["Common Loon", "Pacific Loon"]  # inner hierarchy nodes without images are not labels
    assert train.name == "NABirds/train" and train.labels.tolist() == [0, 1] and test.labels.tolist() == [0, 1]
    assert Path(train.records[0].path).is_file()


def _fake_dogs(root: Path, lists_dir: str = "lists") -> dict:
    from scipy.io import savemat

    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02116738-African_hunting_dog"]
    files, boxes = {"train": [], "test": []}, {}
    for b, breed in enumerate(breeds):
        (root / "Images" / breed).mkdir(parents=True)
        (root / "Annotation" / breed).mkdir(parents=True)
        for k in range(3):
            stem = f"{breed.split('-')[0]}_{k}"
            Image.new("RGB", (80, 60), (b * 80, k * 60, 30)).save(root / "Images" / breed / f"{stem}.jpg")
            objs = "".join(f"<object><name>{breed}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                           f"<ymax>{y1}</ymax></bndbox></object>" for x0, y0, x1, y1 in [(5, 4, 30, 40), (20, 10, 50, 30)][: 1 + (k == 2)])
            (root / "Annotation" / breed / stem).write_text(f"<annotation><filename>{stem}</filename>{objs}</annotation>")
            boxes[stem] = (4, 3, 26 if k != 2 else 46, 37)
            files["train" if k < 2 else "test"].append((f"{breed}/{stem}.jpg", b + 1))
    (root / lists_dir).mkdir(exist_ok=True)
    for split, rows in files.items():
        savemat(root / lists_dir / f"{split}_list.mat", {"file_list": np.array([f for f, _ in rows], dtype=object),
                                                          "labels": np.array([[lab] for _, lab in rows], dtype=float)})
    return boxes


def test_stanford_dogs_layout_and_box_crop(tmp_path):
    boxes = _fake_dogs(tmp_path / "dogs")
    train, test = load_splits(RunConfig.from_dict({"data": {"kind": "dogs", "root": str(tmp_path / "dogs")}}))
    assert train.classes == ["Chihuahua", "Japanese_spaniel", "African_hunting_dog"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and test.labels.tolist() == [0, 1, 2]
    assert all(Path(r.path).is_file() and r.bbox is None for r in train.records + test.records)
    _, cropped = load_splits(RunConfig.from_dict({"data": {"kind": "dogs", "root": str(tmp_path / "dogs"), "bbox_crop": True}}))
    for rec in cropped.records:  # test images hold two dogs: the crop covers both
        x, y, w, h = boxes[Path(rec.path).stem]
        assert rec.bbox == (x, y, w, h) and load_image(rec).size == (w, h)
    # the lists may also sit in the root; a folder without the layout is named
    _fake_dogs(tmp_path / "flat", lists_dir=".")
    assert len(load_splits(RunConfig.from_dict({"data": {"kind": "dogs", "root": str(tmp_path / "flat")}}))[0]) == 6
    with pytest.raises(CarrotError, match="no Stanford Dogs copy"):
        load_splits(RunConfig.from_dict({"data": {"kind": "dogs", "root": str(tmp_path)}}))


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    import gzip

    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_layout(tmp_path, monkeypatch):
    from carrot.data import load_fashion_mnist, read_idx

    monkeypatch.setenv("CARROT_CACHE_DIR", str(tmp_path / "cache"))
    g = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    data = {}
    for prefix, n in (("train", 40), ("t10k", 20)):
        x, y = g.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz=False)  # plain and gzipped files both read
        data[prefix] = (x, y)
    np.testing.assert_array_equal(read_idx(root / "train-images-idx3-ubyte.gz"), data["train"][0])
    train, test = load_fashion_mnist(root, max_per_class=3, seed=1)
    assert (len(train), len(test)) == (30, 20) and train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert np.bincount(train.labels).tolist() == [3] * 10
    for ds, (x, y) in ((train, data["train"]), (test, data["t10k"])):
        for rec in ds.records:
            i = int(Path(rec.path).stem)
            assert rec.label == y[i]
            np.testing.assert_array_equal(np.asarray(Image.open(rec.path)), x[i])  # the PNG holds the exact pixels
    again, _ = load_fashion_mnist(root, max_per_class=3, seed=1)
    assert again.records == train.records  # the PNGs are written once and reused
    (root / "bad-idx").write_bytes(b"\x00\x01\x08\x01" + b"\x00" * 4)
    with pytest.raises(CarrotError, match="not an unsigned-byte IDX file"):
        read_idx(root / "bad-idx")
    _write_idx(root / "short", np.zeros(10))
    (root / "short").write_bytes(__import__("gzip").decompress((root / "short").read_bytes())[:-3])
    with pytest.raises(CarrotError, match="truncated"):
        read_idx(root / "short")
    with pytest.raises(CarrotError, match="no Fashion-MNIST folder"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_debian_fashion_mnist_is_the_real_data():
    from carrot.data import FASHION_MNIST_DEBIAN, read_idx

    root = Path(FASHION_MNIST_DEBIAN)
    if not root.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    assert read_idx(root / "train-images-idx3-ubyte.gz").shape == (60000, 28, 28)
    # the published first labels of the two splits
    assert read_idx(root / "train-labels-idx1-ubyte.gz")[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert read_idx(root / "t10k-labels-idx1-ubyte.gz")[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def icc_profile(primaries, gamma: float = 2.2, name: str = "wide gamut test") -> bytes:
    """A minimal ICC v2 display profile (matrix / TRC): D50-adapted primaries (three XYZ columns) and one gamma."""
    import struct

    def s15(v: float) -> bytes:
        return struct.pack(">i", int(round(v * 65536)))

    def xyz(x, y, z) -> bytes:
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    def desc(text: str) -> bytes:
        ascii_ = text.encode() + b"\0"
        return b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 12 + b"\0" * 67

    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", int(round(gamma * 256))) + b"\0\0"
    tags = [(b"desc", desc(name)), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(*primaries[0])), (b"gXYZ", xyz(*primaries[1])), (b"bXYZ", xyz(*primaries[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB " + b"XYZ " + b"\0" * 12
              + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def test_an_embedded_wide_gamut_profile_is_converted_to_srgb(tmp_path):
    """A Display-P3 photo's pixel values mean other colours than sRGB's: loaded through its ICC profile, against the
    colorimetry written out (P3 gamma 2.2 -> XYZ D50 -> linear sRGB -> the sRGB curve); an sRGB profile and a
    profile LittleCMS cannot read leave the values as they are."""
    from PIL import Image, ImageCms

    from carrot.data import load_image

    p3 = np.array([[0.5151, 0.2919, 0.1571], [0.2412, 0.6922, 0.0666], [-0.0011, 0.0419, 0.7841]])  # columns: r g b
    srgb = np.array([[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606], [0.0139, 0.0971, 0.7141]])
    pixels = np.array([[[150, 100, 100], [90, 140, 120]], [[200, 180, 60], [40, 60, 160]]], dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p3.png", icc_profile=icc_profile(p3.T.tolist()))
    got = np.asarray(load_image(tmp_path / "p3.png"), dtype=np.float64)
    lin = np.linalg.solve(srgb, p3 @ ((pixels / 255.0) ** 2.2).reshape(-1, 3).T).T.clip(0, 1)
    want = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055).reshape(pixels.shape) * 255
    assert np.abs(got - want).max() <= 2.5 and np.abs(got - pixels).max() >= 8  # converted, and it mattered
    srgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, icc in (("srgb.png", srgb_profile), ("bad.png", b"not a profile at all")):
        Image.fromarray(pixels).save(tmp_path / name, icc_profile=icc)
        assert np.array_equal(np.asarray(load_image(tmp_path / name)), pixels), name
