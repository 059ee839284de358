import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.nets.heads import GradientReversal
from tests.helpers import two_cpu_strategy


def _x(shape=(3, 4), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0, -0.3, -1.0])
def test_gradient_is_alpha_times_upstream(alpha):
    layer = GradientReversal(alpha=0.7)
    layer.set_alpha(alpha)
    x = tf.constant(_x())
    w = _x(seed=1)  # upstream gradient of L = sum(w * y) w.r.t. y is w
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(w * y)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), alpha * w, rtol=1e-6, atol=0)


def test_gradient_through_nonlinear_chain_and_tf_function():
    layer = GradientReversal(alpha=-0.25)
    x = tf.constant(_x(seed=2))

    @tf.function
    def grad(inp):
        with tf.GradientTape() as tape:
            tape.watch(inp)
            y = tf.square(layer(tf.sin(inp)))
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, inp)

    y, g = grad(x)
    np.testing.assert_allclose(y.numpy(), np.sin(x.numpy()) ** 2, rtol=1e-6)
    # d/dx sin(x)^2 = 2 sin(x) cos(x), reversed and scaled by alpha at the layer.
    want = -0.25 * 2 * np.sin(x.numpy()) * np.cos(x.numpy())
    np.testing.assert_allclose(g.numpy(), want, rtol=1e-5, atol=1e-7)
    # Changing the variable takes effect without retracing.
    layer.set_alpha(tf.constant(2.0))
    _, g2 = grad(x)
    np.testing.assert_allclose(g2.numpy(), want * -8.0, rtol=1e-5, atol=1e-6)
    assert grad.experimental_get_tracing_count() == 1


def test_functional_model_reverses_gradient_of_layers_before_it():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, name="before")(inputs)
    grl = GradientReversal(alpha=-1.0, name="grl")
    out = keras.layers.Dense(2, name="after")(grl(h))
    model = keras.Model(inputs, out)
    plain = keras.Model(inputs, model.get_layer("after")(h))  # same weights, no GRL
    x = tf.constant(_x((5, 4), seed=3))
    np.testing.assert_allclose(model(x).numpy(), plain(x).numpy(), rtol=1e-6)

    def grads(m):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(m(x)))
        variables = m.trainable_variables
        gradients = tape.gradient(loss, variables)
        return {v.path: g for v, g in zip(variables, gradients, strict=True)}

    g, gp = grads(model), grads(plain)
    assert set(g) == set(gp) and len(g) == 4
    for path in g:
        sign = -1.0 if path.startswith("before") else 1.0
        np.testing.assert_allclose(g[path].numpy(), sign * gp[path].numpy(), rtol=1e-5)


def test_alpha_variable_is_non_trainable_saved_and_serialisable(tmp_path):
    layer = GradientReversal(alpha=0.0, name="grl")
    assert len(layer.non_trainable_weights) == 1 and not layer.trainable_weights
    assert layer.non_trainable_weights[0] is layer.alpha
    assert layer.alpha.dtype == "float32"
    layer.set_alpha(-0.6)
    assert float(layer.alpha.numpy()) == pytest.approx(-0.6)

    inputs = keras.Input((2,))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    grl = restored.get_layer("grl")
    assert isinstance(grl, GradientReversal)
    assert float(grl.alpha.numpy()) == pytest.approx(-0.6)  # current value, via the weights
    assert grl.get_config()["alpha"] == 0.0  # config keeps the initial value


def test_mixed_precision_gradient_keeps_input_dtype():
    layer = GradientReversal(alpha=-0.5, dtype="mixed_float16")
    x = tf.constant(_x(), tf.float16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32))
    g = tape.gradient(loss, x)
    assert y.dtype == tf.float16 and g.dtype == tf.float16 and layer.alpha.dtype == "float32"
    np.testing.assert_allclose(g.numpy(), np.full((3, 4), -0.5))


def test_set_alpha_under_mirrored_strategy():
    strategy = two_cpu_strategy()
    with strategy.scope():
        layer = GradientReversal(alpha=0.0)
    layer.set_alpha(-0.4)  # cross-replica context, as a callback does

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        g = tape.gradient(loss, x)
        layer.set_alpha(-0.9)  # replica context, as a train_step does
        return g

    out = strategy.run(step, args=(tf.constant(_x((2, 2))),))
    for g in strategy.experimental_local_results(out):
        np.testing.assert_allclose(g.numpy(), np.full((2, 2), -0.4), rtol=1e-6)
    for value in strategy.experimental_local_results(layer.alpha.value):
        assert float(value.numpy()) == pytest.approx(-0.9)
