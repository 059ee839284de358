"""Step-dependent schedules of OSS/SwAV training: the gradient-reversal alpha and the learning rate."""

import math
import numbers

import keras
import tensorflow as tf


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def grl_alpha(step, total_steps):
    """OSS's gradient-reversal multiplier: alpha = -2 / (1 + exp(-10 n / N)) + 1.

    n = `step`, N = `total_steps`. alpha is 0 at n = 0, -2/(1+e^-5)+1 ~ -0.9866 at n = N/2,
    -2/(1+e^-10)+1 ~ -0.9999 at n = N and tends to -1 beyond (no clipping). It is passed as
    is to `kd_keras.nets.heads.GradientReversal`, which multiplies the gradient by it (the minus
    sign is here, not in the layer). Evaluated as the identical -tanh(5 n / N), which cannot
    overflow.

    Args:
      step: current step n (>= 0): Python number or scalar tensor.
      total_steps: N (> 0): Python number or scalar tensor.
    Returns:
      Python float when both arguments are Python numbers, otherwise a float32 scalar tensor.
    """
    if _is_number(total_steps) and total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps!r}.")
    if _is_number(step) and step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}.")
    if _is_number(step) and _is_number(total_steps):
        return -math.tanh(5.0 * step / total_steps)
    n = tf.cast(step, tf.float32)
    big_n = tf.cast(total_steps, tf.float32)
    return -tf.tanh(5.0 * n / big_n)


def warmup_cosine(step, total_steps, peak_lr, final_lr=0.0, warmup_steps=0, warmup_start_lr=0.0):
    """Linear warm-up then cosine decay (SwAV's schedule; OSS: peak 0.6, final 0.0006).

    With w = warmup_steps, T = total_steps and n clipped to [0, T]:
      n < w:  warmup_start_lr + (peak_lr - warmup_start_lr) * n / w
      n >= w: final_lr + 0.5 * (peak_lr - final_lr) * (1 + cos(pi * (n - w) / (T - w)))
    so the rate is peak_lr at n = w and final_lr at n = T (and after).
    (SwAV's np.linspace warm-up reaches the peak one step earlier; the difference is one step.)

    Args:
      step: scalar step (Python number or tensor).
      total_steps, warmup_steps: Python ints, 0 <= warmup_steps < total_steps.
      peak_lr, final_lr, warmup_start_lr: Python floats.
    Returns:
      float32 scalar tensor.
    """
    _check_warmup_cosine(total_steps, peak_lr, final_lr, warmup_steps, warmup_start_lr)
    n = tf.clip_by_value(tf.cast(step, tf.float32), 0.0, float(total_steps))
    warm = float(warmup_steps)
    cosine_len = float(total_steps - warmup_steps)
    progress = (n - warm) / cosine_len
    cosine = final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + tf.cos(math.pi * progress))
    if warmup_steps == 0:
        return cosine
    linear = warmup_start_lr + (peak_lr - warmup_start_lr) * n / warm
    return tf.where(n < warm, linear, cosine)


def _check_warmup_cosine(total_steps, peak_lr, final_lr, warmup_steps, warmup_start_lr):
    if not isinstance(total_steps, numbers.Integral) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}.")
    if not isinstance(warmup_steps, numbers.Integral) or not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must be an integer in [0, total_steps={total_steps}), "
            f"got {warmup_steps!r}."
        )
    for name, value in (
        ("peak_lr", peak_lr),
        ("final_lr", final_lr),
        ("warmup_start_lr", warmup_start_lr),
    ):
        if not _is_number(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}.")


@keras.saving.register_keras_serializable(package="kd_keras")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """`warmup_cosine` as a Keras learning-rate schedule (called with the optimizer's step).

    Args:
      peak_lr: rate at the end of the warm-up (SwAV/OSS: 0.6 at batch 256).
      total_steps: steps of the whole run (the rate is final_lr from there on).
      final_lr: rate at total_steps (SwAV/OSS: 0.0006).
      warmup_steps: linear warm-up steps (0: start at peak_lr).
      warmup_start_lr: rate at step 0 when warming up.
    """

    def __init__(self, peak_lr, total_steps, final_lr=0.0, warmup_steps=0, warmup_start_lr=0.0):
        _check_warmup_cosine(total_steps, peak_lr, final_lr, warmup_steps, warmup_start_lr)
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.final_lr = float(final_lr)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_lr = float(warmup_start_lr)

    def __call__(self, step):
        return warmup_cosine(
            step,
            self.total_steps,
            self.peak_lr,
            self.final_lr,
            self.warmup_steps,
            self.warmup_start_lr,
        )

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "final_lr": self.final_lr,
            "warmup_steps": self.warmup_steps,
            "warmup_start_lr": self.warmup_start_lr,
        }


# Epoch-based schedules of the evaluation protocols (linear probe, fine-tuning), stepped per
# epoch like PyTorch's MultiStepLR / CosineAnnealingLR.


@keras.saving.register_keras_serializable(package="kd_keras")
class EpochStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr = initial_lr * factor ** (number of milestones <= epoch), epoch = step // steps_per_epoch.

    `step` is the optimizer's iteration count before the update (0 for the first step), so
    the first step of epoch e is step e * steps_per_epoch.

    Args:
      initial_lr: rate during the first epochs (> 0).
      steps_per_epoch: optimizer steps per epoch (>= 1).
      milestones: increasing epochs (>= 1) at which the rate is multiplied by `factor`.
      factor: decay multiplier (SimReg: 0.1).
    """

    def __init__(self, initial_lr, steps_per_epoch, milestones, factor=0.1):
        self.initial_lr = _positive_float(initial_lr, "initial_lr")
        self.steps_per_epoch = _whole_number(steps_per_epoch, "steps_per_epoch", 1)
        self.milestones = tuple(_whole_number(m, "milestones", 1) for m in milestones)
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"milestones must be strictly increasing, got {milestones!r}")
        self.factor = _positive_float(factor, "factor")

    def __call__(self, step):
        epoch = tf.cast(step, tf.int64) // self.steps_per_epoch
        passed = tf.zeros([], tf.float32)
        for milestone in self.milestones:
            passed += tf.cast(epoch >= milestone, tf.float32)
        return self.initial_lr * tf.pow(self.factor, passed)

    def get_config(self):
        return {
            "initial_lr": self.initial_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "milestones": list(self.milestones),
            "factor": self.factor,
        }


@keras.saving.register_keras_serializable(package="kd_keras")
class EpochCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay updated once per epoch (PyTorch CosineAnnealingLR stepped every epoch).

    With e = min(step // steps_per_epoch, epochs):
      lr = final_lr + 0.5 * (initial_lr - final_lr) * (1 + cos(pi * e / epochs)),
    so epoch 0 trains at initial_lr, epoch epochs/2 at the midpoint, and the last trained epoch
    (epochs - 1) at slightly above final_lr.

    With warmup_epochs W > 0 the epochs e < W train at
      warmup_start_lr + (initial_lr - warmup_start_lr) * e / W
    and the later ones at the cosine above (still at e, so the decay does not restart after the
    warm-up): SEED's `tools/utils.py` `adjust_learning_rate`, where the warm-up runs from the
    unscaled --lr to the batch-scaled one in per-epoch steps (a hold at --lr on one GPU).

    Args:
      initial_lr: rate of epoch 0 without warm-up, the peak with it (> 0).
      steps_per_epoch: optimizer steps per epoch (>= 1).
      epochs: length of the decay in epochs (>= 1).
      final_lr: rate reached at epoch `epochs` (>= 0).
      warmup_epochs: whole epochs of warm-up W (0 <= W < epochs).
      warmup_start_lr: rate of epoch 0 with a warm-up (> 0; default initial_lr: a hold).
    """

    def __init__(
        self,
        initial_lr,
        steps_per_epoch,
        epochs,
        final_lr=0.0,
        warmup_epochs=0,
        warmup_start_lr=None,
    ):
        self.initial_lr = _positive_float(initial_lr, "initial_lr")
        self.steps_per_epoch = _whole_number(steps_per_epoch, "steps_per_epoch", 1)
        self.epochs = _whole_number(epochs, "epochs", 1)
        if (
            isinstance(final_lr, bool)
            or not isinstance(final_lr, numbers.Real)
            or not 0 <= final_lr <= initial_lr
        ):
            raise ValueError(f"final_lr must be a number in [0, initial_lr], got {final_lr!r}")
        self.final_lr = float(final_lr)
        self.warmup_epochs = _whole_number(warmup_epochs, "warmup_epochs", 0)
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be < epochs={epochs}")
        self.warmup_start_lr = (
            self.initial_lr
            if warmup_start_lr is None
            else _positive_float(warmup_start_lr, "warmup_start_lr")
        )

    def __call__(self, step):
        epoch = tf.minimum(tf.cast(step, tf.int64) // self.steps_per_epoch, self.epochs)
        progress = tf.cast(epoch, tf.float32) / float(self.epochs)
        span = self.initial_lr - self.final_lr
        cosine = self.final_lr + 0.5 * span * (1.0 + tf.cos(math.pi * progress))
        if not self.warmup_epochs:
            return cosine
        ramp = (self.initial_lr - self.warmup_start_lr) / self.warmup_epochs
        warm = self.warmup_start_lr + ramp * tf.cast(epoch, tf.float32)
        return tf.where(epoch < self.warmup_epochs, warm, cosine)

    def get_config(self):
        config = {
            "initial_lr": self.initial_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "final_lr": self.final_lr,
        }
        if self.warmup_epochs:  # configs written before the warm-up existed stay loadable
            config.update(warmup_epochs=self.warmup_epochs, warmup_start_lr=self.warmup_start_lr)
        return config


def _whole_number(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)


def _positive_float(value, name):
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
