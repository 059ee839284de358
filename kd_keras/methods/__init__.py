"""Training methods: one keras.Model subclass per method, registered by name."""

from kd_keras.methods.simreg import SimReg
from kd_keras.methods.supervised import Supervised

DISTILLATION_VARIANTS = ("simreg", "regress", "regress_bn")

__all__ = ["SimReg", "Supervised", "DISTILLATION_VARIANTS"]
