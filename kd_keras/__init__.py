"""kd_keras: self-supervised knowledge distillation of vision models in TensorFlow / Keras 3.

The Python API (`kd_keras.SimReg`, `CompRess`, `SEED`, `CRD`, `SwAV`, `OSS`, `Supervised`,
`kd_keras.views`) is loaded on first access, so `import kd_keras` itself imports no
TensorFlow; it only installs the hook that lets `keras.models.load_model` find kd_keras'
custom layers (`kd_keras.api.registration`). See docs/python_api.md.
"""

import importlib

__version__ = "0.1.0"


def _check_tensorflow():
    # TensorFlow is an extra (cpu or gpu flavour), so a bare `pip install kd_keras` lacks it.
    # Only looked up, not imported: kd_keras.config (flags, the method registry) stays fast
    # and TensorFlow-free until a module that computes is imported.
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:  # pragma: no cover - environment
        raise ImportError(
            "kd_keras needs TensorFlow 2.21: install it with `pip install kd_keras[cpu]` "
            "(CPU-only) or `pip install kd_keras[gpu]` (CUDA)."
        )


_check_tensorflow()


_API = {
    "SimReg": "kd_keras.api.distillers",
    "CompRess": "kd_keras.api.distillers",
    "SEED": "kd_keras.api.distillers",
    "CRD": "kd_keras.api.distillers",
    "SwAV": "kd_keras.api.distillers",
    "OSS": "kd_keras.api.distillers",
    "Supervised": "kd_keras.api.distillers",
    "views": "kd_keras.api.views",
    "Views": "kd_keras.api.views",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name == "distillation":  # `kd_keras.distillation.SimRegLoss` without importing it first
        return importlib.import_module("kd_keras.distillation")
    raise AttributeError(f"module 'kd_keras' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, "distillation"])


importlib.import_module("kd_keras.api.registration").install()
