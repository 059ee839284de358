"""kd_keras.eval: the PROTOCOLS table, the shared helpers (every-n-th subsampling, atomic JSON,
default eval split), the k-NN entry point for training, the mse_cos numerics and the Keras
registration of the moved classes."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import config
from kd_keras.artifacts import checkpointing
from kd_keras.data import sources as data
from kd_keras.eval import EvaluationError, features, layers, linear_probe, protocols
from kd_keras.eval import evaluation as evaluate
from kd_keras.optim import optimizers, schedules


def test_protocols_table_is_the_list_config_accepts():
    assert tuple(protocols.PROTOCOLS) == config.EVAL_PROTOCOLS


def test_unknown_protocol_is_one_line_naming_the_flag():
    with pytest.raises(EvaluationError) as err:
        protocols.check_protocols(("knn", "bogus"))
    message = str(err.value)
    assert message.startswith("--protocols: unknown ['bogus']") and "\n" not in message
    assert "knn" in message and "mse_cos" in message  # lists the choices
    # evaluate() checks it before touching data or the model.
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten()])
    cfg = config.EvaluateConfig(model="m", protocols=("bogus",), eval_dir="/nonexistent/x")
    with pytest.raises(EvaluationError, match="^--protocols: unknown"):
        evaluate.evaluate(evaluate.LoadedModel.from_keras(model), cfg)


@pytest.mark.parametrize("num", [0, 1, 5, 37, 40, 1437])
@pytest.mark.parametrize("cap", [None, 0, 1, 3, 7, 40, 5000])
def test_every_nth_keeps_at_most_cap_rows_with_the_smallest_stride(num, cap):
    stride = features.every_nth_stride(num, cap)
    rows = features.every_nth_indices(num, cap)
    np.testing.assert_array_equal(rows, np.arange(num)[::stride])
    assert features.every_nth_count(num, cap) == len(rows)
    if not cap or cap >= num:
        assert stride == 1 and len(rows) == num
    else:
        assert len(rows) <= cap
        assert len(np.arange(num)[:: stride - 1]) > cap  # a smaller stride would keep too many


def test_every_nth_examples_selects_the_same_rows_as_the_indices():
    num, cap = 23, 5
    ds = tf.data.Dataset.from_tensor_slices(
        {"index": np.arange(num), "label": np.arange(num) % 3}
    )
    picked = [int(ex["index"]) for ex in features.every_nth_examples(ds, num, cap)]
    assert picked == list(features.every_nth_indices(num, cap)) == [0, 5, 10, 15, 20]
    assert features.every_nth_examples(ds, num, None) is ds


def test_write_json_replaces_atomically_and_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "r.json")
    checkpointing.write_json(path, {"a": [1, 2.5]})
    assert json.loads(open(path).read()) == {"a": [1, 2.5]}
    with pytest.raises(TypeError):
        checkpointing.write_json(path, {"a": object()})
    assert json.loads(open(path).read()) == {"a": [1, 2.5]}  # untouched
    with pytest.raises(checkpointing.CheckpointWriteError, match="cannot write"):
        checkpointing.write_json(str(tmp_path / "missing" / "r.json"), {})
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no temporary file left


def test_default_eval_split():
    assert data.default_eval_split("digits") == "test"
    assert data.default_eval_split("tfds:cifar10") == "test"
    assert data.default_eval_split("/data/imagenette") == "val"


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_of_embedding_matches_a_numpy_majority_vote():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(60, 2, 2, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 60)  # two classes and odd k: a majority vote has no ties
    model = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten()])

    def ds(lo, hi):
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[lo:hi], "label": labels[lo:hi]}
        ).batch(16)

    got = protocols.knn_of_embedding(model, ds(0, 40), ds(40, 60), ks=(1, 3))
    x_tr, x_te = images[:40].reshape(40, -1), images[40:].reshape(20, -1)
    order = np.argsort(-(_unit(x_te) @ _unit(x_tr).T), axis=1)
    for k in (1, 3):
        votes = labels[:40][order[:, :k]]
        majority = (votes.sum(axis=1) * 2 > k).astype(int)
        assert got[f"knn_top1_k{k}"] == pytest.approx(np.mean(majority == labels[40:]))


def test_head_teacher_agreement_is_the_simreg_loss_and_cosine_of_every_example():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(10, 2, 2, 3)).astype(np.float32)
    backbone = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten()])
    head = keras.Sequential([keras.Input((12,)), keras.layers.Dense(5)])
    w = rng.normal(size=(12, 5)).astype(np.float32)

    def teacher(x):
        return tf.reshape(x, [-1, 12]) @ w

    # Batches of 4, 4, 2: the mean is over examples, not over batch means.
    ds = tf.data.Dataset.from_tensor_slices({"image": images}).batch(4)
    got = protocols.head_teacher_agreement(backbone, head, teacher, ds)
    p = _unit(np.asarray(head(images.reshape(10, -1))))
    t = _unit(images.reshape(10, -1) @ w)
    assert got["num_test"] == 10
    assert got["mse"] == pytest.approx(np.mean(np.sum((p - t) ** 2, axis=1)), rel=1e-5)
    assert got["cos"] == pytest.approx(np.mean(np.sum(p * t, axis=1)), rel=1e-5)


@pytest.mark.parametrize(
    "cls, old_module, config_",
    [
        (optimizers.TorchSGD, "kd_keras.linear_probe", {"learning_rate": 0.1, "momentum": 0.5}),
        (
            schedules.EpochStepDecay,
            "kd_keras.linear_probe",
            {"initial_lr": 0.1, "steps_per_epoch": 2, "milestones": [3], "factor": 0.1},
        ),
        (
            schedules.EpochCosine,
            "kd_keras.linear_probe",
            {"initial_lr": 0.1, "steps_per_epoch": 2, "epochs": 4, "final_lr": 0.0},
        ),
        (layers.AdaptiveAveragePooling, "kd_keras.evaluate", {"grid": 2, "name": "pool"}),
        (
            linear_probe.FeatureStandardization,
            "kd_keras.linear_probe",
            {"epsilon": 1e-8, "name": "standardize"},
        ),
    ],
)
def test_moved_classes_keep_their_registered_name_and_load_from_old_configs(
    cls, old_module, config_
):
    name = f"kd_keras>{cls.__name__}"
    assert keras.saving.get_registered_name(cls) == name
    assert keras.saving.get_registered_object(name) is cls
    # A config saved before the move names the old module; the registered name resolves it.
    saved = {
        "module": old_module,
        "class_name": cls.__name__,
        "config": config_,
        "registered_name": name,
    }
    assert isinstance(keras.saving.deserialize_keras_object(saved), cls)
