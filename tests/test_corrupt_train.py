"""A training run on a folder with corrupt files: counted once, left out, reported, never hung."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kd_keras import config
from kd_keras.training import run as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(root, bad_per_split=2):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(8):
                pixels = np.full((10, 10, 3), 40 + 150 * c, np.uint8) + rng.integers(0, 30, 3)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        for i in range(bad_per_split):
            (root / split / "a" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root


def test_corrupt_files_are_left_out_and_reported_in_results(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KD_KERAS_CACHE_DIR", str(tmp_path / "cache"))
    root = _folder(tmp_path / "data")
    cfg = config.Config(
        workdir=str(tmp_path / "run"),
        method="supervised",
        verbose=0,
        log_images=0,
        export=False,
        data=config.DataConfig(dataset=f"folder:{root}", image_size=8, shuffle_buffer=64),
        model=config.ModelConfig(student="convnet_tiny", teachers=(), head="mlp2"),
        optim=config.OptimConfig(batch_size=8, epochs=3, steps_per_epoch=2, lr=0.1),
        eval=config.EvalConfig(knn_k=(1,), eval_batch_size=16, knn_max_train=64),
    )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teachers=()))
    with caplog.at_level("WARNING"):
        results = train.run(cfg)
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["skipped_train_files"] == {
        "count": 2,
        "first": ["train/a/bad0.jpg", "train/a/bad1.jpg"],
    }
    assert results["num_train"] == 16 and results["steps"] == 6
    # Reported once per split (train, val), not once per epoch.
    reports = [r for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(reports) == 2


@pytest.mark.slow
def test_all_corrupt_split_is_one_line_exit_2_before_training(tmp_path):
    root = tmp_path / "data" / "train" / "a"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(b"broken" * (i + 1))
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        TF_CPP_MIN_LOG_LEVEL="3",
        KD_KERAS_CACHE_DIR=str(tmp_path / "cache"),
    )
    out = subprocess.run(
        [
            sys.executable, "-m", "kd_keras.train", f"--dataset=folder:{tmp_path / 'data'}",
            "--method=supervised", "--student=convnet_tiny", "--image_size=8",
            f"--workdir={tmp_path / 'run'}", "--batch_size=2",
        ],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "none of the 3 images of split 'train'" in errors[0]
    assert "Traceback" not in out.stderr
