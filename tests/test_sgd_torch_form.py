"""optimizers.SGD(momentum_form="torch") against torch.optim.SGD's saved trajectory
(tests/data/torch_sgd, written by scripts/make_torch_sgd_fixtures.py), and moving between
the two momentum forms (checkpoints, conversion, flags)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.optim import optimizers

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "torch_sgd", "sgd_trajectory.npz")
NUM_VARIABLES = 3


@pytest.fixture(scope="module")
def torch_run():
    return dict(np.load(FIXTURE))


class _Rates(keras.optimizers.schedules.LearningRateSchedule):
    """The fixture's per-step learning rates, indexed by the optimizer step."""

    def __init__(self, rates):
        self.rates = np.asarray(rates, np.float32)

    def __call__(self, step):
        return tf.gather(tf.constant(self.rates), tf.cast(step, tf.int32))


def _fma_decay(g, w, weight_decay):
    """torch's grad.add(param, alpha=wd): g + wd * w rounded once (a fused multiply-add)."""
    return (g.astype(np.float64) + np.float64(np.float32(weight_decay)) * w).astype(np.float32)


def _replay(run, name, wrap, nesterov):
    """Weights and buffers after each step of the fixture's gradients: two lists per step."""
    weights = [keras.Variable(run[f"initial_{i}"]) for i in range(NUM_VARIABLES)]
    opt = optimizers.SGD(_Rates(run["lrs"]), momentum=0.9, nesterov=nesterov)
    opt.build(weights)
    step = wrap(lambda grads: opt.apply_gradients(zip(grads, weights, strict=True)))
    decay = float(run[f"{name}_weight_decay"])
    trajectory = []
    for t in range(len(run["lrs"])):
        grads = [run[f"grads_{i}"][t] for i in range(NUM_VARIABLES)]
        if decay:
            grads = [
                _fma_decay(g, np.asarray(w), decay) for g, w in zip(grads, weights, strict=True)
            ]
        step([tf.constant(g) for g in grads])
        trajectory.append(
            ([np.asarray(w) for w in weights], [np.asarray(b) for b in opt.momentums])
        )
    return trajectory


@pytest.mark.parametrize("name,nesterov", [("plain", False), ("nesterov", True), ("wd", False)])
@pytest.mark.parametrize("wrap", [lambda f: f, tf.function], ids=["eager", "graph"])
def test_torch_form_is_bit_identical_to_torch_sgd(torch_run, name, nesterov, wrap):
    trajectory = _replay(torch_run, name, wrap, nesterov)
    for t, (weights, buffers) in enumerate(trajectory):
        for i in range(NUM_VARIABLES):
            np.testing.assert_array_equal(weights[i], torch_run[f"{name}_weights_{i}"][t])
            np.testing.assert_array_equal(buffers[i], torch_run[f"{name}_buffers_{i}"][t])
    assert not np.allclose(trajectory[-1][0][0], torch_run["initial_0"])


@pytest.mark.parametrize("nesterov", [False, True])
def test_torch_form_under_xla_is_within_float_rounding(torch_run, nesterov):
    # XLA contracts buf * m + g into one fused multiply-add (torch rounds the product first).
    name = "nesterov" if nesterov else "plain"
    trajectory = _replay(torch_run, name, lambda f: tf.function(f, jit_compile=True), nesterov)
    weights, _ = trajectory[-1]
    for i in range(NUM_VARIABLES):
        np.testing.assert_allclose(
            weights[i], torch_run[f"{name}_weights_{i}"][-1], rtol=1e-6, atol=2e-6
        )


def _apply(opt, grads, initial):
    weights = [keras.Variable(initial)]
    opt.build(weights)
    for g in grads:
        opt.apply_gradients([(tf.constant(g), weights[0])])
    return weights[0], opt


def test_forms_agree_at_a_constant_rate_and_differ_when_it_changes(torch_run):
    grads, initial = torch_run["grads_0"], torch_run["initial_0"]
    torch_w, torch_opt = _apply(optimizers.SGD(0.1, momentum=0.9), grads, initial)
    keras_w, keras_opt = _apply(
        optimizers.SGD(0.1, momentum=0.9, momentum_form="keras"), grads, initial
    )
    np.testing.assert_allclose(np.asarray(torch_w), np.asarray(keras_w), rtol=1e-5, atol=1e-6)
    # Keras' velocity is -lr * torch's buffer.
    np.testing.assert_allclose(
        np.asarray(keras_opt.momentums[0]),
        -0.1 * np.asarray(torch_opt.momentums[0]),
        rtol=1e-5,
        atol=1e-6,
    )
    rates = _Rates(torch_run["lrs"])
    torch_w, _ = _apply(optimizers.SGD(rates, momentum=0.9), grads, initial)
    keras_w, _ = _apply(optimizers.SGD(rates, momentum=0.9, momentum_form="keras"), grads, initial)
    assert np.abs(np.asarray(torch_w) - np.asarray(keras_w)).max() > 1e-3


def test_keras_form_state_converted_to_torch_continues_as_torch(torch_run):
    """At a constant rate the converted buffer makes the resumed run equal a torch-form run."""
    grads, initial = torch_run["grads_0"], torch_run["initial_0"]
    reference, _ = _apply(optimizers.SGD(0.05, momentum=0.9), grads, initial)
    half = len(grads) // 2
    w, keras_opt = _apply(
        optimizers.SGD(0.05, momentum=0.9, momentum_form="keras"), grads[:half], initial
    )
    resumed = optimizers.SGD(0.05, momentum=0.9)
    resumed.build([w])
    resumed.momentums[0].assign(keras_opt.momentums[0])
    optimizers.convert_momentum(resumed, "keras", half)
    for g in grads[half:]:
        resumed.apply_gradients([(tf.constant(g), w)])
    np.testing.assert_allclose(np.asarray(w), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_conversion_back_to_keras_and_a_zero_rate_refusal():
    w = keras.Variable(np.ones(3, "float32"))
    opt = optimizers.SGD(0.2, momentum=0.9, momentum_form="keras")
    opt.build([w])
    opt.momentums[0].assign(np.full(3, 5.0, "float32"))
    optimizers.convert_momentum(opt, "torch", 4)
    np.testing.assert_allclose(np.asarray(opt.momentums[0]), -1.0 * np.ones(3))
    zero = optimizers.SGD(keras.optimizers.schedules.PolynomialDecay(0.1, 2, 0.0), momentum=0.9)
    zero.build([w])
    with pytest.raises(ValueError, match="--momentum_form=torch cannot resume"):
        optimizers.convert_momentum(zero, "keras", 3)  # the rate of step 2 is 0


def test_a_keras_form_checkpoint_loads_into_the_torch_form(tmp_path):
    def model(opt):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.compile(optimizer=opt, loss="mse")
        return m

    old = model(optimizers.SGD(0.1, momentum=0.9, momentum_form="keras"))
    old.fit(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"), epochs=2, verbose=0)
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    new = model(optimizers.SGD(0.1, momentum=0.9))
    new.optimizer.build(new.trainable_variables)
    new.load_weights(path)
    for a, b in zip(old.optimizer.momentums, new.optimizer.momentums, strict=True):
        # Same slot variables: Keras' names ("SGD/<model>_<layer>_<weight>_momentum") and shapes.
        assert a.path.endswith("_momentum") and b.path.endswith("_momentum")
        assert a.path.split("_")[-2:] == b.path.split("_")[-2:] and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sparse_gradients_are_densified_under_the_torch_form():
    dense_table = keras.Variable(np.ones((4, 2), "float32"))
    sparse_table = keras.Variable(np.ones((4, 2), "float32"))
    dense_opt, sparse_opt = optimizers.SGD(0.1, momentum=0.9), optimizers.SGD(0.1, momentum=0.9)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(sparse_table, [1, 3]) ** 2)
        grad = tape.gradient(loss, sparse_table)
        assert isinstance(grad, tf.IndexedSlices)
        sparse_opt.apply_gradients([(grad, sparse_table)])
        dense_opt.apply_gradients([(tf.convert_to_tensor(grad), dense_table)])
    np.testing.assert_array_equal(np.asarray(sparse_table), np.asarray(dense_table))
    assert np.asarray(sparse_table)[1, 0] < 1.0


def test_make_optimizer_follows_momentum_form_and_it_serialises():
    from kd_keras import config

    for form in ("torch", "keras"):
        cfg = config.OptimConfig(batch_size=32, epochs=2, momentum_form=form)
        opt = optimizers.make_optimizer(cfg, 10)
        clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert opt.momentum_form == clone.momentum_form == form
    assert config.OptimConfig().momentum_form == "torch"
    with pytest.raises(ValueError, match="--momentum_form"):
        optimizers.SGD(0.1, momentum=0.9, momentum_form="jax")


def test_a_resumed_run_converts_the_momentum_of_an_older_keras_form_run():
    import types

    from kd_keras.training import run

    # A parsed config.json (prepare_run reads it once, for the differences and for this).
    old = {"optim": {"optimizer": "sgd", "momentum": 0.9}}  # before --momentum_form
    assert run._momentum_form_of(old) == "keras"
    assert run._momentum_form_of({"optim": {"optimizer": "lars"}}) is None
    assert run._momentum_form_of({"optim": {"momentum_form": "torch"}}) == "torch"
    assert run._momentum_form_of({"optim": "not a section"}) is None

    w = keras.Variable(np.ones(2, "float32"))
    opt = optimizers.SGD(0.5, momentum=0.9)
    opt.build([w])
    opt.momentums[0].assign([-1.0, 2.0])  # a Keras velocity at lr 0.5
    r = types.SimpleNamespace(
        method=types.SimpleNamespace(optimizer=opt), done_steps=3, saved_momentum_form="keras"
    )
    run._convert_restored_momentum(r)
    np.testing.assert_allclose(np.asarray(opt.momentums[0]), [2.0, -4.0])
    run._convert_restored_momentum(
        types.SimpleNamespace(**{**vars(r), "saved_momentum_form": "torch"})
    )
    np.testing.assert_allclose(np.asarray(opt.momentums[0]), [2.0, -4.0])  # same form: untouched
