"""CompRess, SEED and CRD losses against NumPy written from the papers' formulas."""

import numpy as np
import pytest
import tensorflow as tf

from kd_keras import losses


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _np_compress(s, t, bank_s, bank_t, temp):
    # CompRess Eq. 1-3: p(k) proportional to exp(sim(query, anchor_k) / T); KL(p_t || p_s).
    p_t = _softmax(_unit(t) @ _unit(bank_t).T / temp)
    p_s = _softmax(_unit(s) @ _unit(bank_s).T / temp)
    return np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))


def _np_seed(s, t, queue, tau_s, tau_t):
    # SEED Eq. 4-6: anchors = (own teacher embedding, queue); CE(p^T, p^S).
    s, t, q = _unit(s), _unit(t), _unit(queue)
    anchors = [np.concatenate([t[b : b + 1], q], axis=0) for b in range(len(s))]
    p_t = np.stack([_softmax(a @ t[b] / tau_t) for b, a in enumerate(anchors)])
    p_s = np.stack([_softmax(a @ s[b] / tau_s) for b, a in enumerate(anchors)])
    return -np.mean(np.sum(p_t * np.log(p_s), axis=1))


def _np_nce(p, n):
    # CRD Eq. 18 with P_n = 1/N: -[log h(pos) + sum_k log(1 - h(neg_k))], h = P/(P + K P_n).
    k = p.shape[1] - 1
    h = p / (p + k / n + 1e-7)
    one_minus = (k / n) / (p[:, 1:] + k / n + 1e-7)
    return -np.mean(np.log(h[:, 0]) + np.sum(np.log(one_minus), axis=1))


def _rng(seed):
    return np.random.default_rng(seed)


def test_compress_2q_matches_numpy():
    rng = _rng(0)
    s, t = rng.normal(size=(6, 5)), 3.0 * rng.normal(size=(6, 7))
    bank_s, bank_t = rng.normal(size=(20, 5)), rng.normal(size=(20, 7))
    got = losses.compress_loss(*(x.astype(np.float32) for x in (s, t, bank_s, bank_t)), 0.5)
    np.testing.assert_allclose(float(got), _np_compress(s, t, bank_s, bank_t, 0.5), rtol=2e-5)


def test_compress_1q_uses_the_teacher_bank_for_both_and_vanishes_when_student_equals_teacher():
    rng = _rng(1)
    t = rng.normal(size=(4, 6)).astype(np.float32)
    s = rng.normal(size=(4, 6)).astype(np.float32)
    bank = rng.normal(size=(30, 6)).astype(np.float32)
    got = float(losses.compress_loss(s, t, bank, bank, 0.04))
    np.testing.assert_allclose(got, _np_compress(s, t, bank, bank, 0.04), rtol=5e-5)
    assert got > 0.1
    assert float(losses.compress_loss(2.0 * t, t, bank, bank, 0.04)) == pytest.approx(0, abs=1e-5)


def test_compress_loss_rejects_banks_of_different_lengths():
    with pytest.raises(ValueError, match="student_bank has 3 rows but teacher_bank has 4"):
        losses.compress_loss(tf.ones([2, 3]), tf.ones([2, 3]), tf.ones([3, 3]), tf.ones([4, 3]))


def test_compress_gradient_matches_finite_differences_and_skips_teacher_and_banks():
    rng = _rng(2)
    s = tf.Variable(rng.normal(size=(3, 4)))
    t = tf.Variable(rng.normal(size=(3, 4)))
    bank = tf.Variable(rng.normal(size=(5, 4)))
    with tf.GradientTape() as tape:
        loss = losses.compress_loss(s, t, bank, bank, 0.5)
    g_s, g_t, g_bank = tape.gradient(loss, [s, t, bank])
    assert g_t is None and g_bank is None
    eps = 1e-3
    s0 = s.numpy()
    numeric = np.zeros_like(s0)
    for idx in np.ndindex(s0.shape):
        plus, minus = s0.copy(), s0.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (
            _np_compress(plus, t.numpy(), bank.numpy(), bank.numpy(), 0.5)
            - _np_compress(minus, t.numpy(), bank.numpy(), bank.numpy(), 0.5)
        ) / (2 * eps)
    np.testing.assert_allclose(g_s.numpy(), numeric, rtol=2e-3, atol=1e-5)


def test_seed_loss_matches_numpy_with_the_papers_temperatures():
    rng = _rng(3)
    s, t, q = rng.normal(size=(5, 8)), rng.normal(size=(5, 8)), rng.normal(size=(16, 8))
    for tau_s, tau_t in ((0.2, 1e-4), (0.2, 0.01), (1.0, 0.5)):
        got = losses.seed_loss(*(x.astype(np.float32) for x in (s, t, q)), tau_s, tau_t)
        np.testing.assert_allclose(float(got), _np_seed(s, t, q, tau_s, tau_t), rtol=1e-4)


def test_seed_loss_gradient_matches_finite_differences_and_not_teacher():
    rng = _rng(4)
    s = tf.Variable(rng.normal(size=(3, 4)))
    t = tf.Variable(rng.normal(size=(3, 4)))
    q = tf.constant(rng.normal(size=(6, 4)))
    with tf.GradientTape() as tape:
        loss = losses.seed_loss(s, t, q, 0.5, 0.3)
    g_s, g_t = tape.gradient(loss, [s, t])
    assert g_t is None
    eps = 1e-3
    s0 = s.numpy()
    numeric = np.zeros_like(s0)
    for idx in np.ndindex(s0.shape):
        plus, minus = s0.copy(), s0.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (
            _np_seed(plus, t.numpy(), q.numpy(), 0.5, 0.3)
            - _np_seed(minus, t.numpy(), q.numpy(), 0.5, 0.3)
        ) / (2 * eps)
    np.testing.assert_allclose(g_s.numpy(), numeric, rtol=2e-3, atol=1e-5)


def test_temperatures_must_be_positive():
    x = tf.ones([2, 3])
    with pytest.raises(ValueError, match="teacher_temperature must be a positive number"):
        losses.seed_loss(x, x, tf.ones([4, 3]), 0.2, 0.0)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        losses.compress_loss(x, x, tf.ones([4, 3]), tf.ones([4, 3]), -1.0)


def test_crd_loss_matches_numpy_eq18_both_sides():
    rng = _rng(5)
    b, k, e, n, temp = 4, 6, 5, 50, 0.07
    v_s, v_t = rng.normal(size=(b, e)), rng.normal(size=(b, e))
    mem_s, mem_t = rng.normal(size=(b, k + 1, e)), rng.normal(size=(b, k + 1, e))
    z_s, z_t = 7.0, 3.0
    # CRD: exp(<anchor, memory row> / T) / Z on unit vectors.
    p_s = np.exp(np.einsum("bke,be->bk", _unit(mem_t), _unit(v_s)) / temp) / z_s
    p_t = np.exp(np.einsum("bke,be->bk", _unit(mem_s), _unit(v_t)) / temp) / z_t
    want = _np_nce(p_s, n) + _np_nce(p_t, n)
    got = losses.crd_loss(
        *(x.astype(np.float32) for x in (v_s, v_t, mem_s, mem_t)), temp, n, z_s, z_t
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_crd_gradient_reaches_both_embeddings_not_the_memory():
    rng = _rng(6)
    v_s, v_t = tf.Variable(rng.normal(size=(3, 4))), tf.Variable(rng.normal(size=(3, 4)))
    mem = tf.Variable(rng.normal(size=(3, 5, 4)))
    with tf.GradientTape() as tape:
        loss = losses.crd_loss(v_s, v_t, mem, mem, 0.5, 20, 2.0, 2.0)
    g_s, g_t, g_m = tape.gradient(loss, [v_s, v_t, mem])
    assert g_m is None
    assert np.abs(g_s.numpy()).sum() > 0 and np.abs(g_t.numpy()).sum() > 0

    # Finite differences of the NumPy reference (float64) on the student embedding.
    def np_loss(x):
        p_s = np.exp(np.einsum("bke,be->bk", _unit(mem.numpy()), _unit(x)) / 0.5) / 2.0
        p_t = np.exp(np.einsum("bke,be->bk", _unit(mem.numpy()), _unit(v_t.numpy())) / 0.5) / 2.0
        return _np_nce(p_s, 20) + _np_nce(p_t, 20)

    eps = 1e-4
    base = v_s.numpy()
    numeric = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (np_loss(plus) - np_loss(minus)) / (2 * eps)
    np.testing.assert_allclose(g_s.numpy(), numeric, rtol=2e-3, atol=1e-5)


def test_memory_logits_dimension_mismatch_names_the_head():
    with pytest.raises(ValueError, match="head's output size must equal the bank's row size"):
        losses.memory_logits(tf.ones([2, 3]), tf.ones([4, 5]), 1.0)
