"""Test-session setup: quiet TF logs and two logical CPU devices for MirroredStrategy tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Must run before TensorFlow initialises its devices; every test then sees CPU:0 and CPU:1.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError:
    pass  # already initialised (e.g. a plugin imported TF devices first)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_collective_keys():
    """Gives each test's MirroredStrategy its own collective-op keys.

    Strategies created in one process reuse the same collective instance keys, and a later one
    can then fail with "Shape mismatch in the collective instance ..." depending on test order.
    TensorFlow's own tests bump the key base the same way.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    yield


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A small saved `.keras` teacher (convnet_tiny at 8 px) shared by the end-to-end tests."""
    import keras

    from kd_keras.nets import backbones

    keras.utils.set_random_seed(11)
    model = backbones.build_backbone("convnet_tiny", 8)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.keras")
    model.save(path)
    return path
