"""Time one optimizer step of optimizers.SGD in both momentum forms over ResNet-18's weights.

PYTHONPATH=. python scripts/bench_sgd_forms.py
"""

import time

import keras
import numpy as np
import tensorflow as tf

from kd_keras.nets import backbones
from kd_keras.optim import optimizers

model = backbones.build_backbone("resnet18", 32, small_stem=False)
vs = model.trainable_variables
grads = [tf.random.normal(v.shape) for v in vs]
print("params", sum(int(np.prod(v.shape)) for v in vs))
for form in ("keras", "torch"):
    for jit in (False, True):
        opt = optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.05, 1000), momentum=0.9, momentum_form=form
        )
        opt.build(vs)
        f = tf.function(
            lambda opt=opt: opt.apply_gradients(zip(grads, vs, strict=True)), jit_compile=jit
        )
        for _ in range(3):
            f()
        t = time.perf_counter()
        n = 20
        for _ in range(n):
            f()
        print(
            form, "xla" if jit else "graph", "%.1f ms/step" % ((time.perf_counter() - t) / n * 1e3)
        )
