"""DeiT-style ViT students: shapes, parameter count, training, .keras round trip."""

import types

import keras
import numpy as np
import pytest

from kd_keras.methods import registry
from kd_keras.nets import vit


def _deit_parameters(width, depth, patch, tokens):
    """Parameter count of a DeiT without classifier, counted tensor by tensor."""
    block = (
        2 * 2 * width  # two LayerNorms
        + width * 3 * width
        + 3 * width  # qkv
        + width * width
        + width  # proj
        + width * 4 * width
        + 4 * width  # fc1
        + 4 * width * width
        + width  # fc2
    )
    stem = patch * patch * 3 * width + width
    return stem + width + tokens * width + depth * block + 2 * width


def test_vit_tiny_student_has_deits_parameters_and_outputs_the_class_token():
    model = vit.build_student("vit_tiny_patch16", 32)
    assert model.output_shape == (None, 192)
    assert model.count_params() == _deit_parameters(192, 12, 16, 2 * 2 + 1)
    assert all(w.trainable for w in model.weights)


def test_vit_student_trains_and_round_trips_through_a_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    model = vit.build_vit("vit-w16-d1-h2-p8", 16, pool="cls")
    images = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
    target = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    losses = model.fit(images, target, epochs=15, batch_size=8, verbose=0).history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    model.save(tmp_path / "vit.keras")
    loaded = keras.models.load_model(tmp_path / "vit.keras", compile=False)
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-6)


def test_a_vit_student_is_refused_for_multi_crop_methods():
    cfg = types.SimpleNamespace(
        model=types.SimpleNamespace(student="vit_tiny_patch16", student_norm="imagenet"),
        method="swav",
        sync_bn=False,
    )
    with pytest.raises(ValueError, match="--student=vit_tiny_patch16: a ViT student takes one"):
        registry.build_student(cfg, 32)
    with pytest.raises(ValueError, match="not a multiple of the ViT patch 16"):
        vit.build_student("vit_small_patch16", 40)
