"""kd_keras API: fit throughput with the views made on the host (tf.data) or in the training
step (`views_in=`). Usage, from the repository root: python scripts/bench_api_views.py"""

import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kd_keras  # noqa: E402

N, BATCH, SIZE = 512, 32, 32


def net(name, any_size):
    inputs = keras.Input((None, None, 3) if any_size else (SIZE, SIZE, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(32)(x), name=name)


def distiller(method, views_in, teacher):
    if method == "SwAV":
        return kd_keras.SwAV(
            net("s", True),
            num_prototypes=30,
            proj_dim=16,
            proj_hidden_dim=32,
            image_size=SIZE,
            views_in=views_in,
        )
    return kd_keras.SimReg(student=net("s", False), teacher=teacher, head="mlp2", views_in=views_in)


def main():
    images = (np.random.default_rng(0).uniform(size=(N, 40, 40, 3)) * 255).astype(np.uint8)
    teacher = net("t", False)
    for method in ("SwAV", "SimReg"):
        for views_in in ("host", "step"):
            keras.utils.set_random_seed(0)
            model = distiller(method, views_in, teacher)
            model.compile()
            model.fit(images[: 2 * BATCH], batch_size=BATCH, verbose=0)  # traces the step
            start = time.perf_counter()
            model.fit(images, batch_size=BATCH, epochs=1, verbose=0)
            rate = N / (time.perf_counter() - start)
            print(f"{method:6s} views_in={views_in}: {rate:6.0f} img/s ({SIZE} px, batch {BATCH})")


if __name__ == "__main__":
    main()
