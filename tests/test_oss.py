"""SwAV and OSS: the loss against a NumPy port of OSS appendix A.1, queue, prototypes, replicas."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import losses
from kd_keras.data import augment
from kd_keras.methods import OSS, SwAV
from kd_keras.methods.oss import STUDENT, TEACHER
from kd_keras.methods.swav import crop_groups, dropout_seed
from kd_keras.nets import backbones, clustering, heads
from kd_keras.optim.optimizers import LARS
from tests.helpers import np_sinkhorn, two_cpu_strategy

SIZE, SMALL, N_LARGE, N_SMALL = 16, 8, 2, 2
E, K, B = 8, 12, 8


def _batch(n=B, seed=0):
    fn = augment.make_multicrop_fn(
        sizes=(SIZE, SMALL), counts=(N_LARGE, N_SMALL), scales=((0.3, 1.0), (0.1, 0.3))
    )
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, 20, 20, 3)).astype(np.float32)
    views = [fn(tf.constant(im), tf.constant([seed, i], tf.int64)) for i, im in enumerate(images)]
    return {k: tf.stack([v[k] for v in views]) for k in views[0]}


def _backbone(sync_bn=True):
    return backbones.build_backbone("convnet_tiny", SIZE, sync_bn=sync_bn, any_input_size=True)


def _oss(
    online=True,
    queue_length=16,
    queue_start=1,
    rates=(0.1, 0.05),
    seed=0,
    sync_bn=True,
    classifier=True,
    init="torch",
):
    keras.utils.set_random_seed(seed)
    model = OSS(
        _backbone(sync_bn),
        heads.ProjectionHead(16, E, rates, sync_bn=sync_bn, init=init),
        _backbone(sync_bn),
        heads.ProjectionHead(16, E, rates, sync_bn=sync_bn, init=init),
        clustering.Prototypes(K, E, init=init),
        clustering.EmbeddingQueue(2, queue_length, E) if queue_length else None,
        heads.feature_classifier(E, 10, sync_bn=sync_bn, init=init) if classifier else None,
        heads.GradientReversal() if classifier else None,
        total_steps=50,
        online=online,
        queue_start_step=queue_start,
    )
    model.compile(optimizer=LARS(0.3, weight_decay=1e-6))
    model.build((None, SIZE, SIZE, 3))
    return model


def _swav(queue_length=16, queue_start=1, seed=0):
    keras.utils.set_random_seed(seed)
    model = SwAV(
        _backbone(),
        heads.ProjectionHead(16, E, (0.0, 0.0)),
        clustering.Prototypes(K, E),
        clustering.EmbeddingQueue(2, queue_length, E) if queue_length else None,
        queue_start_step=queue_start,
    )
    model.compile(optimizer=LARS(0.3, weight_decay=1e-6))
    model.build((None, SIZE, SIZE, 3))
    return model


def test_oss_without_feature_classifier_is_the_two_swapped_losses():
    """Figure 5's ablation: the same networks and seeds give the same L_T and L_S as the full
    method, the loss is their sum, no domain terms are logged and D has no weights to train."""
    full = _oss(queue_length=0, seed=3)
    ablated = _oss(queue_length=0, seed=3, classifier=False)
    # D's initialiser draws come before the prototypes'; give both models the same weights.
    ablated.prototypes.kernel.assign(full.prototypes.kernel)
    batch = _batch(seed=5)
    step = tf.constant(0, tf.int64)
    got_full = full.compute_losses(batch, step, training=True)
    got = ablated.compute_losses(batch, step, training=True)
    assert "loss_domain" not in got and "domain_accuracy" not in got
    for name in ("loss_teacher", "loss_student"):
        np.testing.assert_allclose(got[name].numpy(), got_full[name].numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        got["loss"].numpy(), (got["loss_teacher"] + got["loss_student"]).numpy(), rtol=1e-6
    )
    assert len(ablated.trainable_variables) < len(full.trainable_variables)
    with pytest.raises(ValueError, match="together"):
        OSS(
            _backbone(),
            heads.ProjectionHead(16, E, (0.1, 0.05)),
            _backbone(),
            heads.ProjectionHead(16, E, (0.1, 0.05)),
            clustering.Prototypes(K, E),
            None,
            heads.feature_classifier(E, 10),
            None,
        )


# ---- an independent NumPy port of the A.1 pseudo-code (float64) ----


def _np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_oss_step(z, zd, w, wd, c, queue, count, use_queue, d_t, d_s, tau=0.1):
    """One A.1 iteration. z, zd, w, wd: [n_views, B, E]; queue [2, L, E] (updated in place).

    Queue rows enter once written (`count`) and from the queue start on (`use_queue`).
    Returns (loss1, loss2, ce_t, ce_s, new count).
    """
    n_views, b = z.shape[:2]
    scores_z, scores_zd = z @ c, zd @ c
    scores_w, scores_wd = w @ c, wd @ c
    all_z = np.concatenate([scores_z, scores_zd])
    all_w = np.concatenate([scores_w, scores_wd])
    loss1 = loss2 = 0.0
    for i in range(2):
        out = scores_z[i]
        if use_queue and count:
            out = np.concatenate([queue[i, :count] @ c, out])
        queue[i, b:] = queue[i, :-b].copy()
        queue[i, :b] = z[i]
        q = np_sinkhorn(out)[-b:]
        sub1 = sub2 = 0.0
        for v in range(2 * n_views):
            if v == i:
                continue
            sub1 -= np.mean(np.sum(q * _np_log_softmax(all_z[v] / tau), axis=1))
            sub2 -= np.mean(np.sum(q * _np_log_softmax(all_w[v] / tau), axis=1))
        loss1 += sub1 / (2 * n_views - 2) / 2
        loss2 += sub2 / (2 * n_views - 2) / 2
    ce_t = -np.mean(_np_log_softmax(d_t)[:, 0])
    ce_s = -np.mean(_np_log_softmax(d_s)[:, 1])
    return loss1, loss2, ce_t, ce_s, min(count + b, queue.shape[1])


def test_oss_loss_matches_numpy_port_of_a1_over_several_steps():
    model = _oss(queue_length=16, queue_start=1)
    n_views = N_LARGE + N_SMALL
    queue = np.zeros((2, 16, E))
    count = 0
    for step in range(4):
        batch = _batch(seed=step)
        groups, _, _ = crop_groups(batch)
        # The same (stateless, seeded) dropout masks the method draws at this step.
        z, zd = model.teacher_net.embed(groups, n_views, True, dropout_seed(step, TEACHER))
        w, wd = model.student_net.embed(groups, n_views, True, dropout_seed(step, STUDENT))
        rows = lambda a, b_: tf.reshape(tf.concat([a, b_], 0), [-1, E])  # noqa: E731
        d_t = model.classifier(rows(z, zd), training=True).numpy()
        d_s = model.classifier(rows(w, wd), training=True).numpy()
        c = model.prototypes.kernel.numpy().astype(np.float64)
        ref = _np_oss_step(
            *(np.asarray(t, np.float64) for t in (z, zd, w, wd)),
            c,
            queue,
            count,
            step >= 1,
            d_t.astype(np.float64),
            d_s.astype(np.float64),
        )
        got = model.compute_losses(batch, tf.constant(step, tf.int64), training=True)
        np.testing.assert_allclose(got["loss_teacher"].numpy(), ref[0], rtol=2e-4)
        np.testing.assert_allclose(got["loss_student"].numpy(), ref[1], rtol=2e-4)
        np.testing.assert_allclose(got["loss_domain"].numpy(), ref[2] + ref[3], rtol=2e-4)
        np.testing.assert_allclose(got["loss"].numpy(), sum(ref[:4]), rtol=2e-4)
        count = ref[4]
        # Queue contents and order: newest batch on top, A.1's shift.
        np.testing.assert_allclose(model.queue.queue.numpy(), queue, atol=1e-6)
        assert int(model.queue.count.numpy()) == count
    assert count == 16  # full after two pushes of 8


def test_swapped_prediction_loss_matches_numpy():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(5, 4, 6)).astype(np.float32)
    codes = {i: rng.dirichlet(np.ones(6), size=4).astype(np.float32) for i in (0, 1)}
    got = losses.swapped_prediction_loss(codes, scores, 0.1).numpy()
    expected = 0.0
    for i, q in codes.items():
        sub = sum(
            -np.mean(np.sum(q * _np_log_softmax(scores[v] / 0.1), axis=1))
            for v in range(5)
            if v != i
        )
        expected += sub / 4 / 2
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="view index"):
        losses.swapped_prediction_loss({7: codes[0]}, scores)


@pytest.mark.slow
def test_grl_alpha_logged_and_follows_schedule():
    model = _oss(queue_length=0)
    ds = tf.data.Dataset.from_tensors(_batch()).repeat()
    hist = model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0).history
    # Mean over steps 0, 1, 2 of -tanh(5 n / 50).
    expected = np.mean([-np.tanh(5 * n / 50) for n in range(3)])
    np.testing.assert_allclose(hist["grl_alpha"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(model.grl.alpha.numpy(), -np.tanh(5 * 2 / 50), rtol=1e-5)


def test_prototypes_unit_norm_after_steps_and_frozen_when_asked():
    model = _swav(queue_length=0)
    model.freeze_prototypes_steps = 2
    before = model.prototypes.kernel.numpy().copy()
    np.testing.assert_allclose(np.linalg.norm(before, axis=0), 1.0, atol=1e-6)
    ds = tf.data.Dataset.from_tensors(_batch()).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    np.testing.assert_allclose(model.prototypes.kernel.numpy(), before, atol=1e-6)
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    after = model.prototypes.kernel.numpy()
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_allclose(np.linalg.norm(after, axis=0), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["swav", "oss"])
def test_losses_decrease_on_tiny_data(method):
    model = _swav() if method == "swav" else _oss()
    batches = [_batch(seed=s) for s in range(2)]
    ds = tf.data.Dataset.from_tensor_slices(
        {k: tf.stack([b[k] for b in batches]) for k in batches[0]}
    ).repeat()
    hist = model.fit(ds, epochs=12, steps_per_epoch=2, verbose=0).history
    keys = ["loss"] if method == "swav" else ["loss_teacher", "loss_student"]
    for key in keys:
        assert hist[key][-1] < hist[key][0] - 0.05, (key, hist[key])


def test_swav_predicts_codes_far_below_uniform_when_views_agree():
    # With identical crops the codes are predictable, so the loss must fall well below ln K
    # (uniform predictions); a mix-up of views, codes or prototypes would keep it near ln K.
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(64, SIZE, SIZE, 3)).astype(np.float32)
    small = tf.image.resize(images, (SMALL, SMALL)).numpy()
    ds = tf.data.Dataset.from_tensor_slices(
        {"large": np.stack([images, images], 1), "small": np.stack([small, small], 1)}
    )
    model = _swav(queue_length=0)
    model.compile(optimizer=LARS(2.0, weight_decay=1e-6))
    hist = model.fit(ds.batch(32).repeat(), epochs=10, steps_per_epoch=10, verbose=0).history
    assert hist["loss"][-1] < 0.3 * np.log(K), hist["loss"]


@pytest.mark.slow
def test_queue_survives_checkpoint_round_trip(tmp_path):
    model = _oss(queue_length=16)
    ds = tf.data.Dataset.from_tensors(_batch()).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    path = os.path.join(tmp_path, "ckpt.weights.h5")
    model.save_weights(path)
    restored = _oss(queue_length=16, seed=5)
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(path)
    np.testing.assert_array_equal(restored.queue.queue.numpy(), model.queue.queue.numpy())
    assert int(restored.queue.count.numpy()) == 16
    np.testing.assert_array_equal(restored.grl.alpha.numpy(), model.grl.alpha.numpy())
    assert np.abs(model.queue.queue.numpy()).sum() > 0


def test_offline_teacher_and_prototypes_stay_frozen():
    model = _oss(online=False, queue_length=16)
    frozen = [v.numpy().copy() for v in model.teacher_backbone.weights] + [
        model.prototypes.kernel.numpy().copy()
    ]
    student = [v.numpy().copy() for v in model.student_backbone.trainable_weights]
    ds = tf.data.Dataset.from_tensors(_batch()).repeat()
    hist = model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0).history
    assert set(hist) == {"loss", "loss_student", "queue_used"}
    after = [v.numpy() for v in model.teacher_backbone.weights] + [model.prototypes.kernel.numpy()]
    for a, b in zip(frozen, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        np.abs(a - b.numpy()).max() > 0
        for a, b in zip(student, model.student_backbone.trainable_weights, strict=True)
    )


def test_queue_length_must_divide_by_global_batch():
    queue = clustering.EmbeddingQueue(2, 20, E)
    with pytest.raises(ValueError, match="--queue_length=20"):
        queue.check_batch(8)


def _weights(model):
    return [v.numpy() for v in model.weights]


@pytest.mark.slow
def test_oss_two_replicas_sync_bn_equal_one_device():
    # Dropout masks are drawn per replica, so the equality is checked with rates 0 (the
    # dropout views are still computed and enter every term). Keras' zero biases: a Linear bias
    # ahead of a train-mode BN has a gradient that is rounding noise (its exact value is 0),
    # and LARS scales that noise to a step of lr * trust * ||b|| in a direction the replica
    # count decides (~2e-4 here with torch's non-zero initial biases).
    batches = [_batch(n=8, seed=s) for s in range(3)]
    stacked = {k: tf.stack([b[k] for b in batches]) for k in batches[0]}
    ds = tf.data.Dataset.from_tensor_slices(stacked)

    single = _oss(queue_length=8, queue_start=1, rates=(0.0, 0.0), seed=3, init="keras")
    h1 = single.fit(ds, epochs=1, verbose=0).history

    strategy = two_cpu_strategy()
    with strategy.scope():
        multi = _oss(queue_length=8, queue_start=1, rates=(0.0, 0.0), seed=3, init="keras")
    h2 = multi.fit(ds, epochs=1, verbose=0).history
    assert h1["queue_used"][0] > 0  # the queue took part
    for key in ("loss_teacher", "loss_student", "loss_domain"):
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-4)
    for a, b in zip(_weights(single), _weights(multi), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def float32_first_step():
    # Dropout rates 0: XLA's random-number kernels may draw other (equally valid) masks.
    reference = _oss(queue_length=16, queue_start=0, rates=(0.0, 0.0))
    ds = tf.data.Dataset.from_tensors(_batch()).repeat()
    return reference.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.slow
def test_oss_step_under_xla_and_mixed_precision(precision, float32_first_step):
    from kd_keras.training.precision import policy_scope

    expected = float32_first_step
    ds = tf.data.Dataset.from_tensors(_batch()).repeat()
    with policy_scope(precision):
        model = _oss(queue_length=16, queue_start=0, rates=(0.0, 0.0))
    model.compile(optimizer=model.optimizer, jit_compile=precision == "float32")
    got = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history
    # The first step's losses are computed before any update: equal up to the arithmetic.
    tol = 1e-4 if precision == "float32" else 5e-2
    for key in ("loss_teacher", "loss_student", "loss_domain"):
        np.testing.assert_allclose(got[key], expected[key], rtol=tol)
    assert model.prototypes.kernel.dtype == "float32"
    assert model.queue.queue.dtype == "float32"
