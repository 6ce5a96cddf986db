"""Labelled image lists: ImageFolder trees, CUB-200-2011 / NABirds, Stanford Dogs, local copies of Stanford
Cars / FGVC-Aircraft / Flowers-102 (read by torchvision's loaders), the ELPV package, a generated toy set.

Every loader returns :class:`ImageDataset` splits of :class:`ImageRecord` (path, label, optional
bbox); images are opened lazily and checked on load (corrupt files, tiny images, modes).
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from struct import error as struct_error

import numpy as np

from carrot.errors import CarrotError, first_line, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: int
    bbox: tuple[float, float, float, float] | None = None  # x, y, w, h in pixels
    parts: tuple[tuple[float, float, float, float], ...] | None = None  # known part boxes x0, y0, x1, y1 (pixels of the loaded image)


@dataclass
class ImageDataset:
    """A split: records, class names (index = label) and a name for messages."""

    records: list[ImageRecord]
    classes: list[str]
    name: str = "dataset"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    def digests(self) -> list[bytes]:
        """SHA-256 of each record's file contents (read once per file version: path, size and mtime)."""
        return [file_digest(r.path) for r in self.records]

    def fingerprint(self) -> str:
        """SHA-256 over class names and, per record, label, bbox, file name and file contents."""
        h = hashlib.sha256()
        h.update(repr(self.classes).encode())
        for r, digest in zip(self.records, self.digests()):
            h.update(os.fsencode(os.path.basename(r.path)) + f"|{r.label}|{r.bbox}|".encode())
            h.update(digest)
        return h.hexdigest()

    def subset(self, idx: Sequence[int], name: str | None = None) -> "ImageDataset":
        return ImageDataset([self.records[i] for i in idx], self.classes, name or self.name, dict(self.meta))


# what PIL's decoders raise for a file that is not an image or is damaged (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct_error)
MAX_IMAGE_PIXELS = 100_000_000  # larger files are refused before decoding (decompression bombs); CARROT_MAX_IMAGE_PIXELS


def max_image_pixels() -> int:
    """The largest image (width x height) carrot decodes: ``$CARROT_MAX_IMAGE_PIXELS`` or 100 megapixels."""
    env = os.environ.get("CARROT_MAX_IMAGE_PIXELS")
    if env is None:
        return MAX_IMAGE_PIXELS
    if not env.isdigit() or int(env) < 1:
        raise CarrotError(f"CARROT_MAX_IMAGE_PIXELS: expected a positive integer, got {env!r}")
    return int(env)


def _to_rgb(im, path: Path):
    """A decoded PIL image of any mode as 8-bit RGB: alpha composited on white, 16-bit integers scaled from
    their full range (v / 257), floats from [0, 1] (or [0, 255]); modes without a faithful RGB form refused."""
    from PIL import Image

    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            raise CarrotError(f"image '{path}': {mode} pixel values span [{lo:g}, {hi:g}], outside the 16-bit range "
                              "[0, 65535] carrot reads integer images in; save it as 8- or 16-bit")
        return Image.fromarray(np.round(arr / 257.0).astype(np.uint8)).convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise CarrotError(f"image '{path}': float pixels include NaN or Inf")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            arr = arr * 255.0
        elif not (lo >= 0 and hi <= 255):
            raise CarrotError(f"image '{path}': float pixel values span [{lo:g}, {hi:g}]; carrot reads float images "
                              "in [0, 1] (or [0, 255]); rescale it or save it as 8- or 16-bit")
        return Image.fromarray(np.round(arr).astype(np.uint8)).convert("RGB")
    if mode in ("RGB", "RGBX", "L", "P", "1", "CMYK", "YCbCr"):
        return im.convert("RGB")
    raise CarrotError(f"image '{path}': pixel mode {mode} ({im.format}) is not supported; save it as RGB or grayscale")


def _in_srgb(im):
    """``im`` with its colours converted to sRGB when it embeds an ICC profile that is not sRGB (Display P3, Adobe
    RGB: their pixel values mean other colours); unchanged without one, with an sRGB one, or with a profile
    LittleCMS cannot use (the stored values are then taken as sRGB, as a viewer without colour management does)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im
    import io

    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(src).lower().replace(" ", ""):
            return im
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"),
                                         outputMode="RGBA" if im.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im


def load_image(record: ImageRecord | str, min_side: int = 1):
    """Open an image as 8-bit RGB, or raise a one-line :class:`CarrotError` naming the file and the problem.

    The EXIF orientation is applied (a phone photo is upright, as viewers show it); colours are converted to sRGB
    from an embedded ICC profile (:func:`_in_srgb`: a wide-gamut photo looks as it does in a colour-managed viewer);
    the first frame of an animated or multi-page file is used; images above :func:`max_image_pixels` are refused
    before decoding; alpha, 16-bit and float modes are converted as :func:`_to_rgb` says; ``record.bbox`` is cropped.
    """
    from PIL import ImageOps

    rec = record if isinstance(record, ImageRecord) else ImageRecord(str(record), -1)
    path = Path(rec.path)
    if not path.is_file():
        raise CarrotError(f"image not found: '{path}'")
    limit = max_image_pixels()
    try:
        with open_image(path, limit) as im:
            im.seek(0)
            im.load()
            img = _to_rgb(_in_srgb(ImageOps.exif_transpose(im) if im.getexif() else im), path)
    except DECODE_ERRORS as exc:
        if isinstance(exc, CarrotError):
            raise
        raise CarrotError(f"cannot read image '{path}': not an image or corrupt ({first_line(exc, with_type=True)})") from None
    if rec.bbox is not None:
        x, y, w, h = rec.bbox
        img = img.crop((int(x), int(y), int(round(x + w)), int(round(y + h))))
    if min(img.size) < min_side:
        raise CarrotError(
            f"image '{path}' is {img.size[0]}x{img.size[1]} px, smaller than one {min_side}-px patch of the backbone"
        )
    return img


@contextmanager
def open_image(path: Path, limit: int) -> Iterator:
    """``PIL.Image.open`` (header only) with carrot's own size limit, checked before any pixel is decoded."""
    from PIL import Image

    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # carrot's check below replaces PIL's
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > limit:
                raise CarrotError(f"image '{path}' is {im.size[0]}x{im.size[1]} px, more than the {limit:,} px carrot "
                                  "decodes (a decompression bomb?); set CARROT_MAX_IMAGE_PIXELS to allow it")
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = old


def check_headers(datasets: Sequence["ImageDataset"], min_side: int = 1) -> None:
    """Before any extraction: every image opens (its header), is within the size limit and at least
    ``min_side`` px on each side, so a bad file is a one-line error before work starts, not after hours."""
    limit = max_image_pixels()
    for ds in datasets:
        for r in ds.records:
            try:
                with open_image(Path(r.path), limit) as im:
                    w, h = im.size
            except DECODE_ERRORS as exc:
                if isinstance(exc, CarrotError):
                    raise
                raise CarrotError(f"cannot read image '{r.path}': not an image or corrupt ({first_line(exc, with_type=True)})") from None
            if r.bbox is None and min(w, h) < min_side:
                raise CarrotError(f"image '{r.path}' is {w}x{h} px, smaller than one {min_side}-px patch of the backbone")


_DIGESTS: dict[tuple[str, int, int], bytes] = {}


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of a file's bytes, remembered for this process while its size and mtime stay the same."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CarrotError(f"image not found: '{path}' (moved or deleted while carrot runs?)") from None
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        _DIGESTS[key] = h.digest()
    return _DIGESTS[key]


def duplicate_test_images(train: ImageDataset, test: ImageDataset) -> list[str]:
    """Test images whose file contents equal a training image's."""
    seen = set(train.digests())
    return [r.path for r, d in zip(test.records, test.digests()) if d in seen]


def report_duplicates(train: ImageDataset, test: ImageDataset) -> int:
    """Warn about test images whose file contents equal a training image's (the test accuracy would count
    memorised images); returns how many test images have a copy in train."""
    dup = duplicate_test_images(train, test)
    if dup:
        warn(f"{len(dup)} test image(s) have a byte-identical copy in the training split (e.g. '{dup[0]}'); "
             "the test accuracy counts them")
    return len(dup)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_imagefolder(root: Path, classes: list[str] | None = None) -> ImageDataset:
    dirs = _class_dirs(root)
    if not dirs:
        raise CarrotError(f"ImageFolder '{root}': expected one sub-folder per class, found none")
    names = [d.name for d in dirs]
    if classes is None and len(names) < 2:
        if names[0].lower() in ("train", "test", "val", "valid", "validation"):
            raise CarrotError(f"ImageFolder '{root}': only a '{names[0]}' folder; expected root/train/<class> with "
                              "root/test/<class> (or val) beside it, or root/<class> folders")
        raise CarrotError(f"ImageFolder '{root}': expected at least 2 class folders, found 1 ('{names[0]}')")
    if classes is not None and names != classes:
        raise CarrotError(f"ImageFolder '{root}': class folders {names} differ from the training classes {classes}")
    _check_class_names(root, names)
    records, skipped = [], []
    for label, d in enumerate(dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise CarrotError(f"ImageFolder '{root}': class folder '{d.name}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
        records += [ImageRecord(str(f), label) for f in images]
    if skipped:
        kinds = sorted({p.suffix.lower() or "(no extension)" for p in skipped})
        warn(f"ImageFolder '{root}': skipped {len(skipped)} file(s) that are not images by their extension "
             f"({', '.join(kinds[:5])}), e.g. '{skipped[0]}'")
    return ImageDataset(records, names, root.name)


def _check_class_names(root: Path, names: Sequence[str]) -> None:
    """Refuse class folders whose names differ only in Unicode normalisation (NFC / NFD twins look the same everywhere
    a person reads them), and warn about names that differ only in case (one folder on a case-insensitive file
    system, so the data would not survive a copy to macOS or Windows as it is)."""
    import unicodedata

    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            raise CarrotError(f"ImageFolder '{root}': class folders {seen[key]!r} and {name!r} differ only in Unicode "
                              "normalisation (they look the same); rename one")
        seen[key] = name
    folded: dict[str, str] = {}
    for name in names:
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            warn(f"ImageFolder '{root}': class folders {other!r} and {name!r} differ only in case; they are two classes "
                 "here, but one folder on a case-insensitive file system")


def stratified_indices(labels: np.ndarray, classes: Sequence[str], test_fraction: float, seed: int,
                       name: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices of a per-class random split of integer ``labels``; every class
    keeps at least one training and one test row."""
    if not 0 < test_fraction < 1:
        raise CarrotError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, test = [], []
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise CarrotError(
                f"{name}: class '{classes[c]}' has {len(idx)} image(s); a train/test split needs at least 2"
            )
        idx = rng.permutation(idx)
        k = min(max(1, int(round(len(idx) * test_fraction))), len(idx) - 1)
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def stratified_split(ds: ImageDataset, test_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Per-class random split of a data set (see :func:`stratified_indices`)."""
    train, test = stratified_indices(ds.labels, ds.classes, test_fraction, seed, ds.name)
    return ds.subset(train.tolist(), f"{ds.name}/train"), ds.subset(test.tolist(), f"{ds.name}/test")


def load_imagefolder(root: str | Path, test_fraction: float = 0.25, seed: int = 0,
                     max_per_class: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """``root/train/<class>/*`` + ``root/test|val/<class>/*`` (``max_per_class``: in each split), or
    ``root/<class>/*`` (``max_per_class``: before the split) split stratified."""
    root = Path(root)
    if not root.is_dir():
        raise CarrotError(f"data root: expected a directory, got '{root}'")
    test_dir = next((root / n for n in ("test", "val", "valid", "validation") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = _scan_imagefolder(root / "train")
        test = _scan_imagefolder(test_dir, train.classes)
        train.name, test.name = f"{root.name}/train", f"{root.name}/{test_dir.name}"
        return cap_split(train, max_per_class, seed), cap_split(test, max_per_class, seed)
    ds = _with_parts(_scan_imagefolder(root), root)
    return stratified_split(cap_split(ds, max_per_class, seed), test_fraction, seed)


def cap_split(ds: ImageDataset, max_per_class: int | None, seed: int) -> ImageDataset:
    """At most ``max_per_class`` random records of each class (seeded); the split itself when None."""
    if max_per_class is None:
        return ds
    return ds.subset(cap_per_class(ds.labels, len(ds.classes), max_per_class, seed).tolist())


def _with_parts(ds: ImageDataset, root: Path) -> ImageDataset:
    """Attach part boxes from ``root/parts.json`` (relative path -> [x, y, w, h] or a list of them)."""
    import json

    f = root / "parts.json"
    if not f.is_file():
        return ds
    try:
        table = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CarrotError(f"'{f}' is not valid JSON ({exc})") from None
    recs = []
    for r in ds.records:
        v = table.get(str(Path(r.path).relative_to(root)))
        boxes = None
        if v:
            v = [v] if not isinstance(v[0], (list, tuple)) else v
            boxes = tuple((float(x), float(y), float(x) + float(w), float(y) + float(h)) for x, y, w, h in v)
        recs.append(ImageRecord(r.path, r.label, r.bbox, boxes))
    return ImageDataset(recs, ds.classes, ds.name, ds.meta)


def _read_table(path: Path, ncols: int, layout: str = "CUB/NABirds") -> list[list[str]]:
    """Whitespace-separated rows of a data set's text table, each with at least ``ncols`` fields."""
    if not path.is_file():
        raise CarrotError(f"{layout} layout: missing '{path.name}' in '{path.parent}'")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows) if len(r) < ncols), None)
    if bad is not None:
        raise CarrotError(f"{layout} layout: '{path}' line {bad + 1}: expected {ncols} fields, got {rows[bad]}")
    return rows


def load_cub(root: str | Path, bbox_crop: bool = False, name: str = "CUB") -> tuple[ImageDataset, ImageDataset]:
    """CUB-200-2011 (and NABirds, which shares its layout): images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt, images/, optional bounding_boxes.txt and parts/part_locs.txt.
    Only classes that have images become labels (NABirds lists its hierarchy's inner nodes too)."""
    root = Path(root)
    if (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    images = {r[0]: r[1] for r in _read_table(root / "images.txt", 2)}
    labels = {r[0]: int(r[1]) for r in _read_table(root / "image_class_labels.txt", 2)}
    split = {r[0]: r[1] == "1" for r in _read_table(root / "train_test_split.txt", 2)}
    class_rows = _read_table(root / "classes.txt", 2) if (root / "classes.txt").is_file() else None
    ids = sorted(set(labels.values()))
    names = {int(r[0]): " ".join(r[1:]) for r in class_rows} if class_rows else {c: str(c) for c in ids}  # NABirds names have spaces
    index = {c: i for i, c in enumerate(ids)}
    boxes = {}
    if bbox_crop:
        boxes = {r[0]: tuple(float(v) for v in r[1:5]) for r in _read_table(root / "bounding_boxes.txt", 5)}
    parts: dict[str, list] = {}
    if (root / "parts" / "part_locs.txt").is_file():  # visible part points; shifted into the crop when cropping
        for img_id, _, x, y, vis in _read_table(root / "parts" / "part_locs.txt", 5):
            if vis == "1":
                ox, oy = boxes[img_id][:2] if img_id in boxes else (0.0, 0.0)
                parts.setdefault(img_id, []).append((float(x) - ox, float(y) - oy) * 2)
    train, test = [], []
    for img_id, rel in images.items():
        if img_id not in labels or img_id not in split:
            raise CarrotError(f"CUB/NABirds layout: image id {img_id} lacks a label or a train/test flag")
        rec = ImageRecord(str(root / "images" / rel), index[labels[img_id]], boxes.get(img_id),
                          tuple(parts[img_id]) if img_id in parts else None)
        (train if split[img_id] else test).append(rec)
    classes = [names.get(c, str(c)) for c in ids]
    return ImageDataset(train, classes, f"{name}/train"), ImageDataset(test, classes, f"{name}/test")


# kind -> (torchvision class, folder it expects under root, (train splits), test split, number of classes)
TORCHVISION_SETS = {
    "cars": ("StanfordCars", "stanford_cars", ("train",), "test", 196),
    "aircraft": ("FGVCAircraft", "fgvc-aircraft-2013b", ("trainval",), "test", 100),
    "flowers102": ("Flowers102", "flowers-102", ("train", "val"), "test", 102),
}


def _torchvision_pairs(ds) -> list[tuple[str, int]]:
    """(path, label) of a torchvision file-list data set without opening any image."""
    if hasattr(ds, "_samples"):
        return [(str(p), int(c)) for p, c in ds._samples]
    if hasattr(ds, "_image_files") and hasattr(ds, "_labels"):
        return [(str(p), int(c)) for p, c in zip(ds._image_files, ds._labels)]
    import torchvision

    raise CarrotError(f"torchvision {torchvision.__version__}: {type(ds).__name__} exposes no file list "
                      "(_samples or _image_files/_labels); carrot cannot read it without loading every image")


def _torchvision_boxes(kind: str, base: Path, split: str) -> dict[str, tuple[float, float, float, float]]:
    """File name -> (x, y, w, h) from the data set's own box annotations (1-based inclusive corners)."""
    if kind == "cars":
        from scipy.io import loadmat

        mat = base / ("devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat")
        rows = loadmat(mat, squeeze_me=True)["annotations"]
        corners = {str(a["fname"]): tuple(float(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")) for a in rows}
    else:  # aircraft: data/images_box.txt, "<id> xmin ymin xmax ymax"
        rows = _read_table(base / "data" / "images_box.txt", 5, "FGVC-Aircraft")
        corners = {f"{r[0]}.jpg": tuple(float(v) for v in r[1:5]) for r in rows}
    return {k: corners_to_box(*c) for k, c in corners.items()}


def corners_to_box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    """1-based inclusive pixel corners (the Cars / Aircraft / Dogs annotations) -> 0-based (x, y, w, h)."""
    return x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1


def load_torchvision(kind: str, root: str | Path, bbox_crop: bool = False) -> tuple[ImageDataset, ImageDataset]:
    """Stanford Cars (train/test), FGVC-Aircraft variants (trainval/test) or Flowers-102 (train+val/test)
    from a local copy, read by torchvision's own loader (never downloads); ``root`` holds (or is) the
    folder torchvision expects. ``bbox_crop`` uses the Cars / Aircraft box annotations."""
    if kind not in TORCHVISION_SETS:
        raise CarrotError(f"data.kind: expected one of {sorted(TORCHVISION_SETS)}, got {kind!r}")
    import torchvision.datasets as tvd

    cls_name, folder, train_splits, test_split, n_classes = TORCHVISION_SETS[kind]
    root = Path(root)
    if root.name == folder:
        root = root.parent
    if bbox_crop and kind == "flowers102":
        raise CarrotError("data.bbox_crop: Flowers-102 has no bounding boxes; use it with cars, aircraft or cub")
    splits = []
    for names in (train_splits, (test_split,)):
        records, classes = [], None
        for split in names:
            try:
                ds = getattr(tvd, cls_name)(str(root), split=split, download=False)
            except (RuntimeError, FileNotFoundError, KeyError, ValueError) as exc:
                raise CarrotError(f"data.root: no readable {cls_name} copy (split '{split}') under '{root}': torchvision "
                                  f"expects '{root / folder}' in the data set's original layout ({exc})") from None
            boxes = _torchvision_boxes(kind, root / folder, split) if bbox_crop else {}
            for path, label in _torchvision_pairs(ds):
                name = os.path.basename(path)
                if bbox_crop and name not in boxes:
                    raise CarrotError(f"data.bbox_crop: no bounding box for '{name}' in the {cls_name} annotations")
                records.append(ImageRecord(path, label, boxes.get(name)))
            # older torchvision (0.20) gives Flowers102 no class names: then the data set's own class count
            classes = [str(c) for c in getattr(ds, "classes", None) or range(n_classes)]
        splits.append(ImageDataset(records, classes, f"{kind}/{'+'.join(names)}"))
    return splits[0], splits[1]


def _dogs_box(xml: Path) -> tuple[float, float, float, float]:
    """(x, y, w, h) covering every dog of a Stanford Dogs annotation file (1-based inclusive corners)."""
    import xml.etree.ElementTree as ET

    if not xml.is_file():
        raise CarrotError(f"data.bbox_crop: Stanford Dogs annotation '{xml}' not found")
    try:
        boxes = [[float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] for b in ET.parse(xml).iter("bndbox")]
    except (ET.ParseError, TypeError, ValueError) as exc:
        raise CarrotError(f"data.bbox_crop: cannot read the box in '{xml}' ({exc})") from None
    if not boxes:
        raise CarrotError(f"data.bbox_crop: no <bndbox> in '{xml}'")
    return corners_to_box(min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def load_stanford_dogs(root: str | Path, bbox_crop: bool = False) -> tuple[ImageDataset, ImageDataset]:
    """Stanford Dogs: Images/<wnid>-<breed>/*.jpg with the official lists/train_list.mat and test_list.mat
    (file_list, labels 1..120); ``bbox_crop`` crops to the box around every dog in Annotation/."""
    from scipy.io import loadmat

    root = Path(root)
    lists = next((d for d in (root / "lists", root) if (d / "train_list.mat").is_file()), None)
    if lists is None or not (root / "Images").is_dir():
        raise CarrotError(f"data.root: no Stanford Dogs copy in '{root}': expected Images/ and lists/train_list.mat, "
                          "lists/test_list.mat (or the .mat files in the root)")
    splits, names = [], {}
    for split in ("train", "test"):
        mat = lists / f"{split}_list.mat"
        if not mat.is_file():
            raise CarrotError(f"Stanford Dogs layout: missing '{mat.name}' in '{lists}'")
        m = loadmat(mat, squeeze_me=True)
        files = [str(f) for f in np.atleast_1d(m["file_list"])]
        labels = np.atleast_1d(m["labels"]).astype(int) - 1
        records = []
        for f, lab in zip(files, labels):
            folder = f.split("/")[0]
            names.setdefault(int(lab), folder.split("-", 1)[-1])
            box = _dogs_box(root / "Annotation" / str(Path(f).with_suffix(""))) if bbox_crop else None
            records.append(ImageRecord(str(root / "Images" / f), int(lab), box))
        splits.append(records)
    classes = [names.get(c, str(c)) for c in range(max(names) + 1)]
    return ImageDataset(splits[0], classes, "dogs/train"), ImageDataset(splits[1], classes, "dogs/test")


ELPV_HINT = "install it with: pip install elpv-dataset"


def elpv_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise CarrotError(f"the ELPV data set package is not installed; {ELPV_HINT}")
    return Path(spec.origin).parent / "data"


def load_elpv(test_fraction: float = 0.25, seed: int = 0, max_per_class: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """ELPV solar-cell electroluminescence images (300x300, real): 8 classes = type x defect probability."""
    root = elpv_root()
    rows = _read_table(root / "labels.csv", 3, "ELPV")
    classes = sorted({f"{t}_p{float(p):.2f}" for _, p, t in rows})
    index = {c: i for i, c in enumerate(classes)}
    recs = [ImageRecord(str(root / path), index[f"{t}_p{float(p):.2f}"]) for path, p, t in rows]
    ds = ImageDataset(recs, classes, "elpv")
    if max_per_class is not None:
        ds = ds.subset(cap_per_class(ds.labels, len(classes), max_per_class, seed).tolist())
    return stratified_split(ds, test_fraction, seed)


def cap_per_class(labels: np.ndarray, n_classes: int, cap: int, seed: int) -> np.ndarray:
    """Sorted row indices keeping at most ``cap`` random rows of each class (seeded)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(np.asarray(labels) == c))[:cap] for c in range(n_classes)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a uint8 array: (n,) labels or (n, h, w) images."""
    import gzip

    if not path.is_file():
        raise CarrotError(f"IDX layout: missing '{path.name}' in '{path.parent}'")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise CarrotError(f"'{path}' is not an unsigned-byte IDX file (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise CarrotError(f"'{path}': header says {shape} but holds {body.size} values (truncated?)")
    return body.reshape(shape)


def load_fashion_mnist(root: str | Path | None = None, max_per_class: int | None = None,
                       seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Fashion-MNIST (real 28x28 grayscale photos of 10 clothing classes; Debian's dataset-fashion-mnist puts
    it in /usr/share/datasets/fashion-mnist): the official 60,000 / 10,000 split, ``max_per_class`` images
    per class of each split at most (seeded). The chosen images are written once as PNG files under the
    user cache directory (keyed by the IDX files' contents) so the rest of carrot sees image files."""
    from PIL import Image

    from carrot.io import atomic_path, sha256_file, user_cache_dir

    root = Path(root or FASHION_MNIST_DEBIAN)
    if not root.is_dir():
        raise CarrotError(f"data.root: no Fashion-MNIST folder '{root}' (apt-get install dataset-fashion-mnist, or "
                          "--data a folder with the four *-idx?-ubyte[.gz] files)")

    def find(stem: str) -> Path:
        return next((p for p in (root / f"{stem}.gz", root / stem) if p.is_file()), root / f"{stem}.gz")

    splits = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path, lab_path = find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) >= 10:
            raise CarrotError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
        rows = cap_per_class(labels, 10, max_per_class, seed) if max_per_class else np.arange(len(labels))
        out = user_cache_dir() / "fashion-mnist" / sha256_file(img_path)[:16] / split
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for i in rows.tolist():
            png = out / f"{i:05d}.png"
            if not png.is_file():
                with atomic_path(png) as tmp:
                    Image.fromarray(images[i]).save(tmp, format="PNG")
            records.append(ImageRecord(str(png), int(labels[i])))
        splits.append(ImageDataset(records, list(FASHION_MNIST_CLASSES), f"fashion-mnist/{split}"))
    return splits[0], splits[1]


def make_synthetic(root: str | Path, num_classes: int = 3, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Write a tiny ImageFolder set: each class is a coloured square at a random place on noise.

    The square's box is the ground-truth part, saved to ``root/parts.json`` (path -> x, y, w, h).
    """
    import json

    from PIL import Image

    if num_classes < 1 or per_class < 1 or size < 8:
        raise CarrotError("make_synthetic: expected num_classes >= 1, per_class >= 1 and size >= 8")
    root = Path(root)
    rng = np.random.default_rng(seed)
    palette = rng.uniform(40, 255, size=(num_classes, 3))
    parts = {}
    for c in range(num_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(110, 25, size=(size, size, 3))
            s = size // 3
            x, y = rng.integers(0, size - s, size=2)
            img[y : y + s, x : x + s] = palette[c] + rng.normal(0, 8, size=(s, s, 3))
            p = d / f"img_{i:03d}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
            parts[str(p.relative_to(root))] = [int(x), int(y), s, s]
    (root / "parts.json").write_text(json.dumps(parts, indent=1))
    return root


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Image files named directly or found (recursively, sorted) in folders."""
    paths: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
            found = [str(f) for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise CarrotError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder '{p}'")
            if len(found) < len(files):
                warn(f"'{p}': skipped {len(files) - len(found)} file(s) that are not images by their extension")
            paths += found
        elif p.is_file():
            paths.append(str(p))
        else:
            raise CarrotError(f"image path not found: '{p}'")
    return paths


@dataclass(frozen=True)
class DataKind:
    """One registered data layout (``data.kind``): its loader of (train, test) from the ``data`` config section, and
    whether it needs ``data.root``."""

    name: str
    load: Callable[[Any], tuple[ImageDataset, ImageDataset]]
    needs_root: bool


DATA_KINDS: dict[str, DataKind] = {}


def data_kind(name: str, needs_root: bool = True) -> Callable:
    """Decorator: register ``load(data_config) -> (train, test)`` as data kind ``name`` where it is defined (the
    registry is the single source of the layouts; :data:`carrot.config.DATA_KINDS` names them for a torch-free
    config, and a test holds the two equal)."""
    def add(load: Callable) -> Callable:
        DATA_KINDS[name] = DataKind(name, load, needs_root)
        return load

    return add


@data_kind("elpv", needs_root=False)
def _elpv(d: Any) -> tuple[ImageDataset, ImageDataset]:
    return load_elpv(d.test_fraction, d.split_seed, d.max_per_class)


@data_kind("imagefolder")
def _imagefolder(d: Any) -> tuple[ImageDataset, ImageDataset]:
    return load_imagefolder(d.root, d.test_fraction, d.split_seed, d.max_per_class)


@data_kind("cub")
def _cub(d: Any) -> tuple[ImageDataset, ImageDataset]:
    return _capped(load_cub(d.root, d.bbox_crop, "CUB"), d)


@data_kind("nabirds")
def _nabirds(d: Any) -> tuple[ImageDataset, ImageDataset]:
    return _capped(load_cub(d.root, d.bbox_crop, "NABirds"), d)


def _torchvision_kind(kind: str) -> None:
    data_kind(kind)(lambda d: _capped(load_torchvision(kind, d.root, d.bbox_crop), d))


for _kind in ("cars", "aircraft", "flowers102"):
    _torchvision_kind(_kind)


@data_kind("dogs")
def _dogs(d: Any) -> tuple[ImageDataset, ImageDataset]:
    return _capped(load_stanford_dogs(d.root, d.bbox_crop), d)


@data_kind("fashion-mnist", needs_root=False)
def _fashion_mnist(d: Any) -> tuple[ImageDataset, ImageDataset]:
    return load_fashion_mnist(d.root, d.max_per_class, d.split_seed)


@data_kind("synthetic", needs_root=False)
def _synthetic(d: Any) -> tuple[ImageDataset, ImageDataset]:
    from carrot.io import user_cache_dir

    root = Path(d.root or user_cache_dir() / "synthetic")
    if not root.is_dir():
        make_synthetic(root, seed=d.split_seed)
    return load_imagefolder(root, d.test_fraction, d.split_seed, d.max_per_class)


def _capped(splits: tuple[ImageDataset, ImageDataset], d: Any) -> tuple[ImageDataset, ImageDataset]:
    """A data set with its own split, each split capped at ``data.max_per_class`` images per class."""
    return tuple(cap_split(s, d.max_per_class, d.split_seed) for s in splits)  # type: ignore[return-value]


def load_splits(config: Any) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits named by ``config.data`` (a :class:`carrot.config.RunConfig`)."""
    d = config.data
    kind = DATA_KINDS[d.kind]
    if kind.needs_root and not d.root:
        raise CarrotError(f"data.root: a {d.kind} data set needs a root directory (--data PATH)")
    if d.root is not None and not Path(d.root).is_dir() and d.kind != "synthetic":
        raise CarrotError(f"data.root: expected a directory, got '{d.root}'")
    return kind.load(d)
