"""End-to-end runs of kd_keras.train on tiny settings (digits at 8 px, tiny networks)."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kd_keras import config
from kd_keras.artifacts import export
from kd_keras.teachers.loading import load_teacher
from kd_keras.training import run as train
from kd_keras.training.callbacks import NonFiniteLoss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(workdir, teacher, **overrides):
    cfg = config.Config(
        workdir=str(workdir),
        log_images=2,
        verbose=0,
        data=config.DataConfig(image_size=8, shuffle_buffer=256),
        model=config.ModelConfig(student="convnet_tiny", teachers=(teacher,), head="mlp2"),
        optim=config.OptimConfig(batch_size=32, epochs=3, steps_per_epoch=3, lr=0.4),
        eval=config.EvalConfig(knn_k=(1, 5), eval_batch_size=128, knn_max_train=300),
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.mark.slow
def test_smoke_run_exports_a_savedmodel_equal_to_the_student(tmp_path, teacher_file):
    results, method = train.run_and_return_model(_cfg(tmp_path / "run", teacher_file))
    run_dir = tmp_path / "run"
    assert results["steps"] == 9
    stored = json.loads((run_dir / "results.json").read_text())
    for who in ("student", "teacher_teacher", "random_init_student"):
        assert 0.0 <= stored["knn"][who]["knn_top1_k1"] <= 1.0
    assert json.loads((run_dir / "config.json").read_text())["optim"]["epochs"] == 3
    tags = {}
    for sub in ("train", "validation", "knn"):
        acc = EventAccumulator(str(run_dir / "logs" / sub), size_guidance={"tensors": 0})
        acc.Reload()
        tags[sub] = set(acc.Tags()["tensors"])
    assert {"epoch_learning_rate", "epoch_loss_teacher", "views/student"} <= tags["train"]
    assert {"epoch_mse_teacher", "epoch_cos_teacher"} <= tags["validation"]
    assert "student/knn_top1_k5" in tags["knn"]
    # The exported SavedModel (heads dropped) computes the in-memory backbone's features.
    embed = export.load_exported(str(run_dir / "export"))
    images = np.random.default_rng(0).uniform(size=(5, 8, 8, 3)).astype(np.float32)
    want = method.student(images, training=False)
    np.testing.assert_allclose(embed(images), want, atol=1e-5)
    reloaded = export.load_exported_keras(str(run_dir / "export"))
    np.testing.assert_allclose(reloaded(images, training=False), want, atol=1e-5)
    assert not [p for p in os.listdir(run_dir) if p.startswith(".export")]
    # The exported run serves as a teacher for a later run.
    assert load_teacher(str(run_dir), image_size=8).feature_dim == 64


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.at_epoch:
            raise KeyboardInterrupt("simulated pre-emption")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path, teacher_file):
    _, straight = train.run_and_return_model(
        _cfg(tmp_path / "straight", teacher_file, evaluate=False, export=False)
    )
    cfg = _cfg(tmp_path / "resumed", teacher_file, evaluate=False, export=False)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, extra_callbacks=[_Interrupt(at_epoch=2)])
    results, resumed = train.run_and_return_model(cfg)
    assert results["steps"] == 9
    np.testing.assert_allclose(
        float(resumed.optimizer.learning_rate), float(straight.optimizer.learning_rate)
    )
    for a, b in zip(straight.student.weights, resumed.student.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    # Running the finished command again trains no further.
    again, _ = train.run_and_return_model(cfg)
    assert again["steps"] == 9


def test_nan_loss_stops_with_a_message_and_writes_no_checkpoint(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    out = keras.layers.Dense(4)(x)
    model = keras.Model(inputs, out)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * np.nan, bias])
    path = str(tmp_path / "nan.keras")
    model.save(path)
    cfg = _cfg(tmp_path / "run", path, evaluate=False, export=False)
    with pytest.raises(NonFiniteLoss, match="loss became nan.*no checkpoint had been written yet"):
        train.run(cfg)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "checkpoint.json")


def test_batch_size_must_divide_over_replicas(tmp_path, teacher_file):
    cfg = _cfg(tmp_path / "run", teacher_file, strategy="mirrored")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=31))
    assert len(tf.config.list_logical_devices("CPU")) == 2
    with pytest.raises(ValueError, match="--batch_size"):
        train.run(cfg)


def test_supervised_method_learns_digits(tmp_path):
    cfg = _cfg(tmp_path / "sup", "", method="supervised", export=False)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, teachers=()),
        optim=dataclasses.replace(cfg.optim, epochs=4, steps_per_epoch=10),
    )
    results = train.run(cfg)
    assert results["final_logs"]["val_accuracy"] > 0.3  # 10 classes: chance is 0.1


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "kd_keras.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_reports_bad_input_in_one_line(tmp_path):
    missing = _cli(f"--workdir={tmp_path}/a", "--teacher=/no/such/teacher.keras")
    assert missing.returncode == 2
    assert (
        "kd_keras.train: error: --teacher: /no/such/teacher.keras does not exist" in missing.stderr
    )
    assert "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    bad_data = _cli(
        f"--workdir={tmp_path}/b",
        "--teacher=recipe:supervised",
        f"--dataset={empty}",
        "--image_size=8",
    )
    assert bad_data.returncode == 2 and "Traceback" not in bad_data.stderr
    assert str(empty) in bad_data.stderr
    bad_student = _cli(
        f"--workdir={tmp_path}/c",
        "--method=supervised",
        "--student=resnet9",
        "--image_size=8",
        "--epochs=1",
    )
    assert bad_student.returncode == 2 and "resnet9" in bad_student.stderr


@pytest.mark.slow
def test_mirrored_run_over_two_cpus_matches_one_device(tmp_path, teacher_file):
    outs = []
    for strategy in ("default", "mirrored"):
        cfg = _cfg(
            tmp_path / strategy,
            teacher_file,
            strategy=strategy,
            evaluate=False,
            export=False,
            log_images=0,
        )
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=2))
        results, method = train.run_and_return_model(cfg)
        outs.append((results, [w.numpy() for w in method.student.weights]))
    (r1, w1), (r2, w2) = outs
    for key in ("loss", "val_loss", "val_cos_teacher"):
        np.testing.assert_allclose(r1["final_logs"][key], r2["final_logs"][key], rtol=1e-4)
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
