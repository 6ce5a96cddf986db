"""Killing `carrot-run fit` during extraction and running it again resumes and gives the same model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from carrot.data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def fit_cmd(data: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "carrot.cli", "fit", "--data", str(data), "--backbone", "efficientnet_lite0",
            "--batch-size", "2", "--out", str(out), "--cache-dir", str(cache), "--quiet", "--lam", "1.0"]


def test_killed_fit_resumes_to_the_same_model(tmp_path):
    data = make_synthetic(tmp_path / "data", num_classes=3, per_class=20, size=32)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(fit_cmd(data, tmp_path / "a", tmp_path / "cache_a"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # never read: no pipe to fill or leak
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        prog = list((tmp_path / "cache_a").glob("*/progress.json"))
        if prog:
            try:
                done = json.loads(prog[0].read_text())["done"]
            except (json.JSONDecodeError, KeyError):
                done = 0
            if done >= 4:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "fit finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "a" / "head.safetensors").exists()
    partial = json.loads(next((tmp_path / "cache_a").glob("*/progress.json")).read_text())["done"]
    assert 4 <= partial < 45  # killed mid-way through the training split

    again = subprocess.run(fit_cmd(data, tmp_path / "a", tmp_path / "cache_a"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    clean = subprocess.run(fit_cmd(data, tmp_path / "b", tmp_path / "cache_b"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    a, b = load_file(tmp_path / "a" / "head.safetensors"), load_file(tmp_path / "b" / "head.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
