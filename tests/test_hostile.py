"""Hostile input and faults: a table-driven catalogue of what a new user or an attacker gives ``carrot-run``.

Each :class:`Case` is one line: the command line (``{run}`` a fitted run, ``{data}`` its ImageFolder data,
``{tmp}`` the case's scratch folder, ``{cfg}`` a YAML file, ``{img}`` one image), what to set up first, and
either the exit code 2 with a regular expression the one-line error must match, or exit code 0. Every case
then checks that the error is one line (no traceback) and that nothing was half-written: a refused command
leaves every file in the workspace (data, run, caches, outputs) byte-identical, unless the case says the
refusal comes after complete, resumable work (``changes=True``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from carrot.cli import cli

TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "pretrained": False, "batch_size": 8}


@dataclass
class W:
    """One case's workspace: a copy of the data and of a fitted run, scratch space, a config file."""

    tmp: Path
    data: Path
    run: Path
    cfg: Path

    @property
    def img(self) -> Path:
        return self.data / "class_00" / "img_000.png"

    def fmt(self, s: str) -> str:
        return s.format(tmp=self.tmp, data=self.data, run=self.run, cfg=self.cfg, img=self.img)

    def config(self, **sections) -> None:
        """Write {cfg}: the tiny backbone, with ``sections`` merged in (dotted keys allowed: 'head.lam')."""
        d: dict = {"backbone": dict(TINY)}
        for key, value in sections.items():
            *parents, leaf = key.split("__")
            node = d
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        self.cfg.write_text(yaml.safe_dump(d))

    def meta(self) -> dict:
        return json.loads((self.run / "run.json").read_text())

    def set_meta(self, meta: dict) -> None:
        (self.run / "run.json").write_text(json.dumps(meta))


@dataclass(frozen=True)
class Case:
    name: str
    argv: str  # split on spaces after formatting; {placeholders} as in W.fmt
    match: str | None  # regex the one-line error must match (None: the command must succeed)
    setup: Callable[[W], None] | None = None
    changes: bool = False  # a refusal that comes after complete, resumable work may change the workspace
    env: dict = field(default_factory=dict)
    check: Callable[[W, object], None] | None = None  # extra assertions on success
    cwd: str | None = None  # run from this folder ({placeholders} allowed)

    @property
    def code(self) -> int:
        return 0 if self.match is None else 2


FIT = "fit --config {cfg} --data {data} --out {tmp}/new --quiet"
PREDICT = "predict {run} {tmp}/x --quiet --out {tmp}/pred.json"
LOAD = "predict {run} {img} --quiet --out {tmp}/pred.json"  # loads the run, classifies one image


# -- setup helpers: each builds one hostile thing ----------------------------------------------------------
def cfg(**sections) -> Callable[[W], None]:
    return lambda w: w.config(**sections)


def raw_cfg(text: str | bytes) -> Callable[[W], None]:
    def setup(w: W) -> None:
        w.cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def image(name: str, make: Callable[[], Image.Image | bytes], **save) -> Callable[[W], None]:
    """{tmp}/x/<name>: an image made by ``make`` (a PIL image saved with ``save`` options, or raw bytes)."""
    def setup(w: W) -> None:
        d = w.tmp / "x"
        d.mkdir(exist_ok=True)
        obj = make()
        if isinstance(obj, bytes):
            (d / name).write_bytes(obj)
        else:
            obj.save(d / name, **save)
    return setup


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost nothing (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def noise(mode: str = "RGB", size=(40, 40), seed: int = 0) -> Callable[[], Image.Image]:
    def make() -> Image.Image:
        a = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        return Image.fromarray(a).convert(mode)
    return make


def float_image(lo: float, hi: float, nan: bool = False) -> Callable[[], Image.Image]:
    def make() -> Image.Image:
        a = np.linspace(lo, hi, 40 * 40, dtype=np.float32).reshape(40, 40)
        if nan:
            a[0, 0] = np.nan
        return Image.fromarray(a, mode="F")
    return make


def sixteen_bit() -> Image.Image:
    return Image.fromarray(np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16))


def exif_rotated() -> bytes:
    import io

    im = noise(size=(48, 32))()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def animated() -> list:
    return [noise(seed=s)() for s in range(3)]


def gif_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    frames = animated()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def gif_setup(w: W) -> None:
    d = w.tmp / "x"
    d.mkdir(exist_ok=True)
    frames = animated()
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])


def truncated(name: str, fmt: str) -> Callable[[W], None]:
    def setup(w: W) -> None:
        d = w.tmp / "x"
        d.mkdir(exist_ok=True)
        noise()().save(d / name, format=fmt)
        b = (d / name).read_bytes()
        (d / name).write_bytes(b[: len(b) // 3])
    return setup


def data_edit(edit: Callable[[Path], None]) -> Callable[[W], None]:
    return lambda w: (edit(w.data), w.config())


def add_files(sub: str, names: dict[str, bytes | None]) -> Callable[[Path], None]:
    """Files under data/<sub>: bytes, or None for a fresh noise PNG."""
    def edit(root: Path) -> None:
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for name, content in names.items():
            if content is None:
                noise(seed=len(name))().save(d / name)
            else:
                (d / name).write_bytes(content)
    return edit


def layout(kind: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        classes = sorted(p for p in root.iterdir() if p.is_dir())
        if kind == "train-only":
            (root / "train").mkdir()
            for c in classes:
                c.rename(root / "train" / c.name)
        elif kind == "one-class":
            for c in classes[1:]:
                shutil.rmtree(c)
        elif kind == "empty-class":
            for f in classes[0].iterdir():
                f.unlink()
        elif kind == "empty":
            for c in classes:
                shutil.rmtree(c)
        elif kind == "split-classes-differ":
            (root / "train").mkdir()
            (root / "test").mkdir()
            for c in classes:
                shutil.copytree(c, root / "train" / c.name)
            for c in classes[:2]:
                shutil.copytree(c, root / "test" / c.name)
            for c in classes:
                shutil.rmtree(c)
        elif kind == "single-image-class":
            for f in sorted(classes[0].iterdir())[1:]:
                f.unlink()
        elif kind == "duplicates":  # train/test split with one test image copied into train
            (root / "train").mkdir()
            (root / "test").mkdir()
            for c in classes:
                files = sorted(c.iterdir())
                (root / "train" / c.name).mkdir()
                (root / "test" / c.name).mkdir()
                for f in files[:4]:
                    shutil.copy(f, root / "train" / c.name / f.name)
                for f in files[3:]:
                    shutil.copy(f, root / "test" / c.name / f.name)
                shutil.rmtree(c)
        (root / "parts.json").unlink(missing_ok=True)
    return edit


def meta_edit(edit: Callable[[dict], None], keep_files: bool = False) -> Callable[[W], None]:
    """Edit run.json; without ``keep_files`` the run is also made a format-2 run (no checksums), so the edit
    reaches the deeper checks."""
    def setup(w: W) -> None:
        m = w.meta()
        if not keep_files:
            m.pop("files", None)
            m["version"] = 2
        edit(m)
        w.set_meta(m)
    return setup


def file_edit(name: str, how: str, legacy: bool = False) -> Callable[[W], None]:
    """Damage RUN/<name>: truncate, garbage, remove, reshape (a .npy of another shape), nan."""
    def setup(w: W) -> None:
        p = w.run / name
        if how == "truncate":
            b = p.read_bytes()
            p.write_bytes(b[: len(b) // 2])
        elif how == "garbage":
            p.write_bytes(os.urandom(p.stat().st_size if p.exists() else 256))
        elif how == "remove":
            p.unlink()
        elif how == "reshape":
            a = np.load(p)
            np.save(p, a[:-1])
        elif how == "nan":
            a = np.load(p)
            a[0, 0] = np.nan
            np.save(p, a)
        elif how == "empty":
            p.write_bytes(b"")
        if legacy:
            meta_edit(lambda m: None)(w)
    return setup


def cached_fit(w: W) -> None:
    """A fit into a private token cache {tmp}/cache (the cache cases damage it)."""
    w.config(cache_dir=str(w.tmp / "cache"))
    r = CliRunner().invoke(cli, w.fmt("fit --config {cfg} --data {data} --out {tmp}/cached --quiet").split(),
                           env={"CARROT_CACHE_DIR": str(w.tmp / "ucache")})
    assert r.exit_code == 0, r.output


def cache_edit(edit: Callable[[Path], None]) -> Callable[[W], None]:
    def setup(w: W) -> None:
        cached_fit(w)
        for store in sorted(p for p in (w.tmp / "cache").iterdir() if p.is_dir()):
            edit(store)
    return setup


def truncate_tokens(store: Path) -> None:
    p = store / "tokens.npy"
    p.write_bytes(p.read_bytes()[:200])


def flip_token_bytes(store: Path) -> None:
    p = store / "tokens.npy"
    b = bytearray(p.read_bytes())
    b[-10:] = b"\x00" * 10 if b[-10:] != b"\x00" * 10 else b"\x01" * 10
    p.write_bytes(bytes(b))


def make_partial(done: object) -> Callable[[Path], None]:
    def edit(store: Path) -> None:
        m = json.loads((store / "manifest.json").read_text())
        m["complete"] = False
        (store / "manifest.json").write_text(json.dumps(m))
        (store / "progress.json").write_text(json.dumps({"done": done}))
    return edit


def stale_manifest(store: Path) -> None:
    m = json.loads((store / "manifest.json").read_text())
    m["dim"] = 7
    (store / "manifest.json").write_text(json.dumps(m))


def checkpoint(kind: str) -> Callable[[W], None]:
    def setup(w: W) -> None:
        import torch

        p = w.tmp / ("ck.safetensors" if kind.startswith("safetensors") else "ck.pth")
        if kind == "wrong-arch":
            import timm

            torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), p)
        elif kind.startswith("pickle"):
            class Boom:
                def __reduce__(self):
                    return (os.system, ("echo pwned > " + str(w.tmp / "pwned"),))
            if kind == "pickle-torch":  # the code object inside torch's own zip format
                torch.save({"w": torch.zeros(1), "boom": Boom()}, p)
            else:
                p.write_bytes(pickle.dumps({"w": Boom()}, protocol=2 if kind == "pickle2" else 4))
        elif kind == "garbage":
            p.write_bytes(os.urandom(300))
        elif kind == "list":
            torch.save([torch.zeros(2)], p)
        elif kind == "safetensors-truncated":
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(100)}, str(p))
            p.write_bytes(p.read_bytes()[:50])
        elif kind == "empty":
            torch.save({}, p)
        w.config(backbone__checkpoint=str(p))
    return setup


def symlinked_explanations(w: W) -> None:
    outside = w.tmp / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    shutil.rmtree(w.run / "explanations", ignore_errors=True)
    (w.run / "explanations").symlink_to(outside)
    w.config()


def user_file_in_run(w: W) -> None:
    (w.run / "thesis.tex").write_text("do not delete")
    w.config()


def two_explains_elsewhere(w: W) -> None:
    """The first explain from the run's parent folder with relative paths, the second (the case) from elsewhere."""
    d1 = w.tmp / "x" / "a"
    d1.mkdir(parents=True)
    noise(seed=1)().save(d1 / "cat.png")
    (w.tmp / "x" / "b").mkdir()
    noise(seed=2)().save(w.tmp / "x" / "b" / "cat.png")
    old = os.getcwd()
    os.chdir(w.tmp)
    try:
        r = CliRunner().invoke(cli, ["explain", "run", "x/a/cat.png"])
    finally:
        os.chdir(old)
    assert r.exit_code == 0, r.output


def nonempty_out(w: W) -> None:
    (w.tmp / "new").mkdir()
    (w.tmp / "new" / "thesis.tex").write_text("do not delete")
    w.config()


def long_name(w: W) -> None:
    d = w.tmp / "x"
    d.mkdir()
    noise()().save(d / ("a" * 251 + ".png"))


def weird_names(w: W) -> None:
    d = w.tmp / "x"
    d.mkdir()
    for name in ("<img src=x onerror=alert(1)>.png", "ünï cödé ✓.png", "-rf.png", ".hidden.png", "a b;c&d.png"):
        noise(seed=len(name))().save(d / name)


def two_explains(w: W) -> None:
    """Two explains of different images whose names collide: both pages stay listed in the index."""
    d1, d2 = w.tmp / "x" / "a", w.tmp / "x" / "b"
    d1.mkdir(parents=True)
    d2.mkdir(parents=True)
    noise(seed=1)().save(d1 / "cat.png")
    noise(seed=2)().save(d2 / "cat.png")
    r = CliRunner().invoke(cli, ["explain", str(w.run), str(d1 / "cat.png")])
    assert r.exit_code == 0, r.output


def check_two_explains(w: W, r) -> None:
    listed = json.loads((w.run / "explanations" / "explanations.json").read_text())
    assert len(listed) == 2 and len({e["page"] for e in listed}) == 2 and all(Path(e["page"]).is_file() for e in listed)
    index = (w.run / "index.html").read_text()
    assert index.count("explanation.html") >= 2


def check_max_per_class(w: W, r) -> None:
    metrics = json.loads(r.stdout)
    assert metrics["n_train"] + metrics["n_test"] == 3 * 3  # 3 classes, at most 3 images each


def check_duplicates(w: W, r) -> None:
    assert json.loads(r.stdout)["duplicate_test_images"] == 3 and "byte-identical copy" in r.stderr


def check_rebuilt(w: W, r) -> None:
    assert "extracting the tokens again" in r.stderr or "starting it again" in r.stderr, r.stderr


def check_not_pwned(w: W, r) -> None:
    assert not (w.tmp / "pwned").exists()


def check_float_tiff(w: W, r) -> None:
    from carrot.data import load_image

    a = np.asarray(load_image(w.tmp / "x" / "f.tif"))
    assert a.min() == 0 and a.max() == 255  # [0, 1] floats scaled to the full 8-bit range, not black


def check_sixteen_bit(w: W, r) -> None:
    from carrot.data import load_image

    a = np.asarray(load_image(w.tmp / "x" / "s.png"))
    assert a.min() == 0 and a.max() == 255 and abs(int(a[20, 20, 0]) - round(np.linspace(0, 65535, 1600)[820] / 257)) <= 1


def check_exif(w: W, r) -> None:
    from carrot.data import load_image

    assert load_image(w.tmp / "x" / "r.jpg").size == (32, 48)  # 48x32 stored, orientation 6: shown upright 32x48


def check_one_prediction(w: W, r) -> None:
    assert len(json.loads((w.tmp / "pred.json").read_text())) == 1


def check_overwrite(w: W, r) -> None:
    assert (w.tmp / "elsewhere" / "keep.txt").read_text() == "mine" and not (w.run / "explanations").exists()
    assert not [p for p in w.tmp.iterdir() if p.name.startswith(".")]


# -- user text that reaches files and terminals (names are data) ---------------------------------------------
NON_UTF8_CLASS = os.fsdecode(b"cls\xe9")  # a class folder whose name is not UTF-8
NON_UTF8_FILE = os.fsdecode(b"\xff\xfe.png")
FORMULA_CLASSES = ("=1+1", "@SUM(1)", "+cmd|' -C calc'!A0")
MATH_CLASSES = ("$\\foo$", "$\\frac{1}{0}$", "$\\alpha$_x")


def rename_classes(*names: str) -> Callable[[W], None]:
    """The workspace's class folders class_00, class_01, ... renamed to ``names`` (with {cfg} written)."""
    def setup(w: W) -> None:
        for i, name in enumerate(names):
            os.rename(w.data / f"class_{i:02d}", w.data / name)
        w.config()
    return setup


def non_utf8_names(w: W) -> None:
    rename_classes(NON_UTF8_CLASS)(w)
    os.rename(w.data / "class_01" / "img_000.png", w.data / "class_01" / NON_UTF8_FILE)


def sub(w: W, *argv: str):
    """Another carrot-run command in the same workspace, which must succeed: one string split on spaces, or the
    arguments one by one (names with spaces or newlines)."""
    if len(argv) == 1:
        argv = tuple(w.fmt(a) for a in argv[0].split())
    r = CliRunner().invoke(cli, [str(a) for a in argv], env={"CARROT_CACHE_DIR": str(w.tmp / "ucache")})
    assert r.exit_code == 0, (argv, r.output, r.exception)
    return r


def check_non_utf8(w: W, r) -> None:
    """Fit, explain, predict, the pages, the CSV and the JSON with names that are not UTF-8: exact where a name is
    read back (run.json, explanation.json round-trip the bytes), U+FFFD where a person reads it."""
    from carrot.run.pipeline import Carrot

    run = w.tmp / "new"
    model = Carrot.load(run)
    paths = [rec.path for rec in model.train_records_] + [path for path, _ in model.test_records_]
    assert NON_UTF8_CLASS in model.classes_ and any(path.endswith(NON_UTF8_FILE) for path in paths)
    assert "cls\ufffd" in (run / "index.html").read_text(encoding="utf-8")
    out = sub(w, f"explain {run} {w.data / NON_UTF8_CLASS} --top-k 2 --pixel-map split --json")
    exp = json.loads(out.stdout)[0]
    page = Path(exp["page"]).read_text(encoding="utf-8")
    assert "cls\ufffd" in page and Path(exp["heatmap"]).is_file()
    sub(w, f"predict {run} {w.data / 'class_01'} --quiet --out {w.tmp}/p.json")
    csv_text = (w.tmp / "p.csv").read_text(encoding="utf-8")
    assert "cls\ufffd" in csv_text and "\ufffd\ufffd.png" in csv_text
    assert any(row["image"].endswith(NON_UTF8_FILE) for row in json.loads((w.tmp / "p.json").read_text()))


def check_formulas(w: W, r) -> None:
    import csv

    sub(w, f"predict {w.tmp / 'new'} {w.data} --quiet --out {w.tmp}/p.json")
    with open(w.tmp / "p.csv", newline="", encoding="utf-8") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    assert {f"'{c}" for c in FORMULA_CLASSES} <= set(cells)
    numbers = {c for c in cells if c[:1] in "-+" and c.lstrip("+-").replace(".", "", 1).replace("e-", "", 1).isdigit()}
    assert not [c for c in cells if c[:1] in "=+-@\t\r" and c not in numbers]  # a formula never starts a text cell


def check_math_names(w: W, r) -> None:
    out = sub(w, f"explain {w.tmp / 'new'} {w.data / MATH_CLASSES[0]} --top-k 2 --pixel-map split --json")
    assert all(Path(e["heatmap"]).is_file() for e in json.loads(out.stdout))


def terminal_names(w: W) -> None:
    d = w.tmp / "x"
    d.mkdir()
    noise()().save(d / "\x1b[2Jred\x07.png")


def check_terminal(w: W, r) -> None:
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\\x1b[2Jred\\x07" in r.stdout


def check_relative_data(w: W, r) -> None:
    """A run fitted with a relative --data records where its images are: explained from another folder, it works,
    and every file it wrote is readable by others as usual (0644 under umask 022, the head's too)."""
    from carrot.run.pipeline import Carrot

    run = w.tmp / "new"
    assert Path(Carrot.load(run).config.data.root).is_absolute()
    elsewhere = w.tmp / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    sub(w, f"explain {run} {w.img} --top-k 2 --pixel-map split")
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def moved_data(w: W) -> None:
    """A run fitted on {data} ({tmp}/new), whose data folder then moved to {tmp}/moved."""
    w.config()
    sub(w, FIT)
    shutil.move(str(w.data), str(w.tmp / "moved"))


def fifo_in_data(w: W) -> None:
    os.mkfifo(w.data / "class_00" / "pipe.png")  # opening it would block forever
    w.config()


def symlinked_class(w: W) -> None:
    shutil.move(str(w.data / "class_02"), str(w.tmp / "outside"))
    (w.data / "class_02").symlink_to(w.tmp / "outside", target_is_directory=True)
    w.config()


def check_symlinked_class(w: W, r) -> None:
    from carrot.run.pipeline import Carrot

    model = Carrot.load(w.tmp / "new")
    assert model.classes_ == ["class_00", "class_01", "class_02"] and len(model.train_records_) + len(model.test_records_) == 18


def check_case_twins(w: W, r) -> None:
    assert "differ only in case; they are two classes here" in r.stderr, r.stderr


def check_newline_class(w: W, r) -> None:
    import csv

    folder = w.data / "a\nb"
    sub(w, "predict", w.tmp / "new", folder, "--quiet", "--out", w.tmp / "p.json")
    with open(w.tmp / "p.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert "a\nb" in rows[0] and all(len(row) == len(rows[0]) for row in rows)  # quoted, one row per image
    out = sub(w, "explain", w.tmp / "new", folder / "img_000.png", "--top-k", "2", "--pixel-map", "split")
    assert "a\\x0ab" in out.stdout and len(out.stdout.strip().splitlines()) == 1


def check_bidi(w: W, r) -> None:
    out = sub(w, "explain", w.tmp / "new", w.data / BIDI_CLASS / "img_000.png", "--top-k", "2", "--pixel-map", "split")
    assert "\u202e" not in out.stdout and "evil\\u202egnp" in out.stdout


def predict_after_move(w: W) -> None:
    moved_data(w)
    (w.tmp / "x").mkdir()
    noise()().save(w.tmp / "x" / "a.png")


def dir_named_like_an_image(w: W) -> None:
    (w.tmp / "x" / "d.png").mkdir(parents=True)
    noise()().save(w.tmp / "x" / "a.png")


def two_concurrent_explains(w: W) -> None:
    """Two explain processes of different images into one run at the same time: both pages listed afterwards."""
    for name in ("a", "b"):
        (w.tmp / name).mkdir()
        noise(seed=ord(name))().save(w.tmp / name / f"{name}.png")
    procs = [carrot_run(w, "explain", "{run}", str(w.tmp / name / f"{name}.png"), "--top-k", "2", "--pixel-map", "split")
             for name in ("a", "b")]
    assert all(p.wait(timeout=600) == 0 for p in procs), [p.communicate() for p in procs]


def check_both_listed(w: W, r) -> None:
    listed = json.loads((w.run / "explanations" / "explanations.json").read_text())
    assert sorted(Path(e["image"]).name for e in listed) == ["a.png", "b.png"], listed
    assert all(Path(e["page"]).is_file() for e in listed)


def p3_profile() -> bytes:
    from test_data import icc_profile  # the hand-built Display P3 profile the data tests check colours with

    return icc_profile([[0.5151, 0.2412, -0.0011], [0.2919, 0.6922, 0.0419], [0.1571, 0.0666, 0.7841]])


BIDI_CLASS = "evil\u202egnp.exe"
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


def many_classes(w: W) -> None:
    """45 classes of three images (more than the index's confusion matrix shows)."""
    from carrot.data import make_synthetic

    shutil.rmtree(w.data)
    make_synthetic(w.data, num_classes=45, per_class=3, size=32, seed=1)
    w.config(head__kind="ridge", head__lam=1.0)


def check_many_classes(w: W, r) -> None:
    index = (w.tmp / "new" / "index.html").read_text()
    assert "Most confused classes" in index and "Confusion matrix" not in index and "Class flow" not in index
    assert len(index) < 2_000_000  # 45 x 45 tables would be larger; at 600 classes they were 37 MB


def enospc_on_save(w: W) -> None:
    w.config()


CASES: list[Case] = [
    # -- config: every key's type and range (YAML) --------------------------------------------------------
    Case("data.kind unknown", FIT, r"data\.kind: expected one of", cfg(data__kind="coco")),
    Case("data.kind not a string", FIT, r"data\.kind: expected one of", cfg(data__kind=5)),
    Case("data.root a number", "fit --config {cfg} --out {tmp}/new", r"data\.root: expected a non-empty string", cfg(data__root=5)),
    Case("data.root empty", "fit --config {cfg} --out {tmp}/new", r"data\.root: expected a non-empty string", cfg(data__root="")),
    Case("data.test_fraction abc", FIT, r"data\.test_fraction: expected a number in \(0, 1\), got 'abc'", cfg(data__test_fraction="abc")),
    Case("data.test_fraction 0", FIT, r"data\.test_fraction", cfg(data__test_fraction=0)),
    Case("data.test_fraction 1", FIT, r"data\.test_fraction", cfg(data__test_fraction=1)),
    Case("data.test_fraction true", FIT, r"data\.test_fraction", cfg(data__test_fraction=True)),
    Case("data.test_fraction nan", FIT, r"data\.test_fraction", raw_cfg("data: {test_fraction: .nan}\n")),
    Case("data.split_seed -1", FIT, r"data\.split_seed: expected an integer in \[0, 4294967295\]", cfg(data__split_seed=-1)),
    Case("data.split_seed 1.5", FIT, r"data\.split_seed", cfg(data__split_seed=1.5)),
    Case("data.bbox_crop 'yes'", FIT, r"data\.bbox_crop: expected true or false, got 'yes'", cfg(data__bbox_crop="yes")),
    Case("data.max_per_class 1", FIT, r"data\.max_per_class: expected an integer >= 2", cfg(data__max_per_class=1)),
    Case("data.max_per_class 'all'", FIT, r"data\.max_per_class", cfg(data__max_per_class="all")),
    Case("backbone.name empty", FIT, r"backbone\.name: expected a non-empty string", cfg(backbone__name="")),
    Case("backbone.name a number", FIT, r"backbone\.name", cfg(backbone__name=5)),
    Case("backbone.name unknown", FIT, r"backbone: unknown model 'not_a_model'", cfg(backbone__name="not_a_model")),
    Case("backbone.img_size 0", FIT, r"backbone\.img_size: expected an integer in \[8, 2048\]", cfg(backbone__img_size=0)),
    Case("backbone.img_size 100000", FIT, r"backbone\.img_size: .*2048.*memory", cfg(backbone__img_size=100000)),
    Case("backbone.img_size 224.5", FIT, r"backbone\.img_size", cfg(backbone__img_size=224.5)),
    Case("backbone.img_size '224'", FIT, r"backbone\.img_size", cfg(backbone__img_size="224")),
    Case("backbone.img_size below one patch", FIT, r"backbone\.img_size: 8 px is smaller than one 16-px patch", cfg(backbone__img_size=8)),
    Case("backbone.checkpoint a number", FIT, r"backbone\.checkpoint", cfg(backbone__checkpoint=5)),
    Case("backbone.checkpoint missing file", FIT, r"checkpoint: file not found", cfg(backbone__checkpoint="/nonexistent.pth")),
    Case("backbone.pretrained 'no'", FIT, r"backbone\.pretrained: expected true or false", cfg(backbone__pretrained="no")),
    Case("backbone.batch_size 0", FIT, r"backbone\.batch_size: expected an integer in \[1, 4096\]", cfg(backbone__batch_size=0)),
    Case("backbone.batch_size huge", FIT, r"backbone\.batch_size", cfg(backbone__batch_size=10**7)),
    Case("backbone.batch_size '32'", FIT, r"backbone\.batch_size", cfg(backbone__batch_size="32")),
    Case("backbone.num_workers -1", FIT, r"backbone\.num_workers: expected an integer in \[0, 256\]", cfg(backbone__num_workers=-1)),
    Case("backbone.num_workers 10000", FIT, r"backbone\.num_workers", cfg(backbone__num_workers=10000)),
    Case("backbone.cache_dtype float64", FIT, r"backbone\.cache_dtype: expected float16 or float32", cfg(backbone__cache_dtype="float64")),
    Case("backbone.cache_tokens 'yes'", FIT, r"backbone\.cache_tokens: expected true or false", cfg(backbone__cache_tokens="yes")),
    Case("graph.sigma_space 0", FIT, r"graph\.sigma_space", cfg(graph__sigma_space=0)),
    Case("graph.sigma_space -1", FIT, r"graph\.sigma_space", cfg(graph__sigma_space=-1)),
    Case("graph.sigma_space 'mean'", FIT, r"graph\.sigma_space", cfg(graph__sigma_space="mean")),
    Case("graph.sigma_feat median*0", FIT, r"graph\.sigma_feat", cfg(graph__sigma_feat="median*0")),
    Case("graph.sigma_feat median*inf", FIT, r"graph\.sigma_feat", cfg(graph__sigma_feat="median*inf")),
    Case("graph.sigma_feat .inf", FIT, r"graph\.sigma_feat", raw_cfg("graph: {sigma_feat: .inf}\n")),
    Case("graph.knn 0", FIT, r"graph\.knn: expected an integer >= 1", cfg(graph__knn=0)),
    Case("graph.knn true", FIT, r"graph\.knn", cfg(graph__knn=True)),
    Case("graph.knn 2.5", FIT, r"graph\.knn", cfg(graph__knn=2.5)),
    Case("diffusion.t -1", FIT, r"diffusion\.t: expected a finite number >= 0", cfg(diffusion__t=-1)),
    Case("diffusion.t 'abc'", FIT, r"diffusion\.t", cfg(diffusion__t="abc")),
    Case("diffusion.t .nan", FIT, r"diffusion\.t", raw_cfg("diffusion: {t: .nan}\n")),
    Case("diffusion.t .inf", FIT, r"diffusion\.t", raw_cfg("diffusion: {t: .inf}\n")),
    Case("diffusion.method expm", FIT, r"diffusion\.method", cfg(diffusion__method="expm")),
    Case("diffusion.t 1e9 chebyshev", FIT, r"diffusion\.t: t = 1e\+09 needs \d+ Chebyshev terms .*eigh", cfg(diffusion__t=1e9, diffusion__method="chebyshev")),
    Case("head.lam 0", FIT, r"head\.lam: expected 'auto' or a finite number > 0", cfg(head__lam=0)),
    Case("head.lam -1", FIT, r"head\.lam", cfg(head__lam=-1)),
    Case("head.lam 'big'", FIT, r"head\.lam", cfg(head__lam="big")),
    Case("head.lam .inf", FIT, r"head\.lam", raw_cfg("head: {lam: .inf}\n")),
    Case("head.fit_intercept 'no'", FIT, r"head\.fit_intercept: expected true or false, got 'no'", cfg(head__fit_intercept="no")),
    Case("head.fit_intercept 1", FIT, r"head\.fit_intercept", cfg(head__fit_intercept=1)),
    Case("head.solver qr", FIT, r"head\.solver", cfg(head__solver="qr")),
    Case("device 123", FIT, r"device: expected auto, cpu, cuda, cuda:N or mps, got 123", cfg(device=123)),
    Case("device gpu", FIT, r"device: expected auto, cpu, cuda", cfg(device="gpu")),
    Case("device cuda:x", FIT, r"device: expected", cfg(device="cuda:x")),
    Case("seed -1", FIT, r"seed: expected an integer in \[0, 4294967295\], got -1", cfg(seed=-1)),
    Case("seed 2**40", FIT, r"seed", cfg(seed=2**40)),
    Case("seed '0'", FIT, r"seed", cfg(seed="0")),
    Case("cache_dir 5", FIT, r"cache_dir: expected a non-empty string or null, got 5", cfg(cache_dir=5)),
    Case("cache_dir empty", FIT, r"cache_dir", cfg(cache_dir="")),
    Case("unknown top-level key", FIT, r"config: unknown key 'hed'", cfg(hed={"lam": 1})),
    Case("unknown section key", FIT, r"config\.head: unknown key\(s\) \['lamda'\]", cfg(head__lamda=1)),
    Case("section not a mapping", FIT, r"config\.head: expected a mapping", raw_cfg("head: 5\n")),
    Case("YAML is a list", FIT, r"config: expected a mapping, got list", raw_cfg("- a\n- b\n")),
    Case("YAML syntax error", FIT, r"is not valid YAML", raw_cfg("head: {lam: [1,\n")),
    Case("YAML python tag refused", FIT, r"is not valid YAML", raw_cfg("head: !!python/object/apply:os.system ['echo pwned']\n")),
    Case("config binary garbage", FIT, r"config|YAML|UTF|decode", raw_cfg(b"\xff\xfe\x00garbage\x80\x81")),
    Case("config is a folder", "fit --config {tmp} --data {data} --out {tmp}/new", r"--config.*is a directory"),
    Case("config missing", "fit --config {tmp}/none.yaml --data {data} --out {tmp}/new", r"--config.*does not exist"),
    # -- command-line flags ----------------------------------------------------------------------------
    Case("--t abc", FIT + " --t abc", r"--t.*'abc' is not a valid float", cfg()),
    Case("--t -1", FIT + " --t -1", r"--t.*-1", cfg()),
    Case("--t nan", FIT + " --t nan", r"--t.*not a finite number", cfg()),
    Case("--t inf", FIT + " --t inf", r"--t", cfg()),
    Case("--lam 0", FIT + " --lam 0", r"head\.lam", cfg()),
    Case("--lam abc", FIT + " --lam abc", r"--lam: expected a number or 'auto'", cfg()),
    Case("--sigma-feat bad", FIT + " --sigma-feat wide", r"--sigma-feat: expected a number or 'median'", cfg()),
    Case("--knn 0", FIT + " --knn 0", r"graph\.knn", cfg()),
    Case("--img-size 100000", FIT + " --img-size 100000", r"backbone\.img_size.*2048", cfg()),
    Case("--batch-size 0", FIT + " --batch-size 0", r"backbone\.batch_size", cfg()),
    Case("--max-per-class 1", FIT + " --max-per-class 1", r"data\.max_per_class", cfg()),
    Case("--test-fraction 1", FIT + " --test-fraction 1", r"--test-fraction", cfg()),
    Case("--test-fraction 0", FIT + " --test-fraction 0", r"--test-fraction", cfg()),
    Case("--seed -1", FIT + " --seed -1", r"seed", cfg()),
    Case("--device gpu", FIT + " --device gpu", r"device: expected", cfg()),
    Case("--data missing", "fit --data {tmp}/missing --out {tmp}/new", r"--data.*does not exist"),
    Case("--data a file", "fit --data {img} --out {tmp}/new", r"--data.*is a file"),
    Case("--data-kind bogus", FIT + " --data-kind coco", r"--data-kind.*'coco' is not one of", cfg()),
    Case("--diffusion-method bogus", FIT + " --diffusion-method expm", r"--diffusion-method", cfg()),
    Case("unknown flag", FIT + " --lamda 1", r"No such option '--lamda'.*Did you mean", cfg()),
    Case("unknown command", "fitt", r"No such command 'fitt'"),
    Case("fit without --out", "fit --config {cfg} --data {data}", r"Missing option '--out'", cfg()),
    Case("explain without images", "explain {run}", r"Missing argument 'IMAGES"),
    Case("explain --top-k 0", "explain {run} {img} --top-k 0", r"--top-k.*0"),
    Case("explain --top-k beyond n", "explain {run} {img} --top-k 1000", r"top_k: expected 1 <= k <= \d+"),
    Case("evaluate --what bogus", "evaluate {run} --what magic", r"--what: expected some of"),
    Case("evaluate --k abc", "evaluate {run} --k a,b", r"--k: expected comma-separated integers"),
    Case("evaluate --k 0", "evaluate {run} --k 0", r"--k: expected integers >= 1"),
    Case("evaluate --seeds -1", "evaluate {run} --seeds -1", r"--seeds: expected integers >= 0"),
    Case("evaluate --flip-fraction 1", "evaluate {run} --flip-fraction 1", r"--flip-fraction"),
    Case("evaluate --n-test 0", "evaluate {run} --n-test 0", r"--n-test"),
    Case("evaluate --subsets 1", "evaluate {run} --subsets 1", r"--subsets"),
    Case("evaluate --certificate-limit 0", "evaluate {run} --what certificates --certificate-limit 0", r"--certificate-limit"),
    Case("evaluate --shots 0", "evaluate {run} --shots 0", r"--shots"),
    Case("reweight --val-fraction 1", "reweight {run} --val-fraction 1", r"--val-fraction"),
    Case("reweight --lr -1", "reweight {run} --lr -1", r"--lr"),
    Case("reweight --steps 0", "reweight {run} --steps 0", r"--steps"),
    Case("reweight --ess-floor 2", "reweight {run} --ess-floor 2", r"--ess-floor"),
    Case("debug --val-fraction 1 names itself", "debug {run} --val-fraction 1", r"--val-fraction"),
    Case("debug --drop abc", "debug {run} --drop abc", r"--drop: expected comma-separated integers"),
    Case("debug --downweight 1", "debug {run} --downweight 1", r"--downweight"),
    Case("tracin --flag-fraction 0", "tracin {run} --flag-fraction 0", r"--flag-fraction"),
    Case("tracin --epochs 0", "tracin {run} --epochs 0", r"--epochs"),
    Case("predict --batch-size 0", "predict {run} {img} --batch-size 0", r"--batch-size"),
    Case("bench --t abc", "bench {run} --t a", r"--t: expected comma-separated numbers"),
    Case("bench --t -1", "bench {run} --t -1", r"t: expected diffusion times >= 0"),
    Case("demo --explain-n -1", "demo --out {tmp}/d --explain-n -1", r"--explain-n"),
    # -- paths, names, outputs ---------------------------------------------------------------------------
    Case("explain: run folder missing", "explain {tmp}/norun {img}", r"RUN_DIR.*does not exist"),
    Case("explain: run folder is the data", "explain {data} {img}", r"run metadata not found|not a carrot run"),
    Case("explain: run is a file", "explain {img} {img}", r"RUN_DIR.*is a file"),
    Case("explain: image missing", "explain {run} {tmp}/none.png", r"IMAGES.*does not exist"),
    Case("explain: folder without images", "explain {run} {tmp}/x", r"no images .* in folder", lambda w: (w.tmp / "x").mkdir()),
    Case("explain: 255-byte image name", "explain {run} {tmp}/x --json", None, long_name),
    Case("fit, explain, predict: non-UTF-8 class and file names", FIT, None, non_utf8_names, check=check_non_utf8),
    Case("class folders that are NFC / NFD twins", FIT, r"class folders 'caf.+' and 'caf.+' differ only in Unicode normalisation",
         rename_classes("caf\u00e9", "cafe\u0301")),
    Case("class folders that differ only in case", FIT, None, rename_classes("Cat", "cat"), check=check_case_twins),
    Case("a 200-character class name", FIT, None, rename_classes("x" * 200),
         check=lambda w, r: sub(w, f"explain {w.tmp / 'new'} {w.data / ('x' * 200)} --top-k 2 --pixel-map split")),
    Case("a class name with a newline", FIT, None, rename_classes("a\nb"), check=check_newline_class),
    Case("a class name with a bidi override", FIT, None, rename_classes(BIDI_CLASS), check=check_bidi),
    Case("a FIFO named like an image among the data", FIT, None, fifo_in_data),
    Case("more classes than a confusion matrix can show", FIT, None, many_classes, check=check_many_classes),
    Case("a wide-gamut (Display P3) photo, read through its ICC profile", PREDICT, None,
         image("p3.png", noise(), icc_profile=p3_profile()), check=check_one_prediction),
    Case("a class folder that is a symlink out of the data root", FIT, None, symlinked_class, check=check_symlinked_class),
    Case("predict after the run's data moved (it needs no training image)",
         "predict {tmp}/new {tmp}/x --quiet --out {tmp}/p.json", None, predict_after_move),
    Case("a folder named like an image among the images", PREDICT, None, dir_named_like_an_image,
         check=lambda w, r: len(json.loads((w.tmp / "pred.json").read_text())) == 1),
    Case("two explains of one run at once", "explain {run} {tmp}/a/a.png --top-k 2 --pixel-map split", None,
         two_concurrent_explains, check=check_both_listed),
    Case("YAML alias bomb", FIT, r"config: unknown key 'a'", raw_cfg(ALIAS_BOMB)),
    Case("YAML key given twice", FIT, r"is not valid YAML \(key 'head' appears twice\)", raw_cfg("head: {lam: 1}\nhead: {lam: 2}\n")),
    Case("fit with a relative --data, explained from another folder", "fit --config {cfg} --data data --out new --quiet",
         None, cfg(), cwd="{tmp}", check=check_relative_data),
    Case("explain after the run's data moved", "explain {tmp}/new {tmp}/moved/class_00/img_000.png --pixel-map none",
         r"training image #\d+ of the run is not at '.*' any more \(the run was fitted on '.*data'\); put the data back",
         moved_data),
    Case("predict: class names that are spreadsheet formulas", FIT, None, rename_classes(*FORMULA_CLASSES),
         check=check_formulas),
    Case("explain: class names that are mathtext", FIT, None, rename_classes(*MATH_CLASSES), check=check_math_names),
    Case("explain: control characters in a name reach no terminal", "explain {run} {tmp}/x --top-k 2 --pixel-map split",
         None, terminal_names, check=check_terminal),
    Case("explain: HTML, unicode, dash names", "explain {run} {tmp}/x --top-k 2", None, weird_names,
         check=lambda w, r: "<img src=x onerror" not in "".join(p.read_text() for p in (w.run / "explanations").rglob("*.html"))),
    Case("explain twice: both pages kept", "explain {run} {tmp}/x/b/cat.png", None, two_explains, check=check_two_explains),
    Case("explain --out a file", "explain {run} {img} --out {img}", r"--out.*is a file"),
    Case("explain --out inside the data", "explain {run} {img} --out {data}/exp", r"--out: .* is inside the data folder"),
    Case("predict --out inside the data", "predict {run} {img} --out {data}/p.json", r"--out: .* is inside the data folder"),
    Case("fit --out inside --data", "fit --config {cfg} --data {data} --out {data}/run --quiet", r"--out: .* is inside the data folder", cfg()),
    Case("fit --out is the data folder", "fit --config {cfg} --data {data} --out {data} --quiet", r"--out: .* is inside the data folder", cfg()),
    Case("fit --out a file", "fit --config {cfg} --data {data} --out {img}.txt --quiet", r"--out.*is a file",
         lambda w: (w.config(), Path(w.fmt("{img}.txt")).write_text("x")) and None),
    Case("fit --out a folder of other files", FIT, r"--out: .* holds other files and no carrot run \(thesis\.tex\)", nonempty_out),
    Case("fit over a run without --overwrite", "fit --config {cfg} --data {data} --out {run} --quiet", r"already holds a fitted run; pass --overwrite", cfg()),
    Case("fit --overwrite over a run holding user files", "fit --config {cfg} --data {data} --out {run} --quiet --overwrite",
         r"holds a fitted run and files carrot did not write \(thesis\.tex\)", user_file_in_run),
    Case("fit --out the current folder", "fit --config {cfg} --data {data} --out . --quiet", r"is \(or holds\) the current folder", cfg(), cwd="{tmp}"),
    Case("fit --out a parent of the current folder", "fit --config {cfg} --data {data} --out {tmp} --quiet", r"is \(or holds\) the current folder", cfg(), cwd="{data}"),
    Case("fit --cache-dir inside --out", "fit --config {cfg} --data {data} --out {tmp}/new --cache-dir {tmp}/new/cache --quiet",
         r"holds the token cache .* which replacing the run folder would delete", cfg()),
    Case("fit --data inside --out", "fit --config {cfg} --data {data} --out {tmp} --quiet", r"holds the data folder|holds other files|current folder", cfg()),
    Case("explain from another folder keeps earlier pages", "explain {run} {tmp}/x/b/cat.png", None, two_explains_elsewhere, check=check_two_explains),
    Case("an unknown global flag", "--nonsense-global-flag", r"No such option"),
    Case("demo over a run without --overwrite", "demo --out {run} --quiet", r"already holds a fitted run; pass --overwrite"),
    Case("fit --overwrite with symlinked explanations", "fit --config {cfg} --data {data} --out {run} --quiet --overwrite", None,
         symlinked_explanations, check=check_overwrite),
    Case("reweight --apply over a run", "reweight {run} --steps 2 --apply {run}", r"already holds a fitted run"),
    Case("debug --apply inside the data", "debug {run} --drop 1 --apply {data}/child", r"--apply: .* is inside the data folder"),
    Case("CARROT_CACHE_DIR is a file", FIT, r"CARROT_CACHE_DIR: expected a folder, but .* is a file", cfg(), env={"CARROT_CACHE_DIR": "{img}"}),
    Case("cache_dir is a file", FIT, r"cache_dir: expected a folder, but .* is a file", lambda w: w.config(cache_dir=str(w.img))),
    Case("cache_dir below a file", FIT, r"cache_dir: expected a folder, but .* is a file", lambda w: w.config(cache_dir=str(w.img / "sub"))),
    Case("compare with a missing run", "compare {run} {tmp}/none", r"RUN_B.*does not exist"),
    # -- images: formats, modes, sizes ---------------------------------------------------------------------
    Case("decompression bomb (header 20000x20000)", PREDICT, r"is 20000x20000 px, more than the 100,000,000 px|larger than the", image("bomb.png", lambda: png_header(20000, 20000))),
    Case("decompression bomb in explain", "explain {run} {tmp}/x", r"20000x20000|larger than the", image("bomb.png", lambda: png_header(20000, 20000))),
    Case("decompression bomb in the training data", FIT, r"20000x20000|larger than the", data_edit(add_files("class_00", {"bomb.png": png_header(20000, 20000)}))),
    Case("image above CARROT_MAX_IMAGE_PIXELS", PREDICT, r"more than the 1,000 px carrot decodes", image("big.png", noise(size=(64, 64))), env={"CARROT_MAX_IMAGE_PIXELS": "1000"}),
    Case("CARROT_MAX_IMAGE_PIXELS garbage", PREDICT, r"CARROT_MAX_IMAGE_PIXELS: expected a positive integer", image("a.png", noise()), env={"CARROT_MAX_IMAGE_PIXELS": "lots"}),
    Case("float32 TIFF in [0, 1] scaled, not black", PREDICT, None, image("f.tif", float_image(0, 1)), check=check_float_tiff),
    Case("float32 TIFF out of range refused", PREDICT, r"float pixel values span \[-5, 300\]", image("f.tif", float_image(-5, 300))),
    Case("float32 TIFF with NaN refused", PREDICT, r"float pixels include NaN", image("f.tif", float_image(0, 1, nan=True))),
    Case("16-bit PNG scaled by its range", PREDICT, None, image("s.png", sixteen_bit), check=check_sixteen_bit),
    Case("EXIF orientation applied", PREDICT, None, image("r.jpg", exif_rotated), check=check_exif),
    Case("animated GIF: first frame", PREDICT, None, gif_setup, check=check_one_prediction),
    Case("RGBA PNG", PREDICT, None, image("a.png", noise("RGBA"))),
    Case("LA PNG", PREDICT, None, image("a.png", noise("LA"))),
    Case("palette PNG", PREDICT, None, image("a.png", noise("P"))),
    Case("1-bit PNG", PREDICT, None, image("a.png", noise("1"))),
    Case("grayscale JPEG", PREDICT, None, image("a.jpg", noise("L"), format="JPEG")),
    Case("CMYK JPEG", PREDICT, None, image("a.jpg", noise("CMYK"), format="JPEG")),
    Case("WebP", PREDICT, None, image("a.webp", noise(), format="WEBP")),
    Case("BMP", PREDICT, None, image("a.bmp", noise(), format="BMP")),
    Case("PPM", PREDICT, None, image("a.ppm", noise(), format="PPM")),
    Case("LAB TIFF refused by name", PREDICT, r"pixel mode LAB .* is not supported", image("a.tif", noise("LAB"), format="TIFF")),
    Case("truncated JPEG", PREDICT, r"cannot read image .* corrupt", truncated("t.jpg", "JPEG")),
    Case("truncated PNG", PREDICT, r"cannot read image .* corrupt", truncated("t.png", "PNG")),
    Case("text file named .jpg", PREDICT, r"cannot read image .* not an image", image("a.jpg", lambda: b"hello, not a picture")),
    Case("empty .png", PREDICT, r"cannot read image .* not an image", image("a.png", lambda: b"")),
    Case("4x4 image below one patch", PREDICT, r"is 4x4 px, smaller than one 16-px patch", image("a.png", noise(size=(4, 4)))),
    Case("1000x2 sliver", PREDICT, r"smaller than one 16-px patch", image("a.png", noise(size=(1000, 2)))),
    Case("corrupt image in the training data", FIT, r"cannot read image .*broken\.png", data_edit(add_files("class_01", {"broken.png": b"\x89PNG\r\n\x1a\nxx"}))),
    Case("--region-mask a text file", "explain {run} {img} --region-mask {tmp}/m.txt", r"--region-mask: .* is not an image",
         lambda w: (w.tmp / "m.txt").write_text("0 1\n1 0\n")),
    Case("--region-mask an RGB image", "explain {run} {img} --region-mask {tmp}/m.png", r"--region-mask: expected a single-channel integer image",
         lambda w: noise()().save(w.tmp / "m.png")),
    Case("--region-mask with two images", "explain {run} {data}/class_00 --region-mask {tmp}/m.png", r"--region-mask: expected exactly one image",
         lambda w: Image.new("L", (32, 32)).save(w.tmp / "m.png")),
    Case("--region-mask of another size than the image", "explain {run} {img} --region-mask {tmp}/m.png",
         r"--region-mask: expected a mask of the image's size, 32 x 32 px, got 48 x 40 px",
         lambda w: Image.new("L", (48, 40)).save(w.tmp / "m.png")),
    # -- data layouts -----------------------------------------------------------------------------------------
    Case("only root/train", FIT, r"only a 'train' folder; expected root/train/<class> with root/test", data_edit(layout("train-only"))),
    Case("one class folder", FIT, r"expected at least 2 class folders, found 1", data_edit(layout("one-class"))),
    Case("class folder without images", FIT, r"class folder 'class_00' has no images", data_edit(layout("empty-class"))),
    Case("no class folders", FIT, r"expected one sub-folder per class, found none", data_edit(layout("empty"))),
    Case("train and test classes differ", FIT, r"class folders .* differ from the training classes", data_edit(layout("split-classes-differ"))),
    Case("a class with one image", FIT, r"class 'class_00' has 1 image\(s\); a train/test split needs at least 2", data_edit(layout("single-image-class"))),
    Case("non-image files reported, ignored", FIT + " --json", None, data_edit(add_files("class_00", {"notes.txt": b"x", "x.gif.bak": b"y"})),
         check=lambda w, r: "skipped 2 file(s) that are not images" in r.stderr),
    Case("GIF training images are read", FIT + " --json", None, data_edit(add_files("class_00", {"anim.gif": gif_bytes()})),
         check=lambda w, r: json.loads(r.stdout)["n_train"] + json.loads(r.stdout)["n_test"] == 19),
    Case("hidden files ignored", FIT + " --json", None, data_edit(add_files("class_00", {".DS_Store": b"\x00\x01"})),
         check=lambda w, r: "skipped" not in r.stderr),
    Case("duplicates across train and test reported", FIT + " --json", None, data_edit(layout("duplicates")), check=check_duplicates),
    Case("--max-per-class on an ImageFolder", FIT + " --json --max-per-class 3", None, cfg(), check=check_max_per_class),
    Case("CUB without images.txt", "fit --config {cfg} --data {data} --data-kind cub --out {tmp}/new", r"CUB/NABirds layout: missing 'images.txt'", cfg()),
    Case("CUB table with a short line", "fit --config {cfg} --data {data} --data-kind cub --out {tmp}/new", r"images\.txt' line 1: expected 2 fields",
         data_edit(add_files(".", {"images.txt": b"1\n"}))),
    Case("Fashion-MNIST IDX garbage", "fit --config {cfg} --data {data} --data-kind fashion-mnist --out {tmp}/new", r"not an unsigned-byte IDX file",
         data_edit(add_files(".", {"train-images-idx3-ubyte": b"garbage!", "train-labels-idx1-ubyte": b"garbage!"}))),
    Case("cars without a torchvision copy", "fit --config {cfg} --data {data} --data-kind cars --out {tmp}/new", r"no readable StanfordCars copy", cfg()),
    # -- tampered run directories ---------------------------------------------------------------------------
    Case("run.json not JSON", LOAD, r"run metadata .* is not valid JSON", lambda w: (w.run / "run.json").write_text("{oops")),
    Case("run.json empty", LOAD, r"run metadata .* is not valid JSON", lambda w: (w.run / "run.json").write_text("")),
    Case("run.json a list", LOAD, r"is not a carrot run directory", lambda w: (w.run / "run.json").write_text("[]")),
    Case("run.json version 99", LOAD, r"format version 99 was written by a newer carrot", meta_edit(lambda m: m.update(version=99), keep_files=True)),
    Case("run.json version '2'", LOAD, r"expected a run\.json format version 1\.\.3, got '2'", meta_edit(lambda m: m.update(version="2"), keep_files=True)),
    Case("run.json class list cut", LOAD, r"train_embeddings\.npy \(12, \d+\) does not match the 8 training records", meta_edit(lambda m: m.update(classes=m["classes"][:2]) or m.update(train_records=[r for r in m["train_records"] if r[1] < 2], test_records=[r for r in m["test_records"] if r[1] < 2]))),
    Case("run.json class list cut, labels beyond it", LOAD, r"'train_records' row \d+ .* label index < 2", meta_edit(lambda m: m.update(classes=m["classes"][:2]))),
    Case("run.json class list extended", LOAD, r"run\.json lists 4 classes, the head has 3", meta_edit(lambda m: m["classes"].append("extra"))),
    Case("run.json duplicated class names", LOAD, r"'classes' must be at least 2 distinct names", meta_edit(lambda m: m.update(classes=[m["classes"][0]] * 3))),
    Case("run.json without config", LOAD, r"run\.json lacks 'config'", meta_edit(lambda m: m.pop("config"))),
    Case("run.json without classes", LOAD, r"run\.json lacks 'classes'", meta_edit(lambda m: m.pop("classes"))),
    Case("run.json without train_records", LOAD, r"run\.json lacks 'train_records'", meta_edit(lambda m: m.pop("train_records"))),
    Case("run.json without backbone", LOAD, r"run\.json lacks 'backbone'", meta_edit(lambda m: m.pop("backbone"))),
    Case("run.json without files (format 3)", LOAD, r"run\.json lacks 'files'", meta_edit(lambda m: m.pop("files"), keep_files=True)),
    Case("run.json backbone without weights_id", LOAD, r"'backbone' has no weights_id", meta_edit(lambda m: m["backbone"].pop("weights_id"))),
    Case("run.json a training record is garbage", LOAD, r"'train_records' row 0 is", meta_edit(lambda m: m["train_records"].__setitem__(0, "x"))),
    Case("run.json a training label out of range", LOAD, r"'train_records' row 0 .* label index < 3", meta_edit(lambda m: m["train_records"][0].__setitem__(1, 7))),
    Case("run.json a training record dropped", LOAD, r"train_embeddings\.npy \(\d+, \d+\) does not match the \d+ training records", meta_edit(lambda m: m["train_records"].pop())),
    Case("run.json test records dropped", LOAD, r"test_embeddings\.npy does not match the test records", meta_edit(lambda m: m["test_records"].pop())),
    Case("run.json config invalid", LOAD, r"run\.json config is invalid \(diffusion\.t: expected", meta_edit(lambda m: m["config"]["diffusion"].update(t=-1))),
    Case("run.json metrics not a mapping", LOAD, r"'metrics' is not a mapping", meta_edit(lambda m: m.update(metrics=[]))),
    Case("run.json files entry malformed", LOAD, r"'files' entry '\.\./x' is malformed", meta_edit(lambda m: m["files"].update({"../x": "0"}), keep_files=True)),
    Case("head.safetensors truncated", LOAD, r"head\.safetensors was changed or truncated since the fit", file_edit("head.safetensors", "truncate")),
    Case("head.safetensors garbage", LOAD, r"head\.safetensors was changed or truncated", file_edit("head.safetensors", "garbage")),
    Case("head.safetensors missing", LOAD, r"head\.safetensors is missing", file_edit("head.safetensors", "remove")),
    Case("head.safetensors truncated (format 2)", LOAD, r"head file .* is corrupt|unreadable", file_edit("head.safetensors", "truncate", legacy=True)),
    Case("head.safetensors garbage (format 2)", LOAD, r"head file .* is corrupt|unreadable", file_edit("head.safetensors", "garbage", legacy=True)),
    Case("head.safetensors.json garbage", LOAD, r"head\.safetensors\.json was changed", file_edit("head.safetensors.json", "garbage")),
    Case("head.safetensors.json not JSON (format 2)", LOAD, r"head metadata .* is not valid JSON", file_edit("head.safetensors.json", "garbage", legacy=True)),
    Case("head.safetensors.json empty (format 2)", LOAD, r"head metadata .* is not valid JSON", file_edit("head.safetensors.json", "empty", legacy=True)),
    Case("train_embeddings.npy truncated", LOAD, r"train_embeddings\.npy was changed or truncated", file_edit("train_embeddings.npy", "truncate")),
    Case("train_embeddings.npy truncated (format 2)", LOAD, r"cannot read train_embeddings\.npy", file_edit("train_embeddings.npy", "truncate", legacy=True)),
    Case("train_embeddings.npy garbage (format 2)", LOAD, r"cannot read train_embeddings\.npy", file_edit("train_embeddings.npy", "garbage", legacy=True)),
    Case("train_embeddings.npy a row short (format 2)", LOAD, r"train_embeddings\.npy \(\d+, \d+\) does not match", file_edit("train_embeddings.npy", "reshape", legacy=True)),
    Case("train_embeddings.npy with NaN (format 2)", LOAD, r"train_embeddings\.npy holds .* not all finite", file_edit("train_embeddings.npy", "nan", legacy=True)),
    Case("train_embeddings.npy missing", LOAD, r"train_embeddings\.npy is missing", file_edit("train_embeddings.npy", "remove")),
    Case("test_embeddings.npy truncated (format 2)", LOAD, r"cannot read test_embeddings\.npy", file_edit("test_embeddings.npy", "truncate", legacy=True)),
    Case("weighted run without its weights", LOAD, r"run\.json says the head is weighted but train_weights\.npy is missing", meta_edit(lambda m: m.update(weighted=True))),
    Case("evaluate on a tampered run", "evaluate {run} --what accuracy", r"was changed or truncated", file_edit("test_embeddings.npy", "truncate")),
    Case("explain on a tampered run", "explain {run} {img}", r"was changed or truncated", file_edit("train_embeddings.npy", "garbage")),
    # -- token caches --------------------------------------------------------------------------------------
    Case("cache tokens.npy truncated: rebuilt", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", None, cache_edit(truncate_tokens), check=check_rebuilt),
    Case("cache tokens.npy bytes changed: rebuilt", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", None, cache_edit(flip_token_bytes), check=check_rebuilt),
    Case("cache manifest garbage: rebuilt", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", None,
         cache_edit(lambda s: (s / "manifest.json").write_text("{nope")), check=check_rebuilt),
    Case("cache progress done -5: restarted", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", None, cache_edit(make_partial(-5)), check=check_rebuilt),
    Case("cache progress done 'x': restarted", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", None, cache_edit(make_partial("x")), check=check_rebuilt),
    Case("cache progress beyond n: restarted", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", None, cache_edit(make_partial(10**6)), check=check_rebuilt),
    Case("cache partial tokens truncated: restarted", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", None,
         cache_edit(lambda s: (make_partial(2)(s), truncate_tokens(s))), check=check_rebuilt),
    Case("cache manifest edited: refused as stale", "fit --config {cfg} --data {data} --out {tmp}/new --quiet", r"token cache .* is stale: dim differ", cache_edit(stale_manifest)),
    Case("bench on a damaged cache: the way back", "bench {tmp}/cached --t 0,1", r"tokens\.npy is unreadable or truncated .* delete that folder", cache_edit(truncate_tokens)),
    # -- checkpoints -----------------------------------------------------------------------------------------
    Case("checkpoint of another architecture", FIT, r"does not fit timm model 'vit_tiny_patch16_224' \(is it another architecture\?\): \d+ missing \(cls_token", checkpoint("wrong-arch")),
    Case("malicious pickle checkpoint (protocol 4)", FIT, r"refused .*could run code.*state_dict", checkpoint("pickle")),
    Case("malicious pickle checkpoint (protocol 2)", FIT, r"refused .*could run code.*state_dict", checkpoint("pickle2")),
    Case("malicious object in a torch.save zip", FIT, r"refused .*could run code.*state_dict", checkpoint("pickle-torch")),
    Case("garbage checkpoint", FIT, r"checkpoint: (refused|cannot read)", checkpoint("garbage")),
    Case("checkpoint holding a list", FIT, r"does not hold a state dict", checkpoint("list")),
    Case("empty checkpoint", FIT, r"does not hold a state dict", checkpoint("empty")),
    Case("truncated safetensors checkpoint", FIT, r"checkpoint: cannot read", checkpoint("safetensors-truncated")),
    # -- resources -------------------------------------------------------------------------------------------
    Case("t = 1e9 with the default method", FIT + " --json --t 1e9", None, cfg()),
]


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, fit_tiny) -> Path:
    return fit_tiny(tmp_path_factory.mktemp("hostile") / "run", head={"lam": 0.5})


@pytest.fixture
def workspace(tmp_path, synthetic_root, fitted_run) -> W:
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(synthetic_root, data)
    shutil.copytree(fitted_run, run)
    w = W(tmp_path, data, run, tmp_path / "cfg.yaml")
    meta = w.meta()  # the copied run's data folder is the workspace's (run.json itself is not checksummed)
    meta["config"]["data"]["root"] = str(data)
    w.set_meta(meta)
    return w


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: file contents' SHA-256, link targets, folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def invoke(w: W, argv: str, env: dict | None = None):
    env = {"CARROT_CACHE_DIR": str(w.tmp / "ucache"), **{k: w.fmt(v) for k, v in (env or {}).items()}}
    return CliRunner().invoke(cli, [w.fmt(a) for a in argv.split()], env=env)


def shown_lines(text: str) -> list[str]:
    """The lines a terminal shows after ``text``: carriage returns, newlines and the cursor-up sequence (ESC [ A)
    that progress bars redraw and clear themselves with are played out, so bars leave nothing behind."""
    screen: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("\x1b[A", i):
            row, i = max(0, row - 1), i + 3
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            while len(screen) <= row:
                screen.append([])
        else:
            line = screen[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
        i += 1
    return [s for s in ("".join(line).rstrip() for line in screen) if s]


def assert_one_line_error(r, pattern: str) -> None:
    import re

    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in shown_lines(r.stderr) if not ln.startswith("carrot-run: warning:")]
    assert len(lines) == 1 and lines[0].startswith("carrot-run: error: "), r.stderr
    assert "Traceback" not in r.output and "weights_only=False" not in r.output
    assert re.search(pattern, lines[0]), lines[0]


def test_the_catalogue_is_large_and_its_names_unique():
    assert len(CASES) >= 150 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile(case: Case, workspace: W, monkeypatch) -> None:
    if case.setup is not None:
        case.setup(workspace)
    if not workspace.cfg.exists():
        workspace.config()
    before = snapshot(workspace.tmp)
    if case.cwd is not None:
        monkeypatch.chdir(workspace.fmt(case.cwd))
    r = invoke(workspace, case.argv, case.env)
    if case.match is None:
        assert r.exit_code == 0, (r.output, r.exception)
        if case.check is not None:
            case.check(workspace, r)
        return
    assert_one_line_error(r, case.match)
    if not case.changes:
        after = snapshot(workspace.tmp)
        assert after == before, sorted(set(after.items()) ^ set(before.items()))[:6]


def test_bare_carrot_run_prints_the_help_and_exits_2():
    r = CliRunner().invoke(cli, [])
    assert r.exit_code == 2 and "Commands:" in r.stderr and "fit" in r.stderr


def test_a_config_does_not_depend_on_the_machine_and_takes_paths():
    from carrot.config import RunConfig

    cfg = RunConfig.from_dict({"backbone": {"num_workers": 64}, "cache_dir": Path("/tmp/c"), "data": {"root": Path("/d")}})
    assert cfg.cache_dir == "/tmp/c" and cfg.data.root == "/d" and cfg.backbone.num_workers == 64


def test_the_python_api_never_replaces_a_folder_of_other_files(fitted_run, tmp_path):
    from carrot.errors import CarrotError
    from carrot.run.pipeline import Carrot

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.md").write_text("mine")
    with pytest.raises(CarrotError, match="holds other files and no carrot run"):
        Carrot.load(fitted_run).save(tmp_path / "results")
    assert (tmp_path / "results" / "notes.md").read_text() == "mine"


def test_a_complete_cache_needs_no_free_disk(workspace, monkeypatch):
    import collections

    workspace.config()
    assert invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/a --quiet").exit_code == 0
    monkeypatch.setattr("shutil.disk_usage", lambda p: collections.namedtuple("u", "total used free")(10, 10, 0))
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/b --quiet")
    assert r.exit_code == 0, r.output


# -- faults the table cannot express in one line: a disk that fills, an interrupt, two processes ---------------
def test_disk_full_while_writing_the_run_keeps_the_old_run_whole(workspace, monkeypatch):
    """ENOSPC in the middle of writing a run: one line, exit 2, and the old run is byte-identical."""
    import carrot.io

    workspace.config()
    before = snapshot(workspace.run)
    real = carrot.io.save_npy
    calls = []

    def full(path, arr):
        calls.append(path)
        if len(calls) == 2:  # the second array of the run
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, arr)

    monkeypatch.setattr("carrot.run.persistence.save_npy", full)
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {run} --overwrite --quiet")
    assert_one_line_error(r, r"No space left on device")
    assert snapshot(workspace.run) == before
    assert not [p for p in workspace.tmp.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_disk_too_small_for_the_token_cache_is_refused_before_extraction(workspace, monkeypatch):
    import collections

    workspace.config()
    monkeypatch.setattr("shutil.disk_usage", lambda p: collections.namedtuple("u", "total used free")(10, 10, 1000))
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    assert_one_line_error(r, r"token cache: \d+ images need [\d.]+ (KiB|MiB|GiB) at .*only 1000 B free")
    assert not (workspace.tmp / "ucache" / "tokens").exists() or not list((workspace.tmp / "ucache" / "tokens").iterdir())


def test_a_disk_that_fills_during_the_cache_reservation_is_one_line_and_resumable(workspace, monkeypatch):
    workspace.config()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", no_space)
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    assert_one_line_error(r, r"token cache: cannot reserve [\d.]+ (KiB|MiB|GiB) for .*tokens\.npy' \(No space left on device\)")
    monkeypatch.undo()
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    assert r.exit_code == 0, r.output


def test_an_interrupted_extraction_resumes_to_the_same_tokens(workspace, monkeypatch):
    """Ctrl-C after the first batch: exit 130, the partial cache kept; the rerun resumes and equals a clean run."""
    from carrot.features.backbone import TokenBackbone

    workspace.config(backbone__batch_size=4)
    real = TokenBackbone.with_globals  # what the extraction calls: patch and global tokens of one batch
    seen = []

    def interrupt(self, x):
        seen.append(len(x))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(TokenBackbone, "with_globals", interrupt)
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    assert r.exit_code == 130 and "resumes on the next run" in r.stderr
    assert not (workspace.tmp / "new").exists()
    monkeypatch.undo()
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    assert r.exit_code == 0, r.output
    resumed = [np.load(p) for p in sorted((workspace.tmp / "ucache" / "tokens").glob("*/tokens.npy"))]
    shutil.rmtree(workspace.tmp / "ucache")
    shutil.rmtree(workspace.tmp / "new")
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    clean = [np.load(p) for p in sorted((workspace.tmp / "ucache" / "tokens").glob("*/tokens.npy"))]
    assert len(resumed) == len(clean) == 2 and all(np.array_equal(a, b) for a, b in zip(resumed, clean))


def test_a_folder_that_refuses_writes_is_one_line_and_leaves_no_page(workspace, monkeypatch):
    """EACCES when the explanation page is written (a read-only folder, as root would not see it): one line, exit 2,
    the run untouched, no half-written page folder."""
    workspace.config()
    before = snapshot(workspace.run)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir") or args[-1] if args else None)

    monkeypatch.setattr("carrot.io.tempfile.mkstemp", refuse)
    r = invoke(workspace, "explain {run} {img}")
    assert_one_line_error(r, r"Permission denied")
    assert snapshot(workspace.run) == before


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores file permissions")
def test_a_read_only_run_is_one_line(workspace):
    os.chmod(workspace.run, 0o555)
    try:
        r = invoke(workspace, "explain {run} {img}")
        assert_one_line_error(r, r"Permission denied")
    finally:
        os.chmod(workspace.run, 0o755)


def test_two_processes_extracting_one_cache_wait_for_each_other(workspace):
    """Two fits started together on one token cache: the lock lets one extract while the other waits, then
    reuses the finished cache; both runs succeed with identical embeddings."""
    import subprocess
    import sys

    workspace.config()
    env = {**os.environ, "CARROT_CACHE_DIR": str(workspace.tmp / "ucache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "carrot.cli", "fit", "--config", str(workspace.cfg), "--data",
                               str(workspace.data), "--out", str(workspace.tmp / f"r{i}"), "--quiet"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = (np.load(workspace.tmp / f"r{i}" / "train_embeddings.npy") for i in range(2))
    assert np.array_equal(a, b)
    stores = [p for p in (workspace.tmp / "ucache" / "tokens").iterdir() if p.is_dir()]
    assert len(stores) == 2 and all(json.loads((s / "manifest.json").read_text())["complete"] for s in stores)


def test_a_short_write_while_writing_the_run_is_one_line_and_keeps_the_old_run(workspace, monkeypatch):
    """safetensors reports a full disk as "N requested and M written" (an OSError without errno): one line, exit 2,
    the old run byte-identical, no staging folder left."""
    from carrot.ridge.head import RidgeHead

    workspace.config()
    before = snapshot(workspace.run)

    def short(self, path):
        raise OSError("23040 requested and 12784 written")

    monkeypatch.setattr(RidgeHead, "save", short)
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {run} --overwrite --quiet")
    assert_one_line_error(r, r"No space left on device \(a write stopped short: 23040 requested and 12784 written\)")
    assert snapshot(workspace.run) == before
    assert not [p for p in workspace.tmp.iterdir() if p.name.startswith(".")]


# -- concurrency: real processes on one run directory ------------------------------------------------------
def carrot_run(w: W, *argv: str):
    """``carrot-run ARGV`` as its own process (its own interpreter), started now; stdout and stderr piped."""
    import subprocess
    import sys

    env = {**os.environ, "CARROT_CACHE_DIR": str(w.tmp / "ucache")}
    return subprocess.Popen([sys.executable, "-m", "carrot.cli", *[w.fmt(a) for a in argv]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")


def test_two_fits_to_one_out_leave_one_run_and_refuse_the_other(workspace):
    """Two fits without --overwrite started together on one --out: whichever publishes second is refused (at start-up
    or, when both passed it, at publish), the run left is whole and loads, and no staging folder stays."""
    from carrot.run.pipeline import Carrot

    workspace.config()
    argv = ("fit", "--config", "{cfg}", "--data", "{data}", "--out", "{tmp}/new", "--quiet")
    procs = [carrot_run(workspace, *argv) for _ in range(2)]
    outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 2], outs
    (err,) = [e for code, _, e in outs if code == 2]
    lines = [ln for ln in err.splitlines() if ln.startswith("carrot-run: error:")]  # (waiting notes may precede it)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"already holds a fitted run|received a run from another process", lines[0]), err
    assert Carrot.load(workspace.tmp / "new").head_ is not None
    assert not [p for p in workspace.tmp.iterdir() if p.name.startswith(".new.")]


def test_a_second_writer_is_refused_at_publish_not_only_at_start(tmp_path):
    """Deterministically: a writer that found no run, while another process's run is swapped in before it publishes."""
    from carrot.errors import CarrotError
    from carrot.run.rundir import RunDir

    def write(rd: RunDir, text: str) -> None:
        (rd.path / "run.json").write_text(text)

    target = RunDir(tmp_path / "run")
    with pytest.raises(CarrotError, match="received a run from another process while this one was working"):
        with target.replacing(replace=None) as slow:  # started when there was no run
            with target.replacing(replace=None) as fast:
                write(fast, '{"first": 1}')
            write(slow, '{"second": 2}')
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {"first": 1}
    with target.replacing(replace=target.identity()) as third:  # replacing exactly the run it saw is allowed
        write(third, '{"third": 3}')
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {"third": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_explain_racing_fit_overwrite_writes_no_old_head_page_into_the_new_run(workspace):
    """An explain that loaded the run, while another process refits it with --overwrite: the explain stops with one
    line once the run is replaced, and the new run holds no page computed with the old head."""
    import time

    from carrot.run.pipeline import Carrot

    workspace.config(head__lam=7.0)  # a different head than the run's
    many = workspace.tmp / "many"
    many.mkdir()
    for i in range(60):  # with 200 orders per pixel map, the explain outlasts the fit by far
        noise(seed=i)().save(many / f"img_{i:03d}.png")
    explain = carrot_run(workspace, "explain", "{run}", str(many), "--top-k", "2", "--permutations", "200")
    pages = workspace.run / "explanations"
    deadline = time.time() + 300
    while not (pages.is_dir() and any(pages.glob("0*_*"))) and explain.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert explain.poll() is None, explain.communicate()  # still explaining once its first page is written
    fit = carrot_run(workspace, "fit", "--config", "{cfg}", "--data", "{data}", "--out", "{run}", "--overwrite", "--quiet")
    assert fit.wait(timeout=600) == 0, fit.communicate()
    code, (_, err) = explain.wait(timeout=600), explain.communicate()
    assert code == 2 and "was refitted or replaced by another process while this command ran" in err, err
    assert not (workspace.run / "explanations").exists()  # nothing of the old head's in the new run
    assert Carrot.load(workspace.run).head_.lam_ == 7.0


def test_an_altered_partial_cache_is_not_resumed(workspace, monkeypatch):
    """An interrupted extraction whose written rows were changed (reversed) before the resume: the batch checksums
    catch it, the extraction starts again with a warning, and the tokens equal a clean run's."""
    from carrot.features.cache import RecordImages

    workspace.config(backbone__batch_size=2)
    real = RecordImages.__getitem__

    def interrupt(self, i):
        if i == 4:  # the fifth image of the first split: two batches of two are written
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(RecordImages, "__getitem__", interrupt)
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    assert r.exit_code == 130
    monkeypatch.undo()
    found = [p.parent for p in workspace.tmp.rglob("progress.json")]
    assert len(found) == 1, sorted(str(p) for p in workspace.tmp.rglob("*.json"))
    (partial,) = found
    assert json.loads((partial / "progress.json").read_text())["done"] == 4
    tokens = np.load(partial / "tokens.npy", mmap_mode="r+")
    tokens[:4] = tokens[:4][::-1].copy()  # the rows written so far, reversed
    tokens.flush()
    del tokens
    r = invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet")
    assert r.exit_code == 0, r.output
    assert "cannot be resumed (rows 0..2 changed since they were written); starting it again" in r.stderr, r.stderr
    resumed = {p.parent.name: np.load(p) for p in (workspace.tmp / "ucache" / "tokens").glob("*/tokens.npy")}
    shutil.rmtree(workspace.tmp / "ucache")
    shutil.rmtree(workspace.tmp / "new")
    assert invoke(workspace, "fit --config {cfg} --data {data} --out {tmp}/new --quiet").exit_code == 0
    clean = {p.parent.name: np.load(p) for p in (workspace.tmp / "ucache" / "tokens").glob("*/tokens.npy")}
    assert resumed.keys() == clean.keys() and all(np.array_equal(resumed[k], clean[k]) for k in clean)


def test_a_killed_writers_staging_folders_are_removed_after_a_day(workspace):
    """kill -9 while a run was staged leaves hidden folders; the next write to that run removes those over a day old
    (with a warning) and leaves a recent one (another writer may be at work)."""
    import time

    workspace.config()
    old_partial, old_swap, recent = (workspace.tmp / n for n in (".new.x1.partial", ".new.old-1a2b3c4d", ".new.x2.partial"))
    for d in (old_partial, old_swap, recent):
        d.mkdir()
        (d / "head.safetensors").write_bytes(b"half")
    day_ago = time.time() - 2 * 24 * 3600
    for d in (old_partial, old_swap):
        os.utime(d, (day_ago, day_ago))
    r = invoke(workspace, FIT)
    assert r.exit_code == 0, r.output
    assert not old_partial.exists() and not old_swap.exists() and recent.exists()
    assert r.stderr.count("a run folder that an interrupted writer left over a day ago") == 2, r.stderr
