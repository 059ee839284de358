"""Method.gradients' coupled weight decay against autodiff of the L2 penalty in the loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.methods.base import Method
from kd_keras.optim import optimizers

WD = 0.05


class _Toy(Method):
    """y = dense(x); `unused` is a trainable weight the loss never reaches."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)
        self.unused = self.add_weight(shape=(2,), initializer="ones", name="unused")

    def call(self, x):
        return self.dense(x)


def _toy(optimizer):
    keras.utils.set_random_seed(0)
    model = _Toy(weight_decay=WD)
    model(tf.zeros((1, 4)))
    model.compile(optimizer=optimizer)
    model.optimizer.build(model.trainable_variables)
    return model


def _data():
    rng = np.random.default_rng(1)
    return tf.constant(rng.normal(size=(5, 4)).astype("float32"))


def _loss(model, x):
    return tf.reduce_mean(tf.square(model(x) - 1.0))


def _reference(model, x):
    """The penalty formulation: gradient of loss + 0.5 * wd * sum(v^2), unscaled."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        penalty = tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
        total = _loss(model, x) + 0.5 * WD * penalty
    return tape.gradient(total, variables)


def _method_gradients(model, x):
    """(Method.gradients, autodiff of the penalty) for the model's trainable variables."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        scaled = model.scale_loss(_loss(model, x), variables)
    return model.gradients(tape, scaled, variables), _reference(model, x)


def test_gradients_equal_autodiff_of_the_penalty():
    model = _toy(optimizers.SGD(0.1, momentum=0.9))
    got, expected = _method_gradients(model, _data())
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-7)
    # The weight the loss does not reach gets the decay alone: wd * v.
    unused = [i for i, v in enumerate(model.trainable_variables) if v is model.unused]
    assert unused
    np.testing.assert_allclose(np.asarray(got[unused[0]]), WD * np.ones(2), rtol=1e-6)


def test_gradients_follow_the_loss_scale_under_mixed_float16():
    inner = optimizers.SGD(0.1, momentum=0.9)
    model = _toy(keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**10))
    got, expected = _method_gradients(model, _data())
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g) / 2.0**10, np.asarray(e), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, WD])
def test_apply_loss_takes_one_sgd_step_with_the_decay(weight_decay):
    model = _toy(keras.optimizers.SGD(0.1))
    model.weight_decay = weight_decay
    x = _data()
    before = [np.asarray(v).copy() for v in model.trainable_variables]
    expected = _reference(model, x) if weight_decay else None
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        scaled = model.scale_loss(_loss(model, x), variables)
    model.apply_loss(tape, scaled, variables)
    after = [np.asarray(v) for v in variables]
    if weight_decay:
        for b, a, e in zip(before, after, expected, strict=True):
            np.testing.assert_allclose(a, b - 0.1 * np.asarray(e), rtol=1e-6, atol=1e-7)
    else:
        i = [i for i, v in enumerate(variables) if v is model.unused][0]
        np.testing.assert_array_equal(after[i], before[i])  # no decay, no gradient: unmoved
