"""optimizers.SGD(momentum_form="keras") (one fused kernel per variable) against
keras.optimizers.SGD, its reference (the torch form: tests/test_sgd_torch_form.py)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.optim import optimizers


def _gradients(steps, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(steps)]


def _run(cls, grads, initial, wrap=lambda f: f, **kwargs):
    """Weights and velocities after applying `grads` (a list of per-step gradient lists)."""
    weights = [keras.Variable(w) for w in initial]
    opt = cls(**kwargs)
    opt.build(weights)

    @wrap
    def step(gs):
        opt.apply_gradients(zip(gs, weights, strict=True))

    for gs in grads:
        step([tf.constant(g) for g in gs])
    return [np.asarray(w) for w in weights] + [np.asarray(m) for m in opt.momentums]


SHAPES = [(3, 3, 4, 8), (8,), (5, 7)]
INITIAL = [np.random.default_rng(9).normal(size=s).astype("float32") for s in SHAPES]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(
    "wrap",
    [lambda f: f, tf.function, lambda f: tf.function(f, jit_compile=True)],
    ids=["eager", "graph", "xla"],
)
def test_update_equals_keras_sgd(nesterov, wrap):
    grads = _gradients(4, SHAPES)
    kwargs = dict(learning_rate=0.1, momentum=0.9, nesterov=nesterov)
    expected = _run(keras.optimizers.SGD, grads, INITIAL, wrap, **kwargs)
    got = _run(optimizers.SGD, grads, INITIAL, wrap, momentum_form="keras", **kwargs)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got[0], INITIAL[0])


def test_update_equals_the_formula_in_numpy():
    grads = _gradients(3, SHAPES[:1])
    lr, momentum = 0.05, 0.8
    w, v = INITIAL[0].astype("float64"), np.zeros(SHAPES[0])
    for (g,) in grads:
        v = momentum * v - lr * g
        w = w + v
    got = _run(
        optimizers.SGD,
        grads,
        INITIAL[:1],
        learning_rate=lr,
        momentum=momentum,
        momentum_form="keras",
    )
    np.testing.assert_allclose(got[0], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], v, rtol=1e-5, atol=1e-6)


def _fit(optimizer_cls, strategy):
    """Weights and velocities of a small model after 3 fit steps under `strategy`."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(3)])
        model.compile(optimizer=optimizer_cls(0.1, momentum=0.9), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
    return [np.asarray(w) for w in model.weights] + [
        np.asarray(m) for m in model.optimizer.momentums
    ]


def test_update_under_mirrored_strategy_equals_keras_sgd():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    expected = _fit(keras.optimizers.SGD, strategy)
    got = _fit(
        functools.partial(optimizers.SGD, momentum_form="keras"),
        tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    )
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert np.abs(got[-1]).max() > 0  # the velocities moved


def test_learning_rate_schedule_and_sparse_gradients_follow_keras():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    table = keras.Variable(np.ones((6, 2), "float32"))
    opt = optimizers.SGD(schedule, momentum=0.9, momentum_form="keras")
    reference_table = keras.Variable(np.ones((6, 2), "float32"))
    reference = keras.optimizers.SGD(schedule, momentum=0.9)
    for _ in range(2):
        for var, o in ((table, opt), (reference_table, reference)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.gather(var, [1, 4]) ** 2)
            grad = tape.gradient(loss, var)
            assert isinstance(grad, tf.IndexedSlices)
            o.apply_gradients([(grad, var)])
    np.testing.assert_allclose(np.asarray(table), np.asarray(reference_table), rtol=1e-6)


def test_old_keras_sgd_checkpoints_load(tmp_path):
    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        return m

    old = model()
    old.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    old.fit(x, y, epochs=2, verbose=0)
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    new = model()
    new.compile(optimizer=optimizers.SGD(0.1, momentum=0.9), loss="mse")
    new.optimizer.build(new.trainable_variables)
    new.load_weights(path)
    assert int(new.optimizer.iterations.numpy()) == int(old.optimizer.iterations.numpy())
    for a, b in zip(old.optimizer.momentums, new.optimizer.momentums, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_make_optimizer_gives_the_fused_sgd_and_it_serialises():
    from kd_keras import config

    opt = optimizers.make_optimizer(config.OptimConfig(batch_size=32, epochs=2), 10)
    assert isinstance(opt, optimizers.SGD)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(clone, optimizers.SGD) and clone.momentum == opt.momentum
