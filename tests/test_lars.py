import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.optim.optimizers import LARS
from kd_keras.optim.schedules import WarmupCosine
from tests.helpers import two_cpu_strategy

HP = dict(momentum=0.9, weight_decay=0.05, trust_coefficient=0.02, eps=1e-8)


def _np_larc_sgd(params, grad_steps, lr, excluded, momentum, weight_decay, trust_coefficient, eps):
    """apex LARC(clip=False).step() then torch SGD(momentum, weight_decay=0).step(), in float64."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    bufs = {}
    for grads in grad_steps:
        for name, p in params.items():
            d = grads[name].astype(np.float64).copy()
            if name not in excluded:
                param_norm = np.linalg.norm(p)
                grad_norm = np.linalg.norm(d)
                if param_norm != 0 and grad_norm != 0:
                    adaptive_lr = (
                        trust_coefficient
                        * param_norm
                        / (grad_norm + param_norm * weight_decay + eps)
                    )
                    d += weight_decay * p
                    d *= adaptive_lr
            bufs[name] = d if name not in bufs else momentum * bufs[name] + d
            params[name] = p - lr * bufs[name]
    return params


def _tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="batch_normalization")(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x))


def _variables(model):
    wanted = ("dense/kernel", "dense/bias", "batch_normalization/gamma")
    return [v for v in model.trainable_variables if v.path in wanted]


def _grad_steps(variables, steps=4, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        grads = {v.path: rng.normal(size=v.shape).astype(np.float32) for v in variables}
        if step == 2:
            grads["dense/kernel"][:] = 0.0  # zero gradient: apex adds no weight decay either
        out.append(grads)
    return out


@pytest.mark.parametrize(
    "exclude,excluded",
    [
        (None, set()),
        (["bias", "batch_normalization"], {"dense/bias", "batch_normalization/gamma"}),
        (lambda v: v.name == "kernel", {"dense/kernel"}),
    ],
)
@pytest.mark.parametrize("graph", [False, True])
def test_lars_matches_numpy_larc_reference(exclude, excluded, graph):
    model = _tiny_model()
    variables = _variables(model)
    assert len(variables) == 3
    initial = {v.path: v.numpy() for v in variables}
    # The bias starts at zero: its first step takes the apex "norm is 0" branch.
    assert not initial["dense/bias"].any()
    steps = _grad_steps(variables)
    opt = LARS(learning_rate=0.5, exclude_from_adaptation=exclude, **HP)

    def apply(grads):
        opt.apply_gradients(zip(grads, variables, strict=True))

    apply_fn = tf.function(apply) if graph else apply
    for grads in steps:
        apply_fn([tf.constant(grads[v.path]) for v in variables])

    want = _np_larc_sgd(initial, steps, 0.5, excluded, **HP)
    for v in variables:
        np.testing.assert_allclose(v.numpy(), want[v.path], rtol=2e-5, atol=1e-7)
    assert [opt.is_excluded(v) for v in variables] == [v.path in excluded for v in variables]
    # The reference with the wrong exclusion differs measurably: the test sees the ratio.
    other = _np_larc_sgd(initial, steps, 0.5, {"dense/kernel", "dense/bias"} - excluded, **HP)
    assert max(np.abs(other[p] - want[p]).max() for p in want) > 1e-3


def test_lars_zero_weight_and_zero_gradient_are_finite():
    w = keras.Variable(np.zeros((3, 2), np.float32), name="w")
    u = keras.Variable(np.ones((2,), np.float32), name="u")
    opt = LARS(learning_rate=0.1, **HP)
    opt.apply_gradients([(tf.zeros((3, 2)), w), (tf.zeros((2,)), u)])
    # Both norms zero / gradient zero: d = g = 0, so nothing moves (no weight decay).
    np.testing.assert_array_equal(w.numpy(), 0.0)
    np.testing.assert_array_equal(u.numpy(), 1.0)
    g = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]], np.float32)
    opt.apply_gradients([(tf.constant(g), w), (tf.zeros((2,)), u)])
    # Zero weights: ratio 1, plain SGD step on the raw gradient.
    np.testing.assert_allclose(w.numpy(), -0.1 * g, rtol=1e-6)
    assert all(np.isfinite(v.numpy()).all() for v in opt.variables)


class _Regressor(keras.Model):
    """Dense regressor whose loss is divided by the replica count (Keras sums replica grads)."""

    def __init__(self):
        super().__init__(name="regressor")
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x) - y))
            scaled = loss / replicas
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


def test_lars_under_mirrored_strategy_equals_one_device():
    x, y = _fit_data()
    results = []
    for strategy in (
        tf.distribute.get_strategy(),
        two_cpu_strategy(),
    ):
        with strategy.scope():
            keras.utils.set_random_seed(5)
            model = _Regressor()
            model(np.zeros((1, 3), np.float32))  # creates the weights
            model.compile(optimizer=LARS(learning_rate=0.5, **HP))
        initial = [v.numpy() for v in model.trainable_variables]
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        model.fit(ds, epochs=2, verbose=0)
        results.append([v.numpy() for v in model.trainable_variables])
    assert min(np.abs(a - b).max() for a, b in zip(results[0], initial, strict=True)) > 1e-4
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _fit_data():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype(np.float32)
    return x, y


def _compiled(lr):
    model = _tiny_model()
    opt = LARS(learning_rate=lr, exclude_from_adaptation=["bias", "batch_normalization"], **HP)
    model.compile(optimizer=opt, loss="mse")
    return model


def test_lars_in_model_fit_with_schedule_decreases_loss():
    x, y = _fit_data()
    model = _compiled(WarmupCosine(1.0, total_steps=80, final_lr=0.01, warmup_steps=8))
    before = model.evaluate(x, y, verbose=0)
    hist = model.fit(x, y, batch_size=16, epochs=20, verbose=0, shuffle=False)
    assert np.isfinite(hist.history["loss"]).all()
    assert model.evaluate(x, y, verbose=0) < 0.5 * before
    assert int(model.optimizer.iterations.numpy()) == 80
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_lars_get_config_round_trip():
    opt = LARS(
        learning_rate=WarmupCosine(0.6, 100, final_lr=0.0006),
        exclude_from_adaptation=("bias", "bn"),
        **HP,
    )
    config = opt.get_config()
    assert config["weight_decay"] == 0.05 and config["trust_coefficient"] == 0.02
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(clone, LARS)
    assert clone.get_config() == config
    assert clone.exclude_from_adaptation == ["bias", "bn"]
    assert float(clone.learning_rate) == pytest.approx(0.6)
    # Keras' decoupled weight decay stays off: only the coupled LARC one is applied.
    assert clone.weight_decay is None
    for bad in (dict(momentum=1.0), dict(trust_coefficient=0.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LARS(**bad)
    with pytest.raises(ValueError, match="exclude_from_adaptation"):
        LARS(exclude_from_adaptation=3)


def test_lars_state_survives_save_and_load_weights(tmp_path):
    x, y = _fit_data()
    model = _compiled(0.5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    momentums = [m.numpy() for m in model.optimizer.momentums]
    assert any(np.abs(m).max() > 0 for m in momentums)
    model.save_weights(tmp_path / "ckpt.weights.h5")

    restored = _compiled(0.5)
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(tmp_path / "ckpt.weights.h5")
    assert int(restored.optimizer.iterations.numpy()) == 4
    for a, b in zip(restored.optimizer.momentums, momentums, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    # Continuing from the restored state equals continuing the original run.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    restored.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(restored.trainable_variables, model.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
