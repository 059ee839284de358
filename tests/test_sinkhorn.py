import numpy as np
import pytest
import tensorflow as tf

from kd_keras import losses
from tests.helpers import np_sinkhorn, two_cpu_strategy


def _scores(n=12, k=5, seed=0, scale=1.0):
    # Cosine-like scores: products of unit vectors, as SwAV's prototypes give.
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    c = rng.normal(size=(k, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return (scale * z @ c.T).astype(np.float32)


@pytest.mark.parametrize("epsilon,num_iters", [(0.05, 3), (0.1, 1), (0.5, 7)])
def test_sinkhorn_matches_numpy_reference(epsilon, num_iters):
    s = _scores(seed=num_iters)
    got = losses.sinkhorn(s, epsilon=epsilon, num_iters=num_iters)
    assert got.dtype == tf.float32 and got.shape == (12, 5)
    np.testing.assert_allclose(got.numpy(), np_sinkhorn(s, epsilon, num_iters), atol=2e-6)


def test_sinkhorn_marginals():
    s = _scores(n=20, k=4, seed=3)
    n, k = s.shape
    codes = losses.sinkhorn(s, epsilon=0.3, num_iters=3).numpy()
    # The last step normalises samples: every code sums to exactly 1, entries are positive.
    np.testing.assert_allclose(codes.sum(axis=1), np.ones(n), atol=1e-5)
    assert (codes > 0).all()
    # The prototype marginal is only approximately N/K after 3 iterations...
    proto_err_3 = np.abs(codes.sum(axis=0) - n / k).max()
    assert proto_err_3 > 1e-4
    # ... and converges to it with more iterations.
    many = losses.sinkhorn(s, epsilon=0.3, num_iters=100).numpy()
    np.testing.assert_allclose(many.sum(axis=0), np.full(k, n / k), rtol=1e-4)
    np.testing.assert_allclose(many.sum(axis=1), np.ones(n), atol=1e-5)
    one = losses.sinkhorn(s, epsilon=0.3, num_iters=1).numpy()
    assert (
        np.abs(many.sum(axis=0) - n / k).max() < proto_err_3 < np.abs(one.sum(axis=0) - n / k).max()
    )


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_sinkhorn_low_precision_input_gives_float32(dtype):
    s = _scores(seed=5)
    low = tf.cast(s, dtype)
    got = losses.sinkhorn(low)
    assert got.dtype == tf.float32
    # Same codes as the float32 call on the rounded scores; close to the unrounded ones.
    np.testing.assert_allclose(
        got.numpy(), losses.sinkhorn(tf.cast(low, tf.float32)).numpy(), atol=1e-6
    )
    tol = 0.05 if dtype == tf.float16 else 0.3  # bf16 rounding / 0.05 moves logits a lot
    np.testing.assert_allclose(got.numpy(), losses.sinkhorn(s).numpy(), atol=tol)


def test_sinkhorn_small_epsilon_large_scores_is_finite():
    s = _scores(n=16, k=6, seed=6, scale=50.0)
    codes = losses.sinkhorn(s, epsilon=0.01, num_iters=3).numpy()
    assert np.isfinite(codes).all()
    np.testing.assert_allclose(codes.sum(axis=1), np.ones(16), atol=1e-5)
    # SwAV's exp-domain version underflows here (0/0), which is why the log domain is used.
    with np.errstate(all="ignore"):
        assert not np.isfinite(np_sinkhorn(s, 0.01, 3)).all()


def test_sinkhorn_no_gradient_and_bad_arguments():
    s = tf.Variable(_scores(seed=7))
    with tf.GradientTape() as tape:
        codes = losses.sinkhorn(s)
        total = tf.reduce_sum(codes * s)
    # Only the explicit `* s` term contributes: d/ds = codes.
    np.testing.assert_allclose(tape.gradient(total, s).numpy(), codes.numpy(), atol=1e-7)
    with pytest.raises(ValueError, match="epsilon"):
        losses.sinkhorn(s, epsilon=0.0)
    with pytest.raises(ValueError, match="num_iters"):
        losses.sinkhorn(s, num_iters=0)
    with pytest.raises(ValueError, match="scores"):
        losses.sinkhorn(tf.zeros([2, 3, 4]))


@pytest.mark.parametrize("use_tf_function,split", [(True, 6), (False, 6), (True, 5)])
def test_sinkhorn_two_replicas_equal_one_device(use_tf_function, split):
    s = _scores(n=12, k=5, seed=8, scale=3.0)  # scale: replicas see different maxima
    strategy = two_cpu_strategy()
    # Replica 0 gets rows [0, split), replica 1 rows [split, 12) (unequal when split != 6).
    parts = strategy.experimental_distribute_values_from_function(
        lambda ctx: s[:split] if ctx.replica_id_in_sync_group == 0 else s[split:]
    )

    def replica_fn(x):
        assert tf.distribute.get_replica_context().num_replicas_in_sync == 2
        return losses.sinkhorn(x, epsilon=0.05, num_iters=3)

    fn = tf.function(replica_fn) if use_tf_function else replica_fn
    out = strategy.run(fn, args=(parts,))
    local = [t.numpy() for t in strategy.experimental_local_results(out)]
    assert [len(t) for t in local] == [split, 12 - split]
    got = np.concatenate(local)
    want = losses.sinkhorn(s, epsilon=0.05, num_iters=3).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, np_sinkhorn(s, 0.05, 3), atol=2e-6)
    # Per-replica (local-only) normalisation would differ: the all-reduce matters.
    local_only = np.concatenate(
        [losses.sinkhorn(s[:split]).numpy(), losses.sinkhorn(s[split:]).numpy()]
    )
    assert np.abs(local_only - want).max() > 1e-3


def test_sinkhorn_row_mask_equals_dropping_the_rows():
    s = _scores(n=14, k=6, seed=3)
    mask = np.array([False, True, False, False, True] + [True] * 9)
    got = losses.sinkhorn(s, 0.05, 3, row_mask=mask).numpy()
    np.testing.assert_allclose(got[mask], np_sinkhorn(s[mask], 0.05, 3), atol=2e-6)
    np.testing.assert_array_equal(got[~mask], 0.0)
    assert np.all(np.isfinite(got))


def test_sinkhorn_row_mask_two_replicas_equal_one_device():
    s = _scores(n=16, k=5, seed=4)
    mask = np.arange(16) % 3 != 0
    expected = np_sinkhorn(s[mask], 0.05, 3)
    strategy = two_cpu_strategy()

    @tf.function
    def step(x, m):
        return losses.sinkhorn(x, 0.05, 3, row_mask=m)

    halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            s[8 * ctx.replica_id_in_sync_group :][:8],
            mask[8 * ctx.replica_id_in_sync_group :][:8],
        )
    )
    out = strategy.run(step, args=halves)
    got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
    np.testing.assert_allclose(got[mask], expected, atol=2e-6)
