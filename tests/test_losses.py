import numpy as np
import pytest
import tensorflow as tf

from kd_keras import losses


def _np_simreg(p, t):
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    return np.mean(np.sum((pn - tn) ** 2, axis=1))


def test_simreg_loss_matches_numpy_and_two_minus_two_cos():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(16, 12)).astype(np.float32)
    t = rng.normal(size=(16, 12)).astype(np.float32) * 5.0
    got = float(losses.simreg_loss(p, t))
    np.testing.assert_allclose(got, _np_simreg(p, t), rtol=1e-5)
    cos = np.sum(p * t, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)
    np.testing.assert_allclose(got, np.mean(2 - 2 * cos), rtol=1e-5)


def test_simreg_loss_is_scale_invariant_and_zero_for_parallel_vectors():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(8, 5)).astype(np.float32)
    assert float(losses.simreg_loss(3.0 * t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.simreg_loss(-t, t)) == pytest.approx(4.0, rel=1e-5)


def test_simreg_loss_gradient_does_not_reach_target():
    p = tf.Variable(np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32))
    t = tf.Variable(np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.simreg_loss(p, t)
    gp, gt = tape.gradient(loss, [p, t])
    assert gt is None
    assert np.abs(gp.numpy()).sum() > 0


def test_regress_loss_matches_numpy():
    rng = np.random.default_rng(4)
    p = rng.normal(size=(10, 7)).astype(np.float32)
    t = rng.normal(size=(10, 7)).astype(np.float32)
    want = np.mean(np.sum((p - t) ** 2, axis=1))
    np.testing.assert_allclose(float(losses.regress_loss(p, t)), want, rtol=1e-5)


def test_dimension_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="feature dimension 4 but the teacher target has 6"):
        losses.simreg_loss(tf.zeros([2, 4]), tf.ones([2, 6]))
