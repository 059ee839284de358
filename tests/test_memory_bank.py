"""FeatureBank / IndexedMemory: FIFO order, wrap-around, read-before-write, replicas, saving."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.methods.memory_bank import FeatureBank, IndexedMemory
from tests.helpers import two_cpu_strategy


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batches(steps, batch, dim, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(steps)]


def _replay(initial, batches):
    """NumPy ring buffer: row (pointer + j) % K gets the j-th row of each batch."""
    bank, pointer = initial.copy(), 0
    history = []
    for x in batches:
        history.append(bank.copy())
        for row in _unit(x):
            bank[pointer % len(bank)] = row
            pointer += 1
    return bank, pointer % len(bank), history


@pytest.mark.parametrize("size,batch", [(12, 4), (10, 4)])
def test_push_matches_a_numpy_ring_buffer_over_several_steps(size, batch):
    keras.utils.set_random_seed(0)
    bank = FeatureBank(size, 3)
    bank.build()
    initial = bank.rows().numpy()
    batches = _batches(7, batch, 3)

    @tf.function
    def step(x):
        seen = bank.rows()  # read before the write, as the originals score first
        bank.push(x)
        return seen

    seen = [step(x).numpy() for x in batches]
    want, pointer, history = _replay(initial, batches)
    np.testing.assert_allclose(bank.rows().numpy(), want, rtol=1e-6)
    assert int(bank.pointer.numpy()) == pointer
    for got, expected in zip(seen, history, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_initialisations_follow_compress_and_seed():
    keras.utils.set_random_seed(1)
    uniform = FeatureBank(4000, 48, init="uniform")
    uniform.build()
    rows = uniform.rows().numpy()
    bound = 1 / math.sqrt(48 / 3)
    assert rows.min() >= -bound and rows.max() <= bound and rows.max() > 0.95 * bound
    # Unit squared norm in expectation, not normalised row by row.
    norms = np.sum(rows**2, axis=1)
    assert abs(norms.mean() - 1) < 0.01 and norms.std() > 0.05
    normal = FeatureBank(50, 8, init="normal")
    normal.build()
    np.testing.assert_allclose(np.linalg.norm(normal.rows().numpy(), axis=1), 1, rtol=1e-5)
    assert int(uniform.pointer.numpy()) == 0


def test_bank_size_validation_names_the_flag():
    with pytest.raises(ValueError, match="--queue_size must be a positive integer"):
        FeatureBank(0, 4, flag="--queue_size")
    with pytest.raises(ValueError, match="GiB"):
        FeatureBank(10**9, 2048)
    seed_queue = FeatureBank(10, 4, flag="--queue_size", multiple_of_batch=True)
    with pytest.raises(ValueError, match="--queue_size=10 must be a multiple of the global batch"):
        seed_queue.check_batch(4)
    bank = FeatureBank(10, 4)
    bank.check_batch(4)  # CompRess' modular index accepts any size >= batch
    with pytest.raises(ValueError, match="--bank_size=10 is smaller than the global batch"):
        bank.check_batch(16)


def test_save_and_load_weights_restores_bank_and_pointer(tmp_path):
    keras.utils.set_random_seed(2)

    def model():
        inputs = keras.Input((3,))
        m = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        m.bank = FeatureBank(8, 3, name="bank")
        m.bank.build()
        return m

    a = model()
    for x in _batches(3, 2, 3):
        a.bank.push(x)
    path = str(tmp_path / "m.weights.h5")
    a.save_weights(path)
    keras.utils.set_random_seed(99)
    b = model()
    assert not np.allclose(b.bank.rows().numpy(), a.bank.rows().numpy())
    b.load_weights(path)
    np.testing.assert_array_equal(b.bank.rows().numpy(), a.bank.rows().numpy())
    assert int(b.bank.pointer.numpy()) == int(a.bank.pointer.numpy()) == 6


def _run_pushes(strategy, batches, bank_factory):
    with strategy.scope():
        keras.utils.set_random_seed(3)
        bank = bank_factory()
        bank.build()
    global_batch = batches[0].shape[0]
    ds = tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).batch(global_batch)

    @tf.function
    def step(x):
        strategy.run(bank.push, args=(x,))

    for x in strategy.experimental_distribute_dataset(ds):
        step(x)
    return bank


def test_two_replicas_hold_the_same_bank_as_one_device():
    batches = _batches(5, 4, 3, seed=4)
    one = _run_pushes(tf.distribute.get_strategy(), batches, lambda: FeatureBank(6, 3))
    strategy = two_cpu_strategy()
    two = _run_pushes(strategy, batches, lambda: FeatureBank(6, 3))
    copies = strategy.experimental_local_results(two.bank.value)
    assert len(copies) == 2
    for copy in copies:
        np.testing.assert_allclose(copy.numpy(), one.rows().numpy(), rtol=1e-6)
    assert int(two.pointer.numpy()) == int(one.pointer.numpy()) == (5 * 4) % 6


def test_indexed_memory_moving_average_matches_numpy_and_replicas():
    rng = np.random.default_rng(5)
    feats = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
    indices = [np.array([0, 5, 2, 7]), np.array([1, 5, 3, 0]), np.array([6, 4, 2, 1])]

    def run(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(6)
            memory = IndexedMemory(8, 3)
            memory.build()
        initial = memory.gather(np.arange(8)).numpy()
        ds = tf.data.Dataset.from_tensor_slices(
            (np.concatenate(indices), np.concatenate(feats))
        ).batch(4)

        @tf.function
        def step(i, f):
            strategy.run(lambda i, f: memory.update(i, f, 0.5), args=(i, f))

        for i, f in strategy.experimental_distribute_dataset(ds):
            step(i, f)
        return initial, memory.gather(np.arange(8)).numpy()

    initial, one = run(tf.distribute.get_strategy())
    want = initial.copy()
    for idx, f in zip(indices, feats, strict=True):
        want[idx] = _unit(0.5 * want[idx] + 0.5 * _unit(f))
    np.testing.assert_allclose(one, want, rtol=1e-5)
    _, two = run(two_cpu_strategy())
    np.testing.assert_allclose(two, one, rtol=1e-6)
