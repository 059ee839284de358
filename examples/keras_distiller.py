"""Single-teacher SimReg inside Keras' own `keras.distillation.Distiller`.

`kd_keras.distillation.SimRegLoss` is a `keras.distillation.DistillationLoss`: give the
Distiller a student that ends in the prediction head (output size = the teacher's) and a
teacher with pooled features. Keras' Distiller feeds both the same images (no views, no
weight decay); `kd_keras.SimReg` adds those and several teachers, with the same loss.

    python examples/keras_distiller.py            # KD_KERAS_EXAMPLE_TINY=1: a few seconds
"""

import os

import keras
import numpy as np

from kd_keras.distillation import SimRegLoss

TINY = os.environ.get("KD_KERAS_EXAMPLE_TINY") == "1"
EPOCHS = 2 if TINY else 20


def backbone(width, dim, name):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(dim)(x), name=name)


def main():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(size=(64 if TINY else 512, 16, 16, 3))
    images = images.astype("float32")
    teacher = backbone(32, 64, "teacher")  # stands in for a trained teacher

    student = backbone(8, 32, "student")
    inputs = keras.Input((16, 16, 3))
    head = keras.Sequential(
        [
            keras.layers.Dense(64),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(64),
        ],
        name="head",
    )
    student_with_head = keras.Model(inputs, head(student(inputs)))

    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student_with_head,
        distillation_losses=SimRegLoss(),
        student_loss_weight=0.0,  # self-supervised: no labels
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    history = distiller.fit(images, batch_size=32, epochs=EPOCHS, verbose=0)
    losses = history.history["loss"]
    print(f"Distiller + SimRegLoss: {losses[0]:.4f} (epoch 1) -> {losses[-1]:.4f}")
    print(f"features of the trained student: {student.predict(images[:4], verbose=0).shape}")


if __name__ == "__main__":
    main()
