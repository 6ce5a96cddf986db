import numpy as np
import pytest

from carrot.features.cache import extract, open_store
from carrot.data import load_imagefolder
from carrot.errors import CarrotError, StaleCacheError
from carrot.io import read_json, write_json


class Counting:
    """Wrap a backbone and count the images it sees; optionally fail after some batches."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.calls, self.fail_after = inner, 0, fail_after

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x):
        return self.with_globals(x)[::2]

    def with_globals(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after and x.shape[0] > 1:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return self.inner.with_globals(x)


def test_extract_reuses_and_matches_direct_forward(tmp_path, synthetic_root, tiny_vit):
    train, _ = load_imagefolder(synthetic_root)
    bb = Counting(tiny_vit)
    store = extract(bb, train, tmp_path, batch_size=4, progress=False)
    assert store.tokens.dtype == np.float16 and store.tokens.shape == (len(train), 4, 192)
    assert store.grid == (2, 2) and store.manifest["complete"] is True
    calls = bb.calls
    again = extract(bb, train, tmp_path, batch_size=4, progress=False)
    assert bb.calls == calls + 1  # reused: the backbone saw only the 1-image grid probe
    assert np.array_equal(np.asarray(again.tokens), np.asarray(store.tokens))
    from carrot.data import load_image

    x = tiny_vit.transform()(load_image(train.records[2]))[None]
    direct = tiny_vit(x)[0][0].numpy()  # batch of 1 vs 4: float32 round-off, then float16 storage
    np.testing.assert_allclose(np.asarray(store.tokens[2], dtype=np.float32), direct, rtol=2e-3, atol=2e-3)
    assert store.manifest["weights_id"] == tiny_vit.weights_id
    assert store.manifest["dataset_fingerprint"] == train.fingerprint()


def test_interrupted_extraction_resumes_to_the_same_tokens(tmp_path, synthetic_root, tiny_vit):
    train, _ = load_imagefolder(synthetic_root)
    ref = extract(tiny_vit, train, tmp_path / "ref", batch_size=3, progress=False, dtype="float32")
    bb = Counting(tiny_vit, fail_after=3)  # probe + 2 batches, then "killed"
    with pytest.raises(KeyboardInterrupt):
        extract(bb, train, tmp_path / "run", batch_size=3, progress=False, dtype="float32")
    folder = next((tmp_path / "run").iterdir())
    assert read_json(folder / "progress.json")["done"] == 6
    with pytest.raises(CarrotError, match="incomplete"):
        open_store(folder)
    bb2 = Counting(tiny_vit)
    store = extract(bb2, train, tmp_path / "run", batch_size=3, progress=False, dtype="float32")
    assert bb2.calls == 1 + (len(train) - 6 + 2) // 3  # probe + only the remaining batches
    assert np.array_equal(np.asarray(store.tokens), np.asarray(ref.tokens))


def test_stale_manifest_is_refused(tmp_path, synthetic_root, tiny_vit):
    train, _ = load_imagefolder(synthetic_root)
    store = extract(tiny_vit, train, tmp_path, batch_size=8, progress=False)
    man = read_json(store.path / "manifest.json")
    write_json(store.path / "manifest.json", {**man, "weights_id": "0" * 64})
    with pytest.raises(StaleCacheError, match="stale: weights_id"):
        extract(tiny_vit, train, tmp_path, batch_size=8, progress=False)
    write_json(store.path / "manifest.json", {**man, "n": man["n"] + 1})
    with pytest.raises(StaleCacheError):
        open_store(store.path)


def test_changed_dataset_gets_a_fresh_cache(tmp_path, synthetic_root, tiny_vit):
    train, _ = load_imagefolder(synthetic_root)
    a = extract(tiny_vit, train, tmp_path, batch_size=8, progress=False)
    b = extract(tiny_vit, train.subset(range(5)), tmp_path, batch_size=8, progress=False)
    assert a.path != b.path and len(b) == 5


def test_bad_cache_options(tmp_path, synthetic_root, tiny_vit):
    train, _ = load_imagefolder(synthetic_root)
    with pytest.raises(CarrotError, match="cache dtype"):
        extract(tiny_vit, train, tmp_path, dtype="int8", progress=False)
    with pytest.raises(CarrotError, match="batch_size"):
        extract(tiny_vit, train, tmp_path, batch_size=0, progress=False)


def test_bad_image_in_a_worker_gives_a_one_line_error_and_keeps_progress(tmp_path, tiny_vit):
    from carrot.data import make_synthetic

    root = make_synthetic(tmp_path / "d", num_classes=2, per_class=6)
    train, _ = load_imagefolder(root, test_fraction=0.2)
    bad = train.records[7].path
    with open(bad, "wb") as fh:
        fh.write(b"not a png")
    with pytest.raises(CarrotError) as err:
        extract(tiny_vit, train, tmp_path / "c", batch_size=2, num_workers=2, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "cannot read image" in msg and bad in msg
    folder = next((tmp_path / "c").iterdir())
    assert read_json(folder / "progress.json")["done"] == 6  # the three batches before the bad image are kept


def test_a_verified_cache_is_hashed_once_and_any_write_is_caught(tmp_path, synthetic_root, tiny_vit, monkeypatch):
    """open_store(verify=True) hashes tokens.npy in full once and stamps its stat (size, mtime, inode): a later open of
    the same file trusts the stamp; a write to the file (a new mtime) or a stamp taken within the racy window is
    hashed again, and changed bytes are refused."""
    import os
    import time

    import carrot.features.cache as cache

    train, _ = load_imagefolder(synthetic_root)
    store = extract(tiny_vit, train, tmp_path, batch_size=4, progress=False)
    tok = store.path / "tokens.npy"
    old = time.time() - 60
    os.utime(tok, (old, old))
    hashed = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(p) or real(p))
    open_store(store.path, verify=True)
    assert len(hashed) == 1 and (store.path / cache.VERIFIED).is_file()
    open_store(store.path, verify=True)
    assert len(hashed) == 1  # the stamp matches: not hashed again
    with open(tok, "r+b") as fh:  # one byte changed in place: same size and inode, a new modification time
        fh.seek(-1, 2)
        b = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(StaleCacheError, match="tokens.npy changed since extraction"):
        open_store(store.path, verify=True)
    assert len(hashed) == 2
    with open(tok, "r+b") as fh:  # restored, and stamped right after its write: within the racy window, hashed again
        fh.seek(-1, 2)
        fh.write(b)
    open_store(store.path, verify=True)
    open_store(store.path, verify=True)
    assert len(hashed) == 4
