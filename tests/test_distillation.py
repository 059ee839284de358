"""kd_keras.distillation.SimRegLoss inside keras.distillation.Distiller against kd_keras.SimReg."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kd_keras
from kd_keras import losses
from kd_keras.distillation import SimRegLoss
from kd_keras.nets import heads
from tests.helpers import image_batch, tiny_student


def _teacher(dim=5, size=8):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(dim)(x), name="teacher")


def _student_and_head(dim=5):
    keras.utils.set_random_seed(2)
    student = tiny_student()
    head = heads.prediction_head(6, dim, "mlp2", name="head_teacher")
    return student, head


def test_loss_is_simreg_loss_in_keras_order():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    expected = np.mean(
        np.sum(
            (
                s / np.linalg.norm(s, axis=1, keepdims=True)
                - t / np.linalg.norm(t, axis=1, keepdims=True)
            )
            ** 2,
            axis=1,
        )
    )
    got = float(SimRegLoss().compute_loss(tf.constant(t), tf.constant(s)))
    assert got == pytest.approx(expected, rel=1e-5)
    assert float(losses.simreg_loss(tf.constant(s), tf.constant(t))) == pytest.approx(got)


def test_four_d_teacher_output_is_refused():
    with pytest.raises(ValueError, match="pool"):
        SimRegLoss().validate_outputs(tf.zeros([2, 3, 3, 5]), tf.zeros([2, 5]))


def test_distiller_matches_kd_keras_simreg():
    """Same seeds, batches and optimizer: the same losses and student weights to 1e-5."""
    images = image_batch(n=16, size=8, seed=3)
    teacher = _teacher()
    student, head = _student_and_head()
    initial = [v.numpy() for v in [*student.weights, *head.weights]]

    ours = kd_keras.SimReg(
        student=student, teacher=teacher, head=head, views=None, weight_decay=0.0
    )
    ours.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    ours_history = ours.fit(images, batch_size=8, shuffle=False, epochs=3, verbose=0)

    student2, head2 = _student_and_head()
    for v, value in zip([*student2.weights, *head2.weights], initial, strict=True):
        v.assign(value)
    inputs = keras.Input((8, 8, 3))
    both = keras.Model(inputs, head2(student2(inputs)))
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=both, distillation_losses=SimRegLoss(), student_loss_weight=0.0
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    theirs_history = distiller.fit(images, batch_size=8, shuffle=False, epochs=3, verbose=0)

    ours_loss = np.array(ours_history.history["loss"])
    theirs_loss = np.array(theirs_history.history["loss"])
    np.testing.assert_allclose(ours_loss, theirs_loss, atol=1e-5)
    assert ours_loss[-1] < ours_loss[0]  # it trains, so the comparison is not of constants
    for a, b in zip(student.weights, student2.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
