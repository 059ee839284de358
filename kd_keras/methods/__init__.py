"""Training methods: one keras.Model subclass per method, declared in `registry`.

It may import `losses`, `nets`, `optim`, `data` and `teachers` (the factory loads frozen
teachers), never `config` or anything above it: methods take plain arguments or the config
dataclasses handed to their builders.

Importing this package imports no TensorFlow (config.py reads the registry); the model
classes load on first access, e.g. `from kd_keras.methods import SimReg`.
"""

import importlib

_CLASSES = {
    "CRD": "kd_keras.methods.crd",
    "CompRess": "kd_keras.methods.compress",
    "OSS": "kd_keras.methods.oss",
    "SEED": "kd_keras.methods.seed",
    "SimReg": "kd_keras.methods.simreg",
    "Supervised": "kd_keras.methods.supervised",
    "SwAV": "kd_keras.methods.swav",
}

__all__ = ["CRD", "CompRess", "OSS", "SEED", "SimReg", "Supervised", "SwAV"]


def __getattr__(name):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'kd_keras.methods' has no attribute {name!r}")
