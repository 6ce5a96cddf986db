"""`torchrun --nproc_per_node 2 carrot-run fit` (gloo, CPU) gives the same model as one process."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from carrot.data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


# one thread everywhere (torchrun's default unless OMP_NUM_THREADS is set): the same thread count gives the same
# float32 tokens
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fit_run(tmp_path: Path, config: str, name: str, processes: int = 1, *extra: str) -> Path:
    """`carrot-run fit` on a 3-class synthetic set (made once per test) with ``config`` (YAML), in one process or
    under torchrun with ``processes``; its token cache goes to tmp_path / c<name>, the run to tmp_path / r<name>."""
    data = tmp_path / "data"
    if not data.exists():
        make_synthetic(data, num_classes=3, per_class=5, size=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(config)
    args = ["-m", "carrot.cli", "fit", "--config", str(cfg), "--data", str(data), "--quiet",
            "--cache-dir", str(tmp_path / f"c{name}"), "--out", str(tmp_path / f"r{name}"), *extra]
    launcher = []
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    done = subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / f"r{name}"


def assert_same_files(a: Path, b: Path, name: str) -> None:
    x, y = load_file(a / name), load_file(b / name)
    for k in x:
        np.testing.assert_allclose(x[k].numpy(), y[k].numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


def assert_same_embeddings(a: Path, b: Path) -> None:
    np.testing.assert_allclose(np.load(a / "train_embeddings.npy"), np.load(b / "train_embeddings.npy"), rtol=1e-9, atol=1e-12)


TINY = "backbone: {name: vit_tiny_patch16_224, img_size: 32, pretrained: false, batch_size: 1}  # same batches on every rank: identical tokens\n"


def test_torchrun_two_processes_fit_equals_single(tmp_path):
    config = TINY + "head: {lam: 0.5}\n"
    r2, r1 = fit_run(tmp_path, config, "2", 2), fit_run(tmp_path, config, "1")
    assert len(list((tmp_path / "c2").iterdir())) == 4  # 2 ranks x (train, test) shard caches
    shards = r2 / ".shards"
    assert not shards.exists() or not any(shards.iterdir())  # embedding shards assembled and removed
    assert_same_files(r2, r1, "head.safetensors")
    assert_same_embeddings(r2, r1)
    # the streamed path (no token cache) shards the same way and gives the same model
    r3 = fit_run(tmp_path, config, "3", 2, "--no-cache-tokens")
    assert not (tmp_path / "c3").exists()
    assert_same_embeddings(r3, r1)


def test_torchrun_with_a_token_map_fits_the_single_process_map(tmp_path):
    """Rank 0 fits the map on the whole training split's token sample and broadcasts it: the same map and
    embeddings as one process reading its cache."""
    config = TINY + "head: {kind: ridge, lam: 0.5}\ntoken_map: {kind: nystroem, dim: 16}\n"
    r2, r1 = fit_run(tmp_path, config, "2", 2), fit_run(tmp_path, config, "1")
    assert_same_files(r2, r1, "token_map.safetensors")
    assert_same_embeddings(r2, r1)
