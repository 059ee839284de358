"""SimReg quickstart: distil a teacher keras.Model into a smaller student, the Keras way.

Runs on CPU in about a minute on scikit-learn's 8x8 digits (upscaled to 16x16): a teacher
CNN is first trained with labels (`kd_keras.Supervised`), then a 4x narrower student learns
the teacher's features without labels (`kd_keras.SimReg`), and both are scored by 1-nearest-
neighbour accuracy of their features on held-out digits.

    python examples/simreg_quickstart.py            # KD_KERAS_EXAMPLE_TINY=1: a few seconds
"""

import os

import keras
import numpy as np

import kd_keras

TINY = os.environ.get("KD_KERAS_EXAMPLE_TINY") == "1"
SIZE = 16
EPOCHS = 1 if TINY else 30
OUT_DIR = os.environ.get("KD_KERAS_EXAMPLE_DIR", "/tmp")


def digits():
    """(train images, train labels, test images, test labels), images float [N, 16, 16, 3]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.repeat(data.images[..., None] / 16.0, 3, axis=-1).astype("float32")
    images = keras.ops.convert_to_numpy(keras.ops.image.resize(images, (SIZE, SIZE)))
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order].clip(0, 1), data.target[order]
    n = 256 if TINY else 1400
    return images[:n], labels[:n], images[1400:], labels[1400:]


def cnn(width, name):
    """A small CNN backbone: images [B, 16, 16, 3] in [0, 1] -> pooled features [B, 2 * width]."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = inputs
    for w in (width, 2 * width):
        x = keras.layers.Conv2D(w, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name=name)


def knn_accuracy(network, train, train_labels, test, test_labels):
    """1-nearest-neighbour accuracy of cosine-normalised features."""

    def unit(x):
        f = network.predict(x, verbose=0)
        return f / np.linalg.norm(f, axis=1, keepdims=True).clip(1e-12)

    nearest = np.argmax(unit(test) @ unit(train).T, axis=1)
    return float(np.mean(train_labels[nearest] == test_labels))


def main():
    keras.utils.set_random_seed(0)
    x, y, x_test, y_test = digits()

    teacher = cnn(32, "teacher")  # any keras.Model with a pooled [B, d] output
    recipe = kd_keras.Supervised(teacher, num_classes=10)
    recipe.compile()
    recipe.fit(x, y, batch_size=64, epochs=EPOCHS, verbose=0)

    student = cnn(8, "student")
    before = knn_accuracy(student, x, y, x_test, y_test)
    distiller = kd_keras.SimReg(student=student, teacher=teacher, head="mlp4")
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    history = distiller.fit(x, batch_size=64, epochs=EPOCHS, verbose=0)  # no labels
    losses = history.history["loss"]
    print(f"SimReg loss: {losses[0]:.4f} (epoch 1) -> {losses[-1]:.4f} (epoch {len(losses)})")

    path = os.path.join(OUT_DIR, "student.keras")
    student.save(path)  # a plain Keras model
    reloaded = keras.models.load_model(path)
    print(f"student before distillation: 1-NN accuracy {before:.3f}")
    for name, network in (("teacher", teacher), ("student", reloaded)):
        accuracy = knn_accuracy(network, x, y, x_test, y_test)
        print(f"{name}: {network.count_params():,} parameters, 1-NN accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
