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


def test_torchrun_two_processes_fit_equals_single(tmp_path):
    data = make_synthetic(tmp_path / "data", num_classes=3, per_class=5, size=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("backbone: {name: vit_tiny_patch16_224, img_size: 32, pretrained: false, batch_size: 1}  # same batches on every rank: identical tokens\nhead: {lam: 0.5}\n")
    args = ["-m", "carrot.cli", "fit", "--config", str(cfg), "--data", str(data), "--quiet", "--cache-dir"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # one thread everywhere (torchrun's default unless OMP_NUM_THREADS is set): the same thread count gives
    # the same float32 tokens
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                            *args, str(tmp_path / "c2"), "--out", str(tmp_path / "r2")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, *args, str(tmp_path / "c1"), "--out", str(tmp_path / "r1")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(list((tmp_path / "c2").iterdir())) == 4  # 2 ranks x (train, test) shard caches
    shards = tmp_path / "r2" / ".shards"
    assert not shards.exists() or not any(shards.iterdir())  # embedding shards assembled and removed
    a, b = load_file(tmp_path / "r2" / "head.safetensors"), load_file(tmp_path / "r1" / "head.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(np.load(tmp_path / "r2" / "train_embeddings.npy"), np.load(tmp_path / "r1" / "train_embeddings.npy"),
                               rtol=1e-9, atol=1e-12)
    # the streamed path (no token cache) shards the same way and gives the same model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    streamed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                               *args, str(tmp_path / "c3"), "--out", str(tmp_path / "r3"), "--no-cache-tokens"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert not (tmp_path / "c3").exists()
    np.testing.assert_allclose(np.load(tmp_path / "r3" / "train_embeddings.npy"), np.load(tmp_path / "r1" / "train_embeddings.npy"),
                               rtol=1e-9, atol=1e-12)


def test_torchrun_with_a_token_map_fits_the_single_process_map(tmp_path):
    """Rank 0 fits the map on the whole training split's token sample and broadcasts it: the same map and
    embeddings as one process reading its cache."""
    data = make_synthetic(tmp_path / "data", num_classes=3, per_class=5, size=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("backbone: {name: vit_tiny_patch16_224, img_size: 32, pretrained: false, batch_size: 1}\n"
                   "head: {kind: ridge, lam: 0.5}\ntoken_map: {kind: nystroem, dim: 16}\n")
    args = ["-m", "carrot.cli", "fit", "--config", str(cfg), "--data", str(data), "--quiet", "--cache-dir"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                            *args, str(tmp_path / "c2"), "--out", str(tmp_path / "r2")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, *args, str(tmp_path / "c1"), "--out", str(tmp_path / "r1")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = load_file(tmp_path / "r2" / "token_map.safetensors"), load_file(tmp_path / "r1" / "token_map.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(np.load(tmp_path / "r2" / "train_embeddings.npy"), np.load(tmp_path / "r1" / "train_embeddings.npy"),
                               rtol=1e-9, atol=1e-12)
