"""CompRess, SEED and CRD through kd_keras.train: flags, registry, training, export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kd_keras import config as config_lib
from kd_keras.artifacts import export
from kd_keras.training import run as train

config_lib.define_flags()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
    config_lib.FLAGS.unparse_flags()
    config_lib.FLAGS(["prog", *argv])
    return config_lib.config_from_flags(config_lib.FLAGS)


def _tiny(workdir, teacher, *extra):
    return [
        f"--workdir={workdir}",
        f"--teacher={teacher}",
        "--dataset=digits",
        "--student=convnet_tiny",
        "--image_size=8",
        "--batch_size=32",
        "--epochs=1",
        "--steps_per_epoch=2",
        "--lr=0.05",
        "--knn_k=1",
        "--knn_max_train=64",
        "--eval_batch_size=128",
        "--log_images=0",
        "--verbose=0",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, extra, memory",
    [
        ("seed", ["--queue_size=64", "--head=linear"], "queue"),
        ("crd", ["--crd_num_negatives=16", "--crd_feature_dim=16"], "student_memory"),
    ],
)
def test_method_trains_and_exports_the_student_only(tmp_path, teacher_file, method, extra, memory):
    cfg = _parse(_tiny(tmp_path / "run", teacher_file, f"--method={method}", *extra))
    results, model = train.run_and_return_model(cfg)
    assert results["steps"] == 2 and np.isfinite(results["final_logs"]["loss"])
    assert memory in {v.path.split("/")[1] for v in model.weights}
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["method"] == method and stored["method_options"]
    images = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    embed = export.load_exported(str(tmp_path / "run" / "export"))
    np.testing.assert_allclose(np.asarray(embed(images)), model.student(images), atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method=seed", "--queue_size=100"], "--queue_size=100 must be a positive multiple"),
        (["--method=compress_1q", "--bank_size=16"], "--bank_size=16 is smaller than the global"),
        (["--method=compress_1q", "--compress_momentum=0.9"], "--compress_momentum applies to"),
        (["--method=simreg", "--bank_size=4096"], r"--bank_size applies to --method in"),
        (["--method=crd", "--crd_temperature=0"], "--crd_temperature must be positive"),
        (
            ["--method=compress_2q", "--compress_student_features=backbone", "--head=linear"],
            "--head is not used here: --compress_student_features=backbone",
        ),
    ],
)
def test_bad_flags_are_one_clear_error(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        _parse([f"--workdir={tmp_path}", "--teacher=x", "--batch_size=32", *argv])


@pytest.mark.slow
def test_cli_trains_compress_2q(tmp_path, teacher_file):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_keras.train",
            *_tiny(tmp_path / "run", teacher_file, "--method=compress_2q", "--bank_size=64"),
        ],
        cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "compress_2q" and results["steps"] == 2
    assert os.path.isdir(tmp_path / "run" / "export")
