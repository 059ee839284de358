"""kd_keras: self-supervised knowledge distillation of vision models in TensorFlow / Keras 3."""

__version__ = "0.1.0"


def _check_tensorflow():
    # TensorFlow is an extra (cpu or gpu flavour), so a bare `pip install kd_keras` lacks it.
    try:
        import tensorflow  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kd_keras needs TensorFlow 2.21: install it with `pip install kd_keras[cpu]` "
            "(CPU-only) or `pip install kd_keras[gpu]` (CUDA)."
        ) from err


_check_tensorflow()
