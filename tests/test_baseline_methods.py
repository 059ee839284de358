"""CompRess-1q/2q, SEED and CRD as keras.Models: learning, replicas, checkpoints, errors."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.methods.compress import CompRess
from kd_keras.methods.crd import CRD
from kd_keras.methods.seed import SEED
from kd_keras.nets import heads
from tests.helpers import image_batch, tiny_student, tiny_teacher, two_cpu_strategy

FEAT, TEACHER_DIM = 6, 5


def _images(n, seed):
    """Images whose colour varies per image, so that teacher features differ between images."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(size=(n, 1, 1, 3)).astype(np.float32)
    return 0.7 * colour + 0.3 * image_batch(n, seed=seed)


def _dataset(images, batch_size, with_index=False):
    data = {"student": images}
    if with_index:
        data["index"] = np.arange(len(images), dtype=np.int64)
    return tf.data.Dataset.from_tensor_slices(data).batch(batch_size, drop_remainder=True)


def _head(kind, out_dim, name="head"):
    return heads.prediction_head(FEAT, out_dim, kind, sync_bn=True, name=name)


def _build(kind, seed=0, head="linear", lr=0.05, weight_decay=0.0, teacher_seed=1, **kwargs):
    # Teachers are never saved (they are reloaded from their source): one fixed teacher.
    teacher = tiny_teacher("t", dim=TEACHER_DIM, seed=teacher_seed)
    keras.utils.set_random_seed(seed)
    student = tiny_student(feat=FEAT)
    if kind == "compress_1q":
        model = CompRess(student, teacher, _head(head, TEACHER_DIM), mode="1q", **kwargs)
    elif kind == "compress_2q":
        model = CompRess(
            student, teacher, None if head is None else _head(head, 4), mode="2q", **kwargs
        )
    elif kind == "seed":
        model = SEED(student, teacher, _head(head, TEACHER_DIM), **kwargs)
    else:
        model = CRD(student, teacher, _head(head, 8), feature_dim=8, **kwargs)
    model.weight_decay = weight_decay
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9))
    model.build((None, 8, 8, 3))
    return model


CASES = {
    "compress_1q": dict(bank_size=32, temperature=0.1),
    "compress_2q": dict(bank_size=32, temperature=0.1, momentum=0.9, head="mlp2"),
    "seed": dict(queue_size=32, student_temperature=0.2, teacher_temperature=0.05),
    "crd": dict(num_data=32, num_negatives=8, temperature=0.1),
}


# SEED's cross-entropy keeps the entropy of its target (tiny dataset: every queued image has a
# duplicate row), so its relative fall is smaller.
FALL = {"compress_1q": 0.5, "compress_2q": 0.5, "crd": 0.5, "seed": 0.92}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_loss_falls_on_a_tiny_run(kind):
    model = _build(kind, lr=0.1, **CASES[kind])
    nets = [model.student, model.head, getattr(model, "teacher_embed", None)]
    nets = [n for n in nets if n is not None]
    initial_weights = [n.get_weights() for n in nets]
    ds = _dataset(_images(32, seed=1), 16, with_index=kind == "crd")
    hist = model.fit(ds.repeat(), epochs=25, steps_per_epoch=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(hist))
    # The memories change during training, so compare the trained and the initial networks
    # against the same (final) memories; test_step pushes nothing.
    trained = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    for net, weights in zip(nets, initial_weights, strict=True):
        net.set_weights(weights)
    initial = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    assert trained < FALL[kind] * initial, (initial, trained)


def test_compress_2q_plain_trains_without_head_and_without_momentum():
    model = _build("compress_2q", head=None, bank_size=32, momentum=0.0)
    assert model.key_encoder is None and model.student_bank.dim == FEAT
    ds = _dataset(_images(32, seed=2), 16).repeat()
    hist = model.fit(ds, epochs=2, steps_per_epoch=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(hist))
    # Without a key copy the student bank holds the student's own normalised features.
    feats = model.student(_images(32, seed=2)[16:], training=True).numpy()
    want = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(model.student_bank.rows().numpy()[16:32], want, atol=0.2)


def test_banks_receive_teacher_features_after_the_loss_and_key_copy_moves_slowly():
    model = _build("compress_2q", head="linear", bank_size=32, momentum=0.9)
    images = image_batch(16, seed=3)
    before = model.teacher_bank.rows().numpy()
    student0 = [v.numpy() for v in model.student.trainable_variables]
    model.fit(_dataset(images, 16), epochs=1, verbose=0)
    teacher = model.teacher(images).numpy()
    rows = model.teacher_bank.rows().numpy()
    np.testing.assert_allclose(
        rows[:16], teacher / np.linalg.norm(teacher, axis=1, keepdims=True), rtol=1e-5
    )
    np.testing.assert_array_equal(rows[16:], before[16:])
    assert int(model.teacher_bank.pointer.numpy()) == int(model.student_bank.pointer.numpy()) == 16
    # key = 0.9 * initial copy + 0.1 * updated student.
    for copy, v0, v in zip(
        model.key_encoder.copies[0], student0, model.student.trainable_variables, strict=True
    ):
        np.testing.assert_allclose(copy.numpy(), 0.9 * v0 + 0.1 * v.numpy(), rtol=1e-5, atol=1e-7)


def test_cached_teacher_features_replace_the_teacher():
    model = _build("seed", queue_size=32)
    images = image_batch(16, seed=4)
    cached = np.random.default_rng(0).normal(size=(16, TEACHER_DIM)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices(
        {"student": images, "teacher_features": {"t": cached}}
    ).batch(16)
    model.fit(ds, epochs=1, verbose=0)
    unit = cached / np.linalg.norm(cached, axis=1, keepdims=True)
    np.testing.assert_allclose(model.queue.rows().numpy()[:16], unit, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["compress_2q"])
def test_two_replicas_match_one_device_on_the_same_global_batch(kind):
    kwargs = dict(CASES[kind])
    images = image_batch(32, seed=5)
    results = []
    for strategy in (tf.distribute.get_strategy(), two_cpu_strategy()):
        with strategy.scope():
            model = _build(kind, seed=3, weight_decay=1e-3, **kwargs)
        hist = model.fit(_dataset(images, 16), epochs=3, verbose=0).history["loss"]
        banks = [model.teacher_bank, model.student_bank] if kind != "seed" else [model.queue]
        results.append(
            (
                hist,
                [w.numpy() for w in model.student.weights],
                [b.rows().numpy() for b in banks],
                [int(b.pointer.numpy()) for b in banks],
            )
        )
    (l1, w1, b1, p1), (l2, w2, b2, p2) = results
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    # Summation order differs between the devices (SyncBN, gradients); T = 0.1 and momentum
    # amplify that round-off to ~3e-5 after 6 steps. A per-replica bank would differ by O(1).
    for a, b in zip(w1 + b1, w2 + b2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert p1 == p2


@pytest.mark.parametrize("kind", ["compress_2q", "crd"])
def test_resume_from_saved_weights_continues_with_the_same_memory(kind, tmp_path):
    ds = _dataset(_images(32, seed=6), 16, with_index=kind == "crd")
    first = _build(kind, seed=4, **CASES[kind])
    first.fit(ds, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "ckpt.weights.h5")
    first.save_weights(path)
    resumed = _build(kind, seed=9, **CASES[kind])  # other initial banks and weights
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(path)
    first.fit(ds, epochs=1, verbose=0)  # the uninterrupted run's second epoch
    resumed.fit(ds, epochs=1, verbose=0)
    for a, b in zip(resumed.weights, first.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


def test_teacher_is_not_saved_and_memories_are():
    model = _build("compress_2q", head="linear", bank_size=32, momentum=0.5)
    paths = [v.path for v in model.weights]
    assert not {id(v) for v in model.teacher.model.weights} & {id(v) for v in model.weights}
    assert any("teacher_bank" in p for p in paths) and any("key_encoder" in p for p in paths)
    assert not any(v.trainable for v in model.teacher_bank.weights + model.key_encoder.weights)


def test_configuration_errors_name_the_flag():
    with pytest.raises(ValueError, match="use a head"):
        _build("compress_1q", head="linear", bank_size=32).__class__(
            tiny_student(feat=FEAT), tiny_teacher("t", dim=TEACHER_DIM), None, mode="1q"
        )
    seed = _build("seed", queue_size=40)
    with pytest.raises(ValueError, match="--queue_size=40 must be a multiple of the global batch"):
        seed.check_batch(16)
    compress = _build("compress_2q", head=None, bank_size=8, momentum=0.0)
    with pytest.raises(ValueError, match="--bank_size=8 is smaller than the global batch"):
        compress.check_batch(16)
    with pytest.raises(ValueError, match="--compress_momentum must be in"):
        _build("compress_2q", head=None, bank_size=32, momentum=1.0)
