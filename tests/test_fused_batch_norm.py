"""fused_batch_norm.BatchNorm against Keras' own BatchNormalization (the independent reference)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.nets.fused_batch_norm import BatchNorm

SHAPES = [(6, 5, 4, 8), (12, 16)]


def _pair(shape, seed=0, **kwargs):
    """(Keras BN, fused BN) built for `shape` with the same random gamma, beta, moving stats."""
    rng = np.random.default_rng(seed)
    channels = shape[kwargs.get("axis", -1)]
    layers = []
    for cls in (keras.layers.BatchNormalization, BatchNorm):
        layer = cls(momentum=0.9, epsilon=1e-5, **kwargs)
        layer.build(shape)
        layers.append(layer)
    values = {
        "gamma": rng.normal(1.0, 0.3, channels),
        "beta": rng.normal(0.0, 0.3, channels),
        "moving_mean": rng.normal(0.0, 1.0, channels),
        "moving_variance": rng.uniform(0.5, 2.0, channels),
    }
    for layer in layers:
        for name, value in values.items():
            if getattr(layer, name, None) is not None:
                getattr(layer, name).assign(value.astype("float32"))
    return layers


def _inputs(shape, seed=1):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(2.0, 3.0, shape).astype("float32"))
    upstream = tf.constant(rng.normal(size=shape).astype("float32"))
    return x, upstream


def _train_step(layer, x, upstream):
    """Output, d(sum(y * upstream))/d(x, gamma, beta) and the updated moving statistics."""
    weights = [w for w in (layer.gamma, layer.beta) if w is not None]
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * upstream)
    grads = tape.gradient(loss, [x, *weights])
    return [y, *grads, layer.moving_mean, layer.moving_variance]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_training_step_matches_keras(shape, affine):
    reference, fused = _pair(shape, center=affine, scale=affine)
    x, upstream = _inputs(shape)
    for _ in range(2):  # the second step starts from updated moving statistics
        expected = _train_step(reference, x, upstream)
        got = _train_step(fused, x, upstream)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_inference_matches_keras_and_numpy(shape):
    reference, fused = _pair(shape)
    x, _ = _inputs(shape)
    y = np.asarray(fused(x, training=False))
    np.testing.assert_allclose(y, np.asarray(reference(x, training=False)), rtol=1e-5, atol=1e-5)
    mean, var = np.asarray(fused.moving_mean), np.asarray(fused.moving_variance)
    numpy = (np.asarray(x) - mean) / np.sqrt(var + 1e-5) * np.asarray(fused.gamma) + np.asarray(
        fused.beta
    )
    np.testing.assert_allclose(y, numpy, rtol=1e-5, atol=1e-5)


def test_moving_variance_is_the_biased_batch_variance():
    # The fused kernel returns the Bessel-corrected variance; Keras averages the biased one.
    shape = (4, 3, 3, 5)
    _, fused = _pair(shape)
    fused.moving_mean.assign(np.zeros(5, "float32"))
    fused.moving_variance.assign(np.zeros(5, "float32"))
    fused.momentum = 0.0  # the moving statistics become the batch's
    x, _ = _inputs(shape)
    fused(x, training=True)
    flat = np.asarray(x).reshape(-1, 5)
    np.testing.assert_allclose(np.asarray(fused.moving_mean), flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fused.moving_variance), flat.var(0), rtol=1e-5)


def test_frozen_layer_uses_moving_statistics_and_does_not_update_them():
    shape = SHAPES[0]
    reference, fused = _pair(shape)
    fused.trainable = False
    x, _ = _inputs(shape)
    before = np.asarray(fused.moving_mean).copy()
    y = fused(x, training=True)
    np.testing.assert_allclose(np.asarray(fused.moving_mean), before)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(reference(x, training=False)), rtol=1e-5, atol=1e-5
    )


def _op_types(fn, x):
    graph = tf.function(fn).get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("training", [True, False])
def test_graph_uses_the_fused_kernel(training):
    _, fused = _pair(SHAPES[0])
    x, _ = _inputs(SHAPES[0])
    ops = _op_types(lambda t: fused(t, training=training), x)
    assert "FusedBatchNormV3" in ops
    assert "Rsqrt" not in ops  # none of the generic ops of Keras' own path


@pytest.mark.parametrize(
    "kwargs, shape",
    [({"axis": 1}, (6, 4, 5, 5)), ({"synchronized": True}, (6, 5, 4, 8)), ({}, (4, 3, 6))],
)
def test_what_the_kernel_cannot_express_runs_keras_own_path(kwargs, shape):
    reference, fused = _pair(shape, **kwargs)
    x, upstream = _inputs(shape)
    assert "FusedBatchNormV3" not in _op_types(lambda t: fused(t, training=True), x)
    pairs = zip(_train_step(reference, x, upstream), _train_step(fused, x, upstream), strict=True)
    for e, g in pairs:
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_xla_matches_the_graph_path():
    shape = SHAPES[0]
    _, plain = _pair(shape)
    _, compiled = _pair(shape)
    x, upstream = _inputs(shape)
    expected = _train_step(plain, x, upstream)
    got = tf.function(lambda t, u: _train_step(compiled, t, u), jit_compile=True)(x, upstream)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=2e-5)


def test_mixed_bfloat16_keeps_float32_statistics_and_returns_the_compute_dtype():
    shape = SHAPES[0]
    reference, fused = _pair(shape, dtype="mixed_bfloat16")
    x, _ = _inputs(shape)
    x16 = tf.cast(x, tf.bfloat16)
    y = fused(x16, training=True)
    assert y.dtype == tf.bfloat16
    assert fused.moving_mean.dtype == "float32"
    np.testing.assert_allclose(
        np.asarray(tf.cast(y, tf.float32)),
        np.asarray(tf.cast(reference(x16, training=True), tf.float32)),
        atol=3e-2,
    )
    np.testing.assert_allclose(
        np.asarray(fused.moving_mean), np.asarray(reference.moving_mean), rtol=1e-5
    )


def test_saved_model_round_trip(tmp_path):
    inputs = keras.Input((4, 4, 3))
    outputs = BatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    x, _ = _inputs((2, 4, 4, 3))
    model.get_layer("bn").moving_mean.assign([0.5, -1.0, 2.0])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("bn"), BatchNorm)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)
