"""Training methods: one keras.Model subclass per method, registered by name."""

from kd_keras.methods.oss import OSS
from kd_keras.methods.simreg import SimReg
from kd_keras.methods.supervised import Supervised
from kd_keras.methods.swav import SwAV

DISTILLATION_VARIANTS = ("simreg", "regress", "regress_bn")

__all__ = ["OSS", "SimReg", "Supervised", "SwAV", "DISTILLATION_VARIANTS"]
