"""Small builders shared by tests: tiny students, tiny teachers, synthetic batches."""

import keras
import numpy as np
import tensorflow as tf

from kd_keras import config as config_lib
from kd_keras.teachers.loading import Teacher, TeacherSpec


def tiny_student(size=8, width=8, feat=6, sync_bn=True, name="student"):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=sync_bn)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(feat)(x)
    return keras.Model(inputs, x, name=name)


def tiny_teacher(name, size=8, dim=5, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(dim)(x)
    model = keras.Model(inputs, x, name=f"teacher_{name}")
    return Teacher(TeacherSpec("keras", "", name, "unit"), model, size)


def image_batch(n=8, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, size, size, 3)).astype(np.float32)


def dataset(images, batch_size):
    ds = tf.data.Dataset.from_tensor_slices({"student": images})
    return ds.batch(batch_size, drop_remainder=True)


def two_cpu_strategy():
    """A MirroredStrategy over the 2 logical CPUs with collective keys no other strategy uses.

    Every new MirroredStrategy starts its collective keys from the same class base, so two
    strategies in one process can hit each other's cached collective instances ("Shape
    mismatch in the collective instance 100"); TF's own tests bump the base the same way.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return strategy


def np_sinkhorn(scores, epsilon=0.05, num_iters=3):
    """SwAV's exp-domain Sinkhorn-Knopp in float64, as written in the SwAV repository."""
    s = np.asarray(scores, np.float64)
    q = np.exp((s - s.max()) / epsilon).T  # [K, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(num_iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


def h5_arrays(path):
    """Every dataset of an HDF5 file (e.g. a .weights.h5 checkpoint): {path in file: array}."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def parsed_flags(workdir, *argv):
    """kd_keras' absl FLAGS parsed afresh from `argv` (plus --workdir and a recipe teacher, so
    that only what a test names differs from the defaults)."""
    config_lib.define_flags()
    fv = config_lib.FLAGS
    fv.unparse_flags()
    fv(["prog", f"--workdir={workdir}", "--teacher=recipe:supervised", *argv])
    return fv
