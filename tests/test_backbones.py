"""Tests for kd_keras.backbones: shapes, torchvision parameter counts, stems, BN, saving."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.nets import backbones

EXPECTED_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "mobilenetv2": 1280,
    "efficientnetb0": 1280,
    "resnet_small": 256,
    "resnet_tiny": 64,
    "convnet_tiny": 64,
    "regnety600mf": 608,
}
# torchvision's parameter counts minus the 1000-class fc layer (m * 1000 + 1000).
TORCHVISION_PARAMS_NO_FC = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
}


@functools.cache
def _model(name, image_size=32, **kwargs):
    # Building the big nets costs seconds; several tests only read the same graph.
    return backbones.build_backbone(name, image_size, **kwargs)


def _images(batch=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype("float32")


def _num_trainable(model):
    # torchvision counts parameters only; BN running statistics are buffers there and
    # non-trainable weights here, so compare trainable weights.
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _bn_layers(model):
    return [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_output_shape_and_feature_dim(name):
    model = _model(name)
    out = model(_images(), training=False)
    assert tuple(out.shape) == (2, EXPECTED_DIMS[name])
    assert out.dtype == tf.float32
    assert np.all(np.isfinite(out.numpy()))
    assert backbones.FEATURE_DIMS[name] == EXPECTED_DIMS[name]
    assert backbones.feature_dim(model) == EXPECTED_DIMS[name]
    assert model.get_layer("features").output.shape[-1] == EXPECTED_DIMS[name]
    assert isinstance(model.layers[1], backbones.InputNormalization)


def test_feature_dims_cover_exactly_the_names():
    assert set(backbones.FEATURE_DIMS) == set(EXPECTED_DIMS)
    assert set(backbones.BACKBONE_NAMES) == set(EXPECTED_DIMS)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS_NO_FC))
def test_resnet_parameter_count_matches_torchvision(name):
    model = _model(name, 224)
    assert _num_trainable(model) == TORCHVISION_PARAMS_NO_FC[name]
    assert any(isinstance(la, keras.layers.MaxPooling2D) for la in model.layers)


def test_small_stem_auto_switch():
    small = _model("resnet18", 64)
    assert not any(isinstance(la, keras.layers.MaxPooling2D) for la in small.layers)
    assert tuple(small.get_layer("stem_conv").kernel.shape) == (3, 3, 3, 64)
    assert small.get_layer("stem_conv").strides == (1, 1)
    assert small.get_layer("stem").output.shape[1:] == (64, 64, 64)

    large = _model("resnet18", 65)
    assert any(isinstance(la, keras.layers.MaxPooling2D) for la in large.layers)
    assert tuple(large.get_layer("stem_conv").kernel.shape) == (7, 7, 3, 64)
    # conv7x7/2 pad 3 then maxpool3x3/2 pad 1, as torchvision: 65 -> 33 -> 17.
    assert large.get_layer("stem").output.shape[1:3] == (17, 17)


def test_small_stem_explicit_overrides_auto():
    forced_large = backbones.build_backbone("resnet_tiny", 32, small_stem=False)
    assert any(isinstance(la, keras.layers.MaxPooling2D) for la in forced_large.layers)
    forced_small = backbones.build_backbone("resnet_tiny", 96, small_stem=True)
    assert not any(isinstance(la, keras.layers.MaxPooling2D) for la in forced_small.layers)
    # The tiny ResNet keeps its small stem by default even above 64 px.
    default = backbones.build_backbone("resnet_tiny", 96)
    assert tuple(default.get_layer("stem_conv").kernel.shape) == (3, 3, 3, 8)


@pytest.mark.parametrize(
    "name, size, channels, spatial",
    [
        ("resnet18", 32, (64, 128, 256, 512), (32, 16, 8, 4)),
        ("resnet50", 224, (256, 512, 1024, 2048), (56, 28, 14, 7)),
        ("resnet_tiny", 32, (8, 16, 32, 64), (32, 16, 8, 4)),
    ],
)
def test_stage_layers_have_expected_shapes(name, size, channels, spatial):
    model = _model(name, size)
    for i, (c, s) in enumerate(zip(channels, spatial, strict=True), start=1):
        assert model.get_layer(f"stage{i}").output.shape[1:] == (s, s, c)


def test_intermediate_features_can_be_extracted():
    model = _model("resnet_tiny")
    extractor = keras.Model(model.input, [model.get_layer("stage3").output, model.output])
    stage3, features = extractor(_images(), training=False)
    assert tuple(stage3.shape) == (2, 8, 8, 32)
    np.testing.assert_allclose(features, model(_images(), training=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sync_bn", [False, True])
def test_resnet_batch_norm_settings(sync_bn):
    model = backbones.build_backbone("resnet_tiny", 32, sync_bn=sync_bn)
    bns = _bn_layers(model)
    assert len(bns) == 1 + 4 * 2 + 3  # stem, two per block, projections in stages 2-4
    for bn in bns:
        assert bn.momentum == pytest.approx(0.9)
        assert bn.epsilon == pytest.approx(1e-5)
        assert bn.synchronized is sync_bn


def test_custom_bn_settings_are_applied():
    model = backbones.build_backbone("convnet_tiny", 32, bn_momentum=0.99, bn_epsilon=1e-3)
    assert {(bn.momentum, bn.epsilon) for bn in _bn_layers(model)} == {(0.99, 1e-3)}


def test_application_batch_norm_settings():
    model = _model("mobilenetv2", 32, sync_bn=True)
    bns = _bn_layers(model)
    assert len(bns) > 40
    assert {(bn.momentum, bn.epsilon, bn.synchronized) for bn in bns} == {(0.9, 1e-5, True)}
    # The settings must survive serialisation, i.e. live in each layer's config.
    configs = [la["config"] for la in model.get_config()["layers"]]
    bn_configs = [c for c in configs if "synchronized" in c]
    assert len(bn_configs) == len(bns)
    assert all(c["momentum"] == 0.9 and c["synchronized"] for c in bn_configs)


def test_batch_norm_factory():
    bn = backbones.batch_norm("bn", sync_bn=True)
    assert (bn.momentum, bn.epsilon, bn.synchronized, bn.name) == (0.9, 1e-5, True, "bn")
    assert backbones.batch_norm(center=False).center is False


def test_sync_bn_runs_under_a_distribution_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = backbones.build_backbone("convnet_tiny", 32, sync_bn=True)
    out = strategy.run(tf.function(lambda x: model(x, training=True)), args=(_images(),))
    assert tuple(out.shape) == (2, 64)


@pytest.mark.parametrize("mode", backbones.NORM_MODES)
def test_normalize_images_matches_numpy(mode):
    x = _images(batch=3, size=5)
    expected = {
        "imagenet": (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
        "unit": x,
        "minus_one_one": x * 2.0 - 1.0,
    }[mode]
    out = backbones.normalize_images(x, mode)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    layer_out = backbones.InputNormalization(mode)(x)
    np.testing.assert_allclose(layer_out, expected, rtol=1e-5, atol=1e-6)


def test_normalize_images_rejects_bad_input():
    with pytest.raises(ValueError, match="native"):
        backbones.normalize_images(_images(), "native")
    with pytest.raises(ValueError, match="'bogus'"):
        backbones.normalize_images(_images(), "bogus")
    with pytest.raises(ValueError, match="uint8"):
        backbones.normalize_images(np.zeros((1, 4, 4, 3), np.uint8), "unit")
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        backbones.normalize_images(np.zeros((1, 4, 4, 1), np.float32), "imagenet")
    with pytest.raises(ValueError, match="mode"):
        backbones.InputNormalization("native")


def test_input_normalization_config_round_trip():
    layer = backbones.InputNormalization("minus_one_one", name="norm")
    clone = backbones.InputNormalization.from_config(layer.get_config())
    assert (clone.mode, clone.name) == ("minus_one_one", "norm")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, backbones.InputNormalization)
    assert restored.mode == "minus_one_one"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", "imagenet"),
        ("convnet_tiny", "imagenet"),
        ("mobilenetv2", "minus_one_one"),
        ("efficientnetb0", "unit"),
    ],
)
def test_native_norm_resolution(name, expected):
    assert backbones.resolve_norm(name, "native") == expected
    assert backbones.resolve_norm(name, "unit") == "unit"


def test_norm_argument_sets_the_first_layer():
    model = backbones.build_backbone("convnet_tiny", 32, norm="native")
    assert model.get_layer("input_normalization").mode == "imagenet"
    model = backbones.build_backbone("convnet_tiny", 32, norm="minus_one_one")
    assert model.get_layer("input_normalization").mode == "minus_one_one"


def test_efficientnet_stem_sees_our_normalisation():
    # EfficientNetB0 rescales by 1/255 internally; the backbone must cancel that so the stem
    # receives exactly normalize_images(x, "imagenet") for the default norm.
    model = _model("efficientnetb0")
    probe = keras.Model(model.input, model.get_layer("normalization").output)
    x = _images()
    np.testing.assert_allclose(
        probe(x), backbones.normalize_images(x, "imagenet"), rtol=1e-5, atol=1e-5
    )


def test_keras_file_round_trip(tmp_path):
    model = backbones.build_backbone("resnet_tiny", 32, norm="minus_one_one")
    # Move the BN moving statistics off their initial values so that loading must restore them.
    for _ in range(2):
        model(_images(seed=1), training=True)
    x = _images(seed=2)
    expected = model(x, training=False).numpy()
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x, training=False), expected, rtol=1e-5, atol=1e-6)
    assert loaded.get_layer("input_normalization").mode == "minus_one_one"
    assert loaded.get_layer("stage4").output.shape[-1] == 64


def test_savedmodel_export_round_trip(tmp_path):
    model = backbones.build_backbone("convnet_tiny", 32)
    model(_images(seed=1), training=True)
    x = _images(seed=2)
    expected = model(x, training=False).numpy()
    path = str(tmp_path / "saved")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(tf.constant(x)), expected, rtol=1e-5, atol=1e-6)


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="'resnet99'.*resnet18"):
        backbones.build_backbone("resnet99", 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet18", "image_size": 0}, "image_size"),
        ({"name": "resnet18", "image_size": 32.0}, "image_size"),
        ({"name": "mobilenetv2", "image_size": 16}, "image_size"),
        ({"name": "resnet18", "image_size": 32, "norm": "zscore"}, "norm"),
        ({"name": "mobilenetv2", "image_size": 32, "small_stem": True}, "small_stem"),
        ({"name": "resnet18", "image_size": 32, "bn_momentum": 1.5}, "bn_momentum"),
        ({"name": "resnet18", "image_size": 32, "bn_epsilon": 0.0}, "bn_epsilon"),
        ({"name": "resnet18", "image_size": 32, "sync_bn": "yes"}, "sync_bn"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        backbones.build_backbone(**kwargs)


def test_name_prefix_names_the_model_only():
    model = backbones.build_backbone("convnet_tiny", 32, name_prefix="teacher")
    assert model.name == "teacher_convnet_tiny"
    assert model.get_layer("stage3").name == "stage3"
    assert backbones.build_backbone("convnet_tiny", 32).name == "convnet_tiny"


def test_feature_dim_rejects_non_vector_outputs():
    inputs = keras.Input((4, 4, 3))
    fmap = keras.Model(inputs, keras.layers.Conv2D(5, 1)(inputs))
    with pytest.raises(ValueError, match="\\[B, m\\]"):
        backbones.feature_dim(fmap)


def test_freeze():
    model = backbones.build_backbone("resnet_tiny", 32)
    assert model.trainable_weights
    frozen = backbones.freeze(model)
    assert frozen is model
    assert frozen.trainable_weights == []
    assert len(frozen.non_trainable_weights) == len(frozen.weights) > 0
    # A frozen BN keeps its moving statistics even when called with training=True.
    stem_bn = frozen.get_layer("stem_bn")
    before = stem_bn.moving_mean.numpy().copy()
    frozen(_images(), training=True)
    np.testing.assert_array_equal(stem_bn.moving_mean.numpy(), before)
