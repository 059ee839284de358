"""swav / oss / oss_offline through kd_keras.train on tiny settings, and their flag checks."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kd_keras import config as config_lib
from kd_keras.artifacts import export
from kd_keras.eval import loading
from kd_keras.methods import factory
from kd_keras.training import run as train
from kd_keras.training.callbacks import NonFiniteLoss

config_lib.define_flags()

CLUSTER = config_lib.ClusterConfig(
    online_teacher="convnet_tiny",
    small_crop_size=4,
    num_small_crops=2,
    large_crop_scale=(0.3, 1.0),
    small_crop_scale=(0.1, 0.3),
    num_prototypes=10,
    proj_dim=8,
    proj_hidden_dim=16,
    classifier_hidden=8,
    queue_length=64,
    queue_start_epoch=1,
)


def _cfg(workdir, method, **cluster):
    return config_lib.Config(
        workdir=str(workdir),
        method=method,
        log_images=2,
        verbose=0,
        data=config_lib.DataConfig(image_size=8, shuffle_buffer=256),
        model=config_lib.ModelConfig(student="convnet_tiny"),
        optim=config_lib.OptimConfig(
            batch_size=32,
            epochs=2,
            steps_per_epoch=2,
            lr=0.6,
            weight_decay=1e-6,
            optimizer="lars",
            final_lr=0.006,
        ),
        eval=config_lib.EvalConfig(knn_k=(1, 5), eval_batch_size=128, knn_max_train=300),
        cluster=dataclasses.replace(CLUSTER, **cluster),
    )


@pytest.fixture(scope="module")
def oss_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("oss") / "run"
    results, method = train.run_and_return_model(_cfg(workdir, "oss"))
    return workdir, results, method


@pytest.mark.slow
def test_oss_run_trains_evaluates_and_exports(oss_run):
    workdir, results, method = oss_run
    assert results["steps"] == 4
    logs = results["final_logs"]
    for key in ("loss_teacher", "loss_student", "loss_domain", "grl_alpha", "queue_used"):
        assert np.isfinite(logs[key]), key
    assert logs["queue_used"] > 0  # epoch 2 used the queue
    assert {"student", "teacher", "random_init_student"} <= set(results["knn"])
    # The exported SavedModel is the student backbone.
    embed = export.load_exported(str(workdir / "export"))
    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(embed(images)), method.student(images, training=False), atol=1e-5
    )
    # So does the student rebuilt from the newest checkpoint (`evaluate --from_checkpoint`;
    # the clustering student takes any input size, the run's own size is used).
    loaded = loading.load_model(str(workdir), from_checkpoint=True)
    assert loaded.image_size == 8
    np.testing.assert_allclose(
        loaded.backbone(images, training=False), method.student(images, training=False), atol=1e-5
    )
    for role in ("teacher", "student"):
        manifest = json.loads((workdir / "networks" / role / "manifest.json").read_text())
        assert manifest["num_prototypes"] == 10 and manifest["proj_dim"] == 8
    acc = EventAccumulator(str(workdir / "logs" / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"epoch_grl_alpha", "epoch_collapse_warning", "epoch_loss_teacher"} <= tags, tags
    assert {"views/large", "views/small"} <= tags


@pytest.mark.slow
def test_oss_offline_loads_the_frozen_teacher_and_prototypes(oss_run, tmp_path):
    teacher_dir, _, online = oss_run
    cfg = _cfg(tmp_path / "offline", "oss_offline")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, teachers=(str(teacher_dir),))
    )
    results, method = train.run_and_return_model(cfg)
    assert results["steps"] == 4
    assert set(results["final_logs"]) >= {"loss_student", "queue_used"}
    np.testing.assert_array_equal(
        method.prototypes.kernel.numpy(), online.prototypes.kernel.numpy()
    )
    for a, b in zip(method.teacher_backbone.weights, online.teacher_backbone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The teacher's k-NN is the online teacher's (same frozen weights, same data).
    assert results["knn"]["teacher"] == pytest.approx(
        json.loads((teacher_dir / "results.json").read_text())["knn"]["teacher"]
    )
    # `evaluate --from_checkpoint` rebuilds the run with its frozen teacher networks and
    # reads the final student from the newest checkpoint.
    loaded = loading.load_model(str(tmp_path / "offline"), from_checkpoint=True)
    assert "checkpoint of step 4" in loaded.source
    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.backbone(images, training=False), method.student(images, training=False), atol=1e-5
    )


def test_oss_offline_rejects_mismatched_prototypes(oss_run, tmp_path):
    teacher_dir, _, _ = oss_run
    cfg = _cfg(tmp_path / "bad", "oss_offline", num_prototypes=12)
    with pytest.raises(ValueError, match="--num_prototypes=12"):
        factory.load_clustering_networks(str(teacher_dir), cfg)
    with pytest.raises(FileNotFoundError, match="no SwAV/OSS network"):
        factory.load_clustering_networks(str(tmp_path), cfg)


@pytest.mark.slow
def test_swav_run_and_collapse_value(tmp_path):
    results = train.run(_cfg(tmp_path / "swav", "swav", queue_length=0))
    assert results["steps"] == 4 and np.isfinite(results["final_logs"]["loss"])
    assert results["final_logs"]["collapse_warning"] in (0.0, 1.0)
    assert (tmp_path / "swav" / "networks" / "network" / "prototypes.npy").is_file()
    # Its export takes crops of any side; evaluation uses the side it was trained on.
    loaded = loading.load_model(str(tmp_path / "swav"))
    assert loaded.image_size == 8 and "export" in loaded.source
    cfg = _cfg(tmp_path, "oss")
    n = 2 + CLUSTER.num_small_crops
    assert factory.uniform_loss(cfg) == pytest.approx(np.log(10) * (2 * n - 1) / (2 * n - 2))
    assert factory.uniform_loss(dataclasses.replace(cfg, method="swav")) == pytest.approx(
        np.log(10)
    )


def test_collapse_warning_fires_at_the_uniform_value(caplog):
    cb = factory.CollapseWarning(np.log(10))
    logs = {"loss_student": np.log(10) * 1.001}
    cb.on_epoch_end(0, logs)
    assert logs["collapse_warning"] == 0.0  # never on the first epoch
    with caplog.at_level("WARNING", logger="kd_keras"):
        cb.on_epoch_end(3, logs)
    assert logs["collapse_warning"] == 1.0 and "collapse" in caplog.text
    logs = {"loss_student": 1.0}
    cb.on_epoch_end(3, logs)
    assert logs["collapse_warning"] == 0.0


def _parse(argv):
    config_lib.FLAGS.unparse_flags()
    config_lib.FLAGS(["prog", *argv])
    return config_lib.config_from_flags(config_lib.FLAGS)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--queue_length=100", "--batch_size=64"], "--queue_length=100 must be a multiple"),
        (["--num_large_crops=3"], "--num_large_crops must be 2"),
        (["--small_crop_size=300", "--image_size=224"], "--small_crop_size=300"),
        (["--proj_dropout=0.1,1.0"], "--proj_dropout"),
        (["--small_crop_scale=0.5,0.1"], "--small_crop_scale"),
        (["--final_lr=1.0", "--lr=0.6"], "--final_lr"),
    ],
)
def test_bad_cluster_flags_name_the_flag(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        _parse([f"--workdir={tmp_path}", "--method=oss", "--image_size=224", *argv])


def test_flagfiles_parse(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        for name, method in (
            ("oss", "oss"),
            ("swav", "swav"),
            ("oss_offline", "oss_offline"),
            ("oss_digits", "oss"),
            ("swav_digits", "swav"),
        ):
            cfg = _parse([f"--flagfile=flags/{name}.cfg", f"--workdir={tmp_path}"])
            assert cfg.method == method
        paper = _parse(["--flagfile=flags/oss.cfg", f"--workdir={tmp_path}"])
        c = paper.cluster
        assert (c.num_prototypes, c.proj_dim, c.queue_length, c.queue_start_epoch) == (
            3000,
            128,
            3840,
            15,
        )
        assert (paper.optim.lr, paper.optim.final_lr, paper.optim.weight_decay) == (
            0.6,
            0.0006,
            1e-6,
        )
        assert (c.num_small_crops, c.small_crop_size, c.proj_dropout) == (6, 96, (0.1, 0.05))
    finally:
        os.chdir(cwd)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated pre-emption")


@pytest.mark.slow
def test_interrupted_oss_run_resumes_queue_grl_and_weights(tmp_path):
    def cfg(name):
        c = _cfg(tmp_path / name, "oss")
        return dataclasses.replace(
            c, evaluate=False, export=False, optim=dataclasses.replace(c.optim, epochs=3)
        )

    _, straight = train.run_and_return_model(cfg("straight"))
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg("resumed"), extra_callbacks=[_Interrupt()])
    results, resumed = train.run_and_return_model(cfg("resumed"))
    assert results["steps"] == 6
    np.testing.assert_allclose(
        float(resumed.optimizer.learning_rate), float(straight.optimizer.learning_rate)
    )
    np.testing.assert_allclose(resumed.grl.alpha.numpy(), straight.grl.alpha.numpy())
    np.testing.assert_allclose(
        resumed.queue.queue.numpy(), straight.queue.queue.numpy(), rtol=1e-4, atol=1e-5
    )
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_nan_in_an_oss_run_stops_with_the_sinkhorn_hint(tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path / "nan", "oss"), evaluate=False, export=False)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e30))
    with pytest.raises(NonFiniteLoss, match="Sinkhorn"):
        train.run(cfg)
    assert not os.path.exists(tmp_path / "nan" / "checkpoints" / "checkpoint.json")
