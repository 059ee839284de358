import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import losses
from kd_keras.methods import SimReg
from kd_keras.nets import heads
from tests.helpers import dataset, image_batch, tiny_student, tiny_teacher


def _method(variant="simreg", teachers=None, head="mlp2", seed=0, weight_decay=0.0, lr=0.1):
    keras.utils.set_random_seed(seed)
    teachers = teachers or [tiny_teacher("a", dim=5, seed=1), tiny_teacher("b", dim=7, seed=2)]
    student = tiny_student()
    head_list = [
        heads.prediction_head(6, t.feature_dim, head, sync_bn=True, name=f"head_{t.name}")
        for t in teachers
    ]
    model = SimReg(
        student, teachers, head_list, variant=variant, weight_decay=weight_decay, sync_bn=True
    )
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9))
    model.build((None, 8, 8, 3))
    return model


def test_loss_decreases_and_teachers_stay_frozen():
    model = _method()
    teacher_before = [[w.numpy().copy() for w in t.model.weights] for t in model.teachers]
    ds = dataset(image_batch(32), 16).repeat()
    first = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]
    hist = model.fit(ds, epochs=30, steps_per_epoch=2, verbose=0).history["loss"]
    assert hist[-1] < 0.5 * first
    for t, before in zip(model.teachers, teacher_before, strict=True):
        for w, b in zip(t.model.weights, before, strict=True):
            np.testing.assert_array_equal(w.numpy(), b)


def test_teachers_are_not_part_of_the_weights_or_checkpoint(tmp_path):
    model = _method()
    teacher_vars = {id(v) for t in model.teachers for v in t.model.weights}
    assert not teacher_vars & {id(v) for v in model.weights}
    path = os.path.join(tmp_path, "ckpt.weights.h5")
    model.save_weights(path)
    stored = []
    with h5py.File(path) as f:
        f.visit(lambda name: stored.append(name))
    assert not any("teacher" in name for name in stored), stored
    own = sum(int(np.prod(v.shape)) for v in model.weights)
    own_student_heads = sum(int(np.prod(v.shape)) for v in model.student.weights) + sum(
        int(np.prod(v.shape)) for h in model.heads for v in h.weights
    )
    assert own == own_student_heads


def test_each_head_learns_only_from_its_teacher():
    model = _method()
    images = image_batch(16)
    targets = [t(images) for t in model.teachers]
    with tf.GradientTape(persistent=True) as tape:
        preds = model(images, training=True)
        per_teacher = [tf.reduce_mean(d) for d in model._distances(preds, targets, True)]
        halves = [p / 2 for p in per_teacher]
        total = tf.add_n(per_teacher) / 2
    for k, head in enumerate(model.heads):
        other = per_teacher[1 - k]
        assert all(g is None for g in tape.gradient(other, head.trainable_variables))
        g_total = tape.gradient(total, head.trainable_variables)
        g_own = tape.gradient(halves[k], head.trainable_variables)
        for a, b in zip(g_total, g_own, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    # The backbone learns from both teachers.
    for k in range(2):
        grads = tape.gradient(per_teacher[k], model.student.trainable_variables)
        assert sum(float(tf.reduce_sum(tf.abs(g))) for g in grads) > 0


def test_train_step_loss_is_mean_over_teachers_of_simreg_loss():
    model = _method()
    images = image_batch(16)
    expected = []
    preds = model(images, training=True)  # BN in training mode as in train_step
    for k, t in enumerate(model.teachers):
        expected.append(float(losses.simreg_loss(preds[k], t(images))))
    logs = model.train_step({"student": tf.constant(images)})
    np.testing.assert_allclose(float(logs["loss"]), np.mean(expected), rtol=1e-4)
    np.testing.assert_allclose(float(logs["loss_a"]), expected[0], rtol=1e-4)


def test_test_step_reports_mse_and_cosine_per_teacher():
    model = _method()
    logs = model.evaluate(dataset(image_batch(16), 8), verbose=0, return_dict=True)
    for name in ("a", "b"):
        assert 0.0 <= logs[f"mse_{name}"] <= 4.0
        assert -1.0 <= logs[f"cos_{name}"] <= 1.0
        np.testing.assert_allclose(logs[f"mse_{name}"], 2 - 2 * logs[f"cos_{name}"], rtol=1e-4)


@pytest.mark.parametrize("variant", ["regress", "regress_bn"])
def test_baselines_train(variant):
    model = _method(variant=variant, head="linear")
    ds = dataset(image_batch(32), 16).repeat()
    hist = model.fit(ds, epochs=20, steps_per_epoch=2, verbose=0).history["loss"]
    assert np.isfinite(hist).all() and hist[-1] < hist[0]
    if variant == "regress_bn":
        assert len(model.student_bns) == 2 and not model.student_bns[0].trainable_weights


def test_head_teacher_dimension_mismatch_is_reported():
    teacher = tiny_teacher("a", dim=5)
    student = tiny_student()
    wrong = heads.prediction_head(6, 9, "linear")
    with pytest.raises(ValueError, match="outputs 9 features but the teacher gives 5"):
        SimReg(student, [teacher], [wrong])


def test_two_replicas_match_one_device_on_the_same_global_batch():
    images = image_batch(16, seed=5)
    results = []
    for strategy in (
        tf.distribute.get_strategy(),
        tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    ):
        with strategy.scope():
            model = _method(seed=3, weight_decay=1e-3)
        hist = model.fit(dataset(images, 16), epochs=2, verbose=0).history["loss"]
        results.append((hist, [w.numpy() for w in model.student.weights]))
    (loss1, w1), (loss2, w2) = results
    np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
