import json
import os

import keras
import numpy as np
import pytest

from kd_keras.artifacts import export
from kd_keras.nets import backbones
from kd_keras.teachers.loading import load_teacher, parse_teacher_spec
from tests.helpers import image_batch


@pytest.fixture(scope="module")
def tiny_backbone():
    keras.utils.set_random_seed(0)
    return backbones.build_backbone("convnet_tiny", 8)


def test_keras_file_teacher_is_frozen_and_detects_its_dimension(tmp_path, tiny_backbone):
    path = str(tmp_path / "t.keras")
    tiny_backbone.save(path)
    teacher = load_teacher(f"path={path},name=moco", image_size=8)
    assert teacher.name == "moco" and teacher.feature_dim == 64
    assert teacher.model.trainable_weights == []
    images = image_batch(4)
    np.testing.assert_allclose(teacher(images), tiny_backbone(images, training=False), atol=1e-5)


def test_savedmodel_and_run_directory_teachers_match_the_model(tmp_path, tiny_backbone):
    export_dir = export.export_backbone(tiny_backbone, str(tmp_path / "run" / "export"))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": {"image_size": 8}}))
    images = image_batch(3)
    want = tiny_backbone(images, training=False)
    saved = load_teacher(os.path.join(export_dir, "saved_model"), image_size=8)
    run = load_teacher(str(tmp_path / "run"), image_size=8)
    assert saved.spec.kind == "savedmodel" and run.spec.kind == "run"
    np.testing.assert_allclose(saved(images), want, atol=1e-5)
    np.testing.assert_allclose(run(images), want, atol=1e-5)


def test_applications_teacher_uses_local_weights_and_native_preprocessing(tmp_path):
    keras.utils.set_random_seed(1)
    app = keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3)
    )
    weights = str(tmp_path / "mnv2.weights.h5")
    app.save_weights(weights)
    with pytest.raises(ValueError, match="app:NAME="):
        parse_teacher_spec("app:MobileNetV2")
    teacher = load_teacher(f"app:MobileNetV2={weights}", image_size=32)
    assert teacher.spec.norm == "native" and teacher.name == "mobilenetv2"
    assert teacher.feature_dim == 1280
    images = image_batch(2, size=32)
    want = app(keras.applications.mobilenet_v2.preprocess_input(images * 255.0), training=False)
    np.testing.assert_allclose(teacher(images), want, atol=1e-4)
    small = str(tmp_path / "small.weights.h5")
    keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3), alpha=0.35
    ).save_weights(small)
    # A weights file of another width does not fit the default architecture: a clear error.
    with pytest.raises(ValueError, match="--teacher: could not load .*small.weights.h5"):
        load_teacher(f"app:MobileNetV2={small}", image_size=32)


def test_resize_and_pool_options(tmp_path):
    inputs = keras.Input((16, 16, 3))
    fmap = keras.layers.Conv2D(5, 3, padding="same")(inputs)
    model = keras.Model(inputs, fmap)
    path = str(tmp_path / "map.keras")
    model.save(path)
    with pytest.raises(ValueError, match="not a feature vector"):
        load_teacher(f"path={path},size=16", image_size=8)
    teacher = load_teacher(f"path={path},size=16,pool=avg,norm=imagenet", image_size=8)
    assert teacher.feature_dim == 5
    images = image_batch(2, size=8)
    resized = keras.ops.image.resize(images, (16, 16), antialias=True)
    want = np.mean(model(backbones.normalize_images(resized, "imagenet")), axis=(1, 2))
    np.testing.assert_allclose(teacher(images), want, atol=1e-4)


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("/does/not/exist.keras", FileNotFoundError, "--teacher: .*does not exist"),
        ("path=/x,colour=red", ValueError, "cannot parse"),
        ("app:NoSuchNet=/w.h5", ValueError, "keras.applications has no"),
        ("app:ResNet50=/missing/w.h5", FileNotFoundError, "weights file"),
        ("", ValueError, "empty"),
    ],
)
def test_bad_teacher_specs(spec, error, match):
    with pytest.raises(error, match=match):
        parse_teacher_spec(spec)


def test_unreadable_teacher_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="--teacher: could not load .*broken.keras"):
        load_teacher(str(bad), image_size=8)
    plain = tmp_path / "dir"
    plain.mkdir()
    with pytest.raises(ValueError, match="neither a kd_keras run directory"):
        parse_teacher_spec(str(plain))
