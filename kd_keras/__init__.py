"""kd_keras: self-supervised knowledge distillation of vision models in TensorFlow / Keras 3."""

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
