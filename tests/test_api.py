"""The Python API: kd_keras.SimReg & co. built from plain keras.Models, fit on plain data."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import kd_keras
from tests.helpers import image_batch, tiny_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def teacher_model(dim=5, size=8, pooled=True, scale=1.0, seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    if not pooled:
        return keras.Model(inputs, x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(dim)(x)
    return keras.Model(inputs, keras.layers.Rescaling(scale)(x))


def _python(code):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_import_is_light_and_registers_for_load_model(tmp_path):
    from kd_keras.nets import backbones, heads

    inputs = keras.Input((8, 8, 3))
    x = backbones.InputNormalization("imagenet")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = heads.ProjectionHead(4, 3, (0.0, 0.0), "output", name="proj")(x)
    path = str(tmp_path / "backbone.keras")
    keras.Model(inputs, x).save(path)
    result = _python(
        "import sys, kd_keras\n"
        "assert 'tensorflow' not in sys.modules, 'import kd_keras imported TensorFlow'\n"
        "import keras\n"
        f"m = keras.models.load_model({path!r})\n"
        "print(type(m.layers[1]).__module__, m.output_shape)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kd_keras.nets.backbones (None, 3)" in result.stdout


def test_every_registering_module_is_found():
    from kd_keras.api import registration

    found = set(registration.registering_modules())
    expected = {"kd_keras.nets.backbones", "kd_keras.nets.heads", "kd_keras.eval.layers"}
    assert expected <= found and "kd_keras.api.registration" not in found
    registration.register_all()
    registered = keras.saving.get_registered_object("kd_keras>ProjectionHead")
    assert registered is not None and registered.__name__ == "ProjectionHead"


@pytest.mark.slow
def test_simreg_fits_images_arrays_pairs_and_dicts():
    images = image_batch(n=16, size=8)
    distiller = kd_keras.SimReg(student=tiny_student(), teacher=teacher_model(), head="mlp2")
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    uint8 = (images * 255).astype(np.uint8)
    labels = np.arange(16) % 3
    for data in (
        images,
        tf.data.Dataset.from_tensor_slices(uint8).batch(8),
        tf.data.Dataset.from_tensor_slices((images, labels)).batch(8),
        tf.data.Dataset.from_tensor_slices({"student": images}).batch(8),
        (images, labels),
    ):
        history = distiller.fit(data, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert 0.0 <= history.history["loss"][0] <= 4.0  # 2 - 2 cos
    features = distiller.predict(images, verbose=0)
    assert features.shape == (16, 6)
    np.testing.assert_allclose(features, distiller.student(images), atol=1e-5)


def test_wrong_batch_is_one_clear_error_and_leaves_the_distiller_usable():
    distiller = kd_keras.SimReg(student=tiny_student(), teacher=teacher_model())
    distiller.compile()
    with pytest.raises(TypeError, match="fit accepts: a tf.data.Dataset of image batches"):
        distiller.fit([1, 2, 3])
    with pytest.raises(ValueError, match=r"images \[batch, height, width, 3\]"):
        distiller.fit(tf.data.Dataset.from_tensor_slices(np.zeros((4, 8, 8, 1), "f4")).batch(2))
    with pytest.raises(ValueError, match="'student'"):
        distiller.fit({"image": image_batch()})
    assert not distiller.built and not distiller.optimizer.built
    history = distiller.fit(image_batch(n=8), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_teacher_forms_and_refusals():
    with pytest.raises(ValueError, match="pooling='avg'"):
        kd_keras.SimReg(student=tiny_student(), teacher=teacher_model(pooled=False))
    with pytest.raises(ValueError, match="exactly one teacher"):
        kd_keras.SEED(student=tiny_student(), teachers=[teacher_model(), teacher_model()])
    with pytest.raises(TypeError, match="keras.Model, a spec string"):
        kd_keras.SimReg(student=tiny_student(), teacher=3)
    with pytest.raises(ValueError, match="teacher_input="):
        kd_keras.SimReg(student=tiny_student(), teacher=teacher_model(), teacher_input="bgr")
    several = kd_keras.SimReg(
        student=tiny_student(), teachers={"a": teacher_model(5), "b": teacher_model(3, seed=2)}
    )
    assert [t.name for t in several.teachers] == ["a", "b"]
    assert [h.output_shape[-1] for h in several.heads] == [5, 3]
    several.compile()
    logs = several.fit(image_batch(n=8), batch_size=4, verbose=0).history
    assert {"loss", "loss_a", "loss_b"} <= set(logs)


def test_teacher_from_a_spec_string_as_on_the_command_line(tmp_path):
    path = str(tmp_path / "t.keras")
    teacher_model(dim=4).save(path)
    distiller = kd_keras.SimReg(student=tiny_student(), teacher=f"{path},name=saved")
    assert distiller.teachers[0].name == "saved" and distiller.heads[0].output_shape[-1] == 4
    with pytest.raises(FileNotFoundError) as err:
        kd_keras.SimReg(student=tiny_student(), teacher=str(tmp_path / "missing.keras"))
    assert str(err.value).startswith("teacher: ")


def test_teacher_input_converts_images_for_plain_models():
    inputs = keras.Input((8, 8, 3))
    identity = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    distiller = kd_keras.SimReg(
        student=tiny_student(), teacher=identity, head="linear", teacher_input="minus_one_one"
    )
    images = image_batch(n=2)
    expected = (images * 2 - 1).mean(axis=(1, 2))
    np.testing.assert_allclose(distiller.teachers[0](images), expected, atol=1e-6)


def test_degenerate_teacher_warns_at_start():
    distiller = kd_keras.SimReg(student=tiny_student(), teacher=teacher_model(scale=1e-12))
    distiller.compile()
    with pytest.warns(UserWarning, match="near zero"):
        distiller.fit(image_batch(n=8), batch_size=4, verbose=0)


def test_seed_queue_is_sized_to_the_data_and_errors_name_arguments():
    images = image_batch(n=16)
    auto = kd_keras.SEED(student=tiny_student(), teacher=teacher_model())
    auto.compile()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.fit(images, batch_size=8, verbose=0)
    assert auto.queue.size == 8  # 65,536 x 16 / 1,281,167 rounds to under one batch
    big = kd_keras.SEED(student=tiny_student(), teacher=teacher_model(), queue_size=64)
    big.compile()
    with pytest.warns(UserWarning, match="queue_size=64 exceeds the 16 training images"):
        big.fit(images, batch_size=8, verbose=0)
    odd = kd_keras.SEED(student=tiny_student(), teacher=teacher_model(), queue_size=12)
    odd.compile()
    with pytest.raises(ValueError) as err:
        odd.fit(images, batch_size=8, verbose=0)
    assert "queue_size=12 must be a multiple" in str(err.value) and "--" not in str(err.value)
    assert not odd.built
    with pytest.raises(ValueError, match="student_temperature must be a positive"):
        kd_keras.SEED(student=tiny_student(), teacher=teacher_model(), student_temperature=0)


@pytest.mark.parametrize("mode", ["1q", "2q"])
def test_compress_and_crd_train_on_arrays(mode):
    images = image_batch(n=16)
    compress = kd_keras.CompRess(student=tiny_student(), teacher=teacher_model(), mode=mode)
    compress.compile()
    assert np.isfinite(compress.fit(images, batch_size=8, verbose=0).history["loss"][0])
    assert compress.teacher_bank.size == 8
    crd = kd_keras.CRD(student=tiny_student(), teacher=teacher_model(), feature_dim=4)
    crd.compile()
    assert np.isfinite(crd.fit(images, batch_size=8, verbose=0).history["loss"][0])
    assert crd.num_data == 16 and crd.num_negatives == 15


def test_crd_needs_indices_from_a_dataset():
    crd = kd_keras.CRD(student=tiny_student(), teacher=teacher_model(), feature_dim=4)
    crd.compile()
    with pytest.raises(ValueError, match="'index'"):
        crd.fit(tf.data.Dataset.from_tensor_slices(image_batch()).batch(4))


def test_supervised_needs_labels_and_trains():
    model = kd_keras.Supervised(tiny_student(), num_classes=2)
    model.compile()
    with pytest.raises(ValueError, match="needs labels"):
        model.fit(image_batch())
    logs = model.fit(image_batch(n=8), np.arange(8) % 2, batch_size=4, verbose=0).history
    assert {"loss", "accuracy"} <= set(logs)


def test_save_says_to_save_the_student_which_loads_back(tmp_path):
    distiller = kd_keras.SimReg(student=tiny_student(), teacher=teacher_model())
    distiller.compile()
    distiller.fit(image_batch(n=8), batch_size=4, verbose=0)
    with pytest.raises(NotImplementedError, match=r"distiller.student.save"):
        distiller.save(str(tmp_path / "all.keras"))
    path = str(tmp_path / "student.keras")
    distiller.student.save(path)
    loaded = keras.models.load_model(path)
    images = image_batch(n=2)
    np.testing.assert_allclose(loaded(images), distiller.student(images), atol=1e-6)


def _any_size_student(name):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(6)(x), name=name)


@pytest.mark.slow
def test_swav_and_oss_make_their_multicrop_views():
    images = image_batch(n=8, size=8)
    small = dict(num_prototypes=6, proj_dim=4, proj_hidden_dim=8, image_size=8)
    views = kd_keras.views("multicrop", 8, counts=(2, 1))
    swav = kd_keras.SwAV(_any_size_student("s"), views=views, **small)
    swav.compile()
    assert np.isfinite(swav.fit(images, batch_size=4, verbose=0).history["loss"][0])
    oss = kd_keras.OSS(
        _any_size_student("s2"), teacher=_any_size_student("t"), views=views, **small
    )
    oss.compile()
    logs = oss.fit(images, batch_size=4, epochs=1, verbose=0).history
    assert oss.total_steps == 2 and np.isfinite(logs["loss_student"][0])
    assert oss.grl_scale == 1.0  # --grl_scale's default
    weak = kd_keras.OSS(
        _any_size_student("s3"), teacher=_any_size_student("t3"), views=views, grl_scale=0.1,
        **small
    )
    assert weak.grl_scale == 0.1
    with pytest.raises(ValueError, match="feature_classifier=False has none"):
        kd_keras.OSS(_any_size_student("s4"), teacher=_any_size_student("t4"), views=views,
                     feature_classifier=False, grl_scale=0.5, **small)


@pytest.mark.parametrize("views_in", ["step", "host"])
def test_views_are_made_in_the_step_or_on_the_host(views_in):
    distiller = kd_keras.SimReg(
        student=tiny_student(), teacher=teacher_model(), head="linear", views_in=views_in
    )
    distiller.compile()
    images = (image_batch(n=16, size=12) * 255).astype(np.uint8)  # views crop them to 8 px
    logs = distiller.fit(images, batch_size=8, verbose=0).history
    assert np.isfinite(logs["loss"][0])
    with pytest.raises(ValueError, match="views_in='gpu'"):
        kd_keras.SimReg(student=tiny_student(), teacher=teacher_model(), views_in="gpu")


def test_views_helper_gives_dict_batches():
    batch = kd_keras.views("weak", 6)(tf.constant((image_batch(n=3) * 255).astype(np.uint8)))
    assert set(batch) == {"student"} and batch["student"].shape == (3, 6, 6, 3)
    values = batch["student"].numpy()
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
    crops = kd_keras.views("multicrop", 8, counts=(2, 3))(image_batch(n=2))
    assert crops["large"].shape == (2, 2, 8, 8, 3) and crops["small"].shape == (2, 3, 3, 3, 3)
