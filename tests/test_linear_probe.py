"""Linear probe: standardisation layer, schedules, torch-style SGD, training against NumPy."""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.eval import linear_probe as lp


def _clusters(num_classes, dim, n, seed, spread=3.0, centre_seed=123):
    centres = np.random.default_rng(centre_seed).normal(size=(num_classes, dim)) * spread
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def _np_standardize(train, x, eps):
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    mean, var = unit_train.mean(axis=0), unit_train.var(axis=0)
    unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (unit_x - mean) / np.sqrt(var + eps), mean, var


# ---------------------------------------------------------------- FeatureStandardization


def test_standardization_matches_numpy():
    rng = np.random.default_rng(0)
    # Offsets and scales that differ per dimension, so mean and variance both matter.
    train = rng.normal(size=(300, 12)) * rng.uniform(0.5, 4, size=12) + rng.normal(size=12) * 2
    test = rng.normal(size=(50, 12)) * 3
    layer = lp.FeatureStandardization(epsilon=1e-6)
    layer.adapt(train)
    expected, mean, var = _np_standardize(train.astype(np.float64), test, 1e-6)
    np.testing.assert_allclose(layer.mean.numpy(), mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.variance.numpy(), var, rtol=1e-5, atol=1e-9)
    out = layer(tf.constant(test, tf.float32)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # The training features themselves come out with zero mean, unit variance per dimension.
    z = layer(tf.constant(train, tf.float32)).numpy()
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.var(axis=0), 1.0, rtol=1e-3)


def test_standardization_is_frozen_during_training():
    x, y = _clusters(3, 8, 96, seed=1)
    model, history = lp.fit_linear_probe(x, y, preset="simreg", epochs=2, batch_size=32)
    layer = model.get_layer("standardize")
    assert layer.trainable_weights == []
    assert {w.name for w in layer.non_trainable_weights} == {"mean", "variance"}
    _, mean, var = _np_standardize(x.astype(np.float64), x, 1e-8)
    np.testing.assert_allclose(layer.mean.numpy(), mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.variance.numpy(), var, rtol=1e-5, atol=1e-9)
    # ... while the Dense layer did move.
    assert len(history["loss"]) == 2 and history["loss"][1] < history["loss"][0]


def test_probe_round_trips_through_keras_file(tmp_path):
    x, _ = _clusters(4, 10, 64, seed=2)
    model = lp.build_linear_probe(10, 4, x, weight_decay=1e-3)
    model.get_layer("standardize").epsilon = 1e-5  # a non-default value must survive too
    path = str(tmp_path / "probe.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the layer is registered
    layer = loaded.get_layer("standardize")
    assert isinstance(layer, lp.FeatureStandardization)
    assert layer.epsilon == 1e-5
    np.testing.assert_array_equal(layer.mean.numpy(), model.get_layer("standardize").mean.numpy())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_standardization_config_and_bad_input():
    assert lp.FeatureStandardization.from_config({"epsilon": 1e-3}).epsilon == 1e-3
    with pytest.raises(ValueError, match="epsilon"):
        lp.FeatureStandardization(epsilon=0.0)
    layer = lp.FeatureStandardization()
    layer.adapt(np.ones((4, 3)))
    with pytest.raises(ValueError, match="features has 5 dims"):
        layer.adapt(np.ones((4, 5)))
    with pytest.raises(ValueError, match="features contains NaN"):
        lp.FeatureStandardization().adapt(np.array([[1.0, np.nan]]))


# ---------------------------------------------------------------- schedules and optimiser


def test_simreg_step_schedule():
    sched = lp.make_schedule("simreg", steps_per_epoch=10)
    assert isinstance(sched, lp.EpochStepDecay) and sched.milestones == (15, 30)
    expected = {0: 0.01, 149: 0.01, 150: 0.001, 299: 0.001, 300: 1e-4, 399: 1e-4}
    for step, lr in expected.items():
        assert float(sched(step)) == pytest.approx(lr, rel=1e-6), step
    # Shorter runs keep the shape: 15/40 and 30/40 of 4 epochs round to epochs 2 and 3.
    assert lp.make_schedule("simreg", 10, epochs=4).milestones == (2, 3)
    assert lp.make_schedule("simreg", 10, epochs=1).milestones == ()
    restored = lp.EpochStepDecay.from_config(sched.get_config())
    assert float(restored(150)) == pytest.approx(0.001)


def test_swav_cosine_schedule():
    sched = lp.make_schedule("swav", steps_per_epoch=10)
    assert isinstance(sched, lp.EpochCosine) and sched.epochs == 100
    assert float(sched(0)) == pytest.approx(0.3, rel=1e-6)
    assert float(sched(9)) == pytest.approx(0.3, rel=1e-6)  # constant within an epoch
    assert float(sched(500)) == pytest.approx(0.15, rel=1e-6)  # epoch 50 of 100
    assert float(sched(509)) == pytest.approx(0.15, rel=1e-6)
    last = 0.15 * (1 + math.cos(math.pi * 99 / 100))
    assert float(sched(999)) == pytest.approx(last, rel=1e-4)
    assert float(sched(1000)) == pytest.approx(0.0, abs=1e-9)
    assert float(sched(5000)) == pytest.approx(0.0, abs=1e-9)
    restored = lp.EpochCosine.from_config(sched.get_config())
    assert float(restored(500)) == pytest.approx(0.15, rel=1e-6)


def test_torch_sgd_momentum_survives_lr_change():
    w = keras.Variable(np.array([1.0, -2.0], np.float32))
    sched = lp.EpochStepDecay(0.5, steps_per_epoch=1, milestones=[1], factor=0.1)
    opt = lp.TorchSGD(sched, momentum=0.9)
    grads = [np.array([1.0, 2.0]), np.array([0.5, -1.0]), np.array([-1.0, 0.25])]
    ref, v = np.array([1.0, -2.0]), np.zeros(2)
    for step, g in enumerate(grads):
        opt.apply_gradients([(tf.constant(g, tf.float32), w)])
        v = 0.9 * v + g
        ref = ref - (0.5 if step == 0 else 0.05) * v
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6)


# ---------------------------------------------------------------- training


def _batch_order(n, epochs, batch_size, seed):
    """Row indices of every batch, read off the same stream with features = row index."""
    ids = np.arange(n, dtype=np.float32)[:, None]
    stream = lp.shuffled_batches(ids, np.zeros(n, np.int64), epochs, batch_size, seed)
    return [xb.numpy()[:, 0].astype(np.int64) for xb, _ in stream]


def _numpy_probe_training(model0, x, y, preset, epochs, batch_size, seed, lr_of_epoch):
    """Independent float64 replay of the probe's training: softmax regression, torch SGD."""
    kernel, bias = (w.astype(np.float64) for w in model0.get_layer("logits").get_weights())
    if preset.standardize:
        z, _, _ = _np_standardize(x.astype(np.float64), x.astype(np.float64), 1e-8)
    else:
        z = x.astype(np.float64)
    vk, vb = np.zeros_like(kernel), np.zeros_like(bias)
    wd = preset.weight_decay
    steps_per_epoch = math.ceil(len(x) / batch_size)
    order = _batch_order(len(x), epochs, batch_size, seed)
    assert len(order) == epochs * steps_per_epoch
    for step, idx in enumerate(order):
        logits = z[idx] @ kernel + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(idx)), y[idx]] -= 1.0
        d_logits = p / len(idx)  # gradient of the batch-mean cross-entropy
        gk = z[idx].T @ d_logits + wd * kernel
        gb = d_logits.sum(axis=0) + wd * bias
        vk, vb = 0.9 * vk + gk, 0.9 * vb + gb
        lr = lr_of_epoch(step // steps_per_epoch)
        kernel, bias = kernel - lr * vk, bias - lr * vb
    return kernel, bias


@pytest.mark.parametrize(
    "name, lr_of_epoch",
    [
        # epochs=4: milestones 15, 30 of 40 scale to epochs 2 and 3.
        ("simreg", lambda e: 0.01 * 0.1 ** ((e >= 2) + (e >= 3))),
        ("swav", lambda e: 0.15 * (1 + math.cos(math.pi * e / 4))),
    ],
)
def test_training_matches_numpy_reference(name, lr_of_epoch):
    preset = lp.PRESETS[name]
    if name == "swav":
        # A large decay, so coupled L2 on kernel and bias is visible in the comparison.
        preset = dataclasses.replace(preset, weight_decay=0.05)
    x, y = _clusters(3, 6, 40, seed=3, spread=1.0)
    epochs, batch_size, seed = 4, 16, 7  # 3 steps per epoch, the last one of 8 rows
    model0 = lp.build_linear_probe(6, 3, x, standardize=preset.standardize, seed=seed)
    model, history = lp.fit_linear_probe(
        x, y, preset=preset, epochs=epochs, batch_size=batch_size, seed=seed
    )
    assert history["steps_per_epoch"] == 3
    kernel, bias = _numpy_probe_training(
        model0, x, y, preset, epochs, batch_size, seed, lr_of_epoch
    )
    got_kernel, got_bias = model.get_layer("logits").get_weights()
    init_kernel = model0.get_layer("logits").get_weights()[0]
    assert np.max(np.abs(got_kernel - init_kernel)) > 1e-2  # training did something
    np.testing.assert_allclose(got_kernel, kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_bias, bias, rtol=1e-4, atol=1e-5)


def test_shuffled_batches_reshuffle_each_epoch():
    ids = np.arange(10, dtype=np.float32)[:, None]
    batches = [xb.numpy()[:, 0] for xb, _ in lp.shuffled_batches(ids, np.zeros(10), 2, 4, 0)]
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    first, second = np.concatenate(batches[:3]), np.concatenate(batches[3:])
    assert sorted(first) == sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    again = [xb.numpy()[:, 0] for xb, _ in lp.shuffled_batches(ids, np.zeros(10), 2, 4, 0)]
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(again))


def test_probe_separates_gaussian_clusters():
    train_x, train_y = _clusters(5, 16, 500, seed=10)
    test_x, test_y = _clusters(5, 16, 200, seed=11)
    result = lp.train_linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=32)
    assert result["top1"] >= 0.95
    assert result["top5"] is None  # 5 classes: top-5 would always be 1
    assert result["path"] == "cached_features"
    assert (result["preset"], result["epochs"], result["batch_size"]) == ("simreg", 3, 32)
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (500, 200, 5)
    again = lp.train_linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=32)
    assert again["final_train_loss"] == result["final_train_loss"]  # reproducible
    other = lp.train_linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=32, seed=1)
    assert other["final_train_loss"] != result["final_train_loss"]


def test_topk_accuracy_against_hand_example():
    logits = np.array(
        [
            [0, 9, 8, 7, 6, 5, 4],  # label 1: top-1 hit
            [9, 8, 7, 6, 5, 4, 0],  # label 4: in top-5 only
            [9, 8, 7, 6, 5, 4, 0],  # label 6: miss
            [1, 1, 0, 0, 0, 0, 0],  # label 1: tie with class 0 goes to class 0 -> top-5 only
        ],
        np.float32,
    )
    top1, top5 = lp._topk_accuracy(logits, np.array([1, 4, 6, 1]))
    assert (top1, top5) == (0.25, 0.75)


# ---------------------------------------------------------------- validation


def test_bad_inputs_name_the_argument():
    x, y = _clusters(3, 64, 30, seed=4)
    xt, yt = _clusters(3, 32, 10, seed=5)
    with pytest.raises(ValueError, match="test_features has 32 dims, train_features 64"):
        lp.train_linear_probe(x, y, xt, yt)
    with pytest.raises(ValueError, match="train_labels has shape"):
        lp.train_linear_probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="test_labels has shape"):
        lp.train_linear_probe(x, y, x, y[:-1])
    with pytest.raises(ValueError, match="train_labels must contain at least 2"):
        lp.train_linear_probe(x, np.zeros(30, np.int64), x, y)
    with pytest.raises(ValueError, match="train_labels must hold integers"):
        lp.train_linear_probe(x, y.astype(np.float32), x, y)
    with pytest.raises(ValueError, match="test_labels must be >= 0"):
        lp.train_linear_probe(x, y, x, -y - 1)
    bad = x.copy()
    bad[3, 5] = np.inf
    with pytest.raises(ValueError, match="train_features contains NaN or infinite"):
        lp.train_linear_probe(bad, y, x, y)
    with pytest.raises(ValueError, match="test_features contains NaN or infinite"):
        lp.train_linear_probe(x, y, np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match=r"preset must be one of \['simreg', 'swav'\]"):
        lp.train_linear_probe(x, y, x, y, preset="byol")
    with pytest.raises(ValueError, match="epochs=0"):
        lp.train_linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        lp.train_linear_probe(x, y, x, y, batch_size=2.5)
    with pytest.raises(ValueError, match="train_features is required"):
        lp.build_linear_probe(64, 3)
    with pytest.raises(ValueError, match="num_classes=1"):
        lp.build_linear_probe(64, 1, x)
    with pytest.raises(ValueError, match="weight_decay"):
        lp.build_linear_probe(64, 3, x, weight_decay=-1.0)
    with pytest.raises(ValueError, match="milestones must be strictly increasing"):
        lp.EpochStepDecay(0.1, 10, [30, 15])
    with pytest.raises(ValueError, match="momentum"):
        lp.TorchSGD(0.1, momentum=1.0)


def test_augmented_path_trains_through_a_frozen_network():
    # Class c is a noisy image of colour c; the frozen "network" is a 1x1 conv + average pool,
    # so crops and flips keep every class linearly separable.
    colours = np.array([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]], np.float32)

    def split(n, seed):
        labels = np.random.default_rng(seed).integers(0, 3, n)
        noise = np.random.default_rng(seed + 1).uniform(-0.1, 0.1, (n, 12, 12, 3))
        images = np.clip(colours[labels][:, None, None, :] + noise, 0, 1).astype(np.float32)
        return images, labels

    train_images, train_labels = split(120, 1)
    test_images, test_labels = split(60, 3)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1, kernel_initializer=keras.initializers.RandomNormal(seed=1))(
        inputs
    )
    embed = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    before = [w.copy() for w in embed.get_weights()]
    examples = tf.data.Dataset.from_tensor_slices(
        {"image": train_images, "label": train_labels.astype(np.int32), "index": np.arange(120)}
    )
    centre = lambda im: tf.image.resize(im, (8, 8)).numpy()  # noqa: E731
    train_feats = embed.predict(centre(train_images), verbose=0)
    test_feats = embed.predict(centre(test_images), verbose=0)
    result = lp.train_linear_probe_augmented(
        embed,
        examples,
        120,
        train_feats,
        test_feats,
        test_labels,
        num_classes=3,
        preset="swav",
        epochs=8,
        batch_size=16,
    )
    assert result["path"] == "augmented_images" and result["preset"] == "swav"
    assert (result["num_train"], result["num_test"], result["epochs"]) == (120, 60, 8)
    assert result["top1"] >= 0.95
    for a, b in zip(before, embed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the network stayed frozen
    assert embed.trainable and len(embed.trainable_variables) == 2  # and is handed back as it was
    with pytest.raises(ValueError, match="train_features has 5 dims but the model gives 4"):
        lp.train_linear_probe_augmented(
            embed, examples, 120, np.ones((120, 5)), test_feats, test_labels, num_classes=3
        )
