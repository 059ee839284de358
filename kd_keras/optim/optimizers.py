"""Optimizers: the one factory every training method uses (`make_optimizer`), Keras' momentum
SGD on a fused kernel (`SGD`), LARS as SwAV (and OSS) use it (apex's LARC(clip=False) around
torch SGD), and TorchSGD (torch.optim.SGD momentum) for the evaluation protocols; for Keras 3."""

import numbers

import keras
import tensorflow as tf

from kd_keras import choices
from kd_keras.optim import schedules

LARS_EXCLUDED = ("bias", "bn", "batch_normalization")  # --lars_exclude_bn_bias


def learning_rate_schedule(optim, steps_per_epoch):
    """The learning rate of --schedule, in optimizer steps.

    cosine: linear warm-up from 0 over --warmup_epochs, then a cosine from the peak to
    --final_lr at the last step (`schedules.WarmupCosine`). constant: the peak throughout (a
    plain float, so the optimizer keeps it as a variable, as runs have always stored it).
    epoch_cosine: the official SimReg code's staircase, the rate set once per epoch e (from 0)
    to final + (peak - final) / 2 * (1 + cos(pi e / epochs)), never 0 in training
    (`schedules.EpochCosine`); with --warmup_epochs W (whole epochs) the first W epochs step
    linearly from the unscaled --lr to the peak, SEED's warm-up (a hold without --lr_scaling).
    step: the peak multiplied by --lr_decay_rate at each of --lr_decay_epochs, set once per
    epoch (CompRess' `adjust_learning_rate`, `schedules.EpochStepDecay`). All rates follow
    --lr_scaling (linear: x batch / 256), as SwAV scales its base rate.

    Args:
      optim: `config.OptimConfig`.
      steps_per_epoch: optimizer steps per epoch.
    """
    peak = optim.scaled_lr()
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "step":
        return schedules.EpochStepDecay(
            peak, steps_per_epoch, optim.lr_decay_epochs, factor=optim.lr_decay_rate
        )
    if optim.schedule == "epoch_cosine":
        return schedules.EpochCosine(
            peak,
            steps_per_epoch,
            optim.epochs,
            final_lr=optim.final_lr * peak / optim.lr,
            warmup_epochs=int(optim.warmup_epochs),
            warmup_start_lr=optim.lr,
        )
    return schedules.WarmupCosine(
        peak,
        optim.epochs * steps_per_epoch,
        final_lr=optim.final_lr * peak / optim.lr,
        warmup_steps=int(round(optim.warmup_epochs * steps_per_epoch)),
    )


def make_optimizer(optim, steps_per_epoch):
    """The optimizer of --optimizer with `learning_rate_schedule`, for every method.

    sgd: Keras' momentum SGD on one fused kernel per variable (`SGD`; the weight decay is
    coupled, added by the method, see `coupled_weight_decay`); lars: `LARS`, which applies the
    weight decay itself.
    """
    schedule = learning_rate_schedule(optim, steps_per_epoch)
    if optim.optimizer == "lars":
        return LARS(
            schedule,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            trust_coefficient=optim.lars_trust,
            exclude_from_adaptation=list(LARS_EXCLUDED) if optim.lars_exclude_bn_bias else None,
        )
    return SGD(schedule, momentum=optim.momentum, momentum_form=optim.momentum_form)


def coupled_weight_decay(optim):
    """The L2 a method adds through its loss: 0 under LARS, which applies the decay itself."""
    return 0.0 if optim.optimizer == "lars" else optim.weight_decay


@keras.saving.register_keras_serializable(package="kd_keras")
class LARS(keras.optimizers.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (SwAV's `LARC(SGD, clip=False)`).

    For every variable w with gradient g (w, g of the same shape; norms are l2 norms of the
    whole tensor), wd = weight_decay, tc = trust_coefficient:

      if ||w|| > 0 and ||g|| > 0:
          ratio = tc * ||w|| / (||g|| + wd * ||w|| + eps)
          d = (g + wd * w) * ratio
      else:
          d = g                       # apex leaves the gradient alone: no decay, ratio 1
      v = momentum * v + d            # torch SGD momentum (dampening 0, not Nesterov)
      w = w - learning_rate * v

    This is exactly apex's LARC.step with clip=False followed by torch.optim.SGD with the
    weight decay moved into LARC: note the denominator uses the norm of the RAW gradient plus
    wd * ||w|| (not ||g + wd * w||), and there is no clipping of the ratio. SwAV adapts every
    parameter, biases and BatchNorm included; `exclude_from_adaptation` optionally treats some
    variables as plain momentum SGD (ratio 1 and no weight decay: d = g).

    Keras' own decoupled `weight_decay` is not used (the weight decay is the coupled one
    above); gradient clipping, EMA, loss scaling and accumulation keyword arguments are
    passed to `keras.optimizers.Optimizer`.

    Args:
      learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`
        (e.g. `kd_keras.optim.schedules.WarmupCosine`).
      momentum: in [0, 1); 0 keeps no momentum slots.
      weight_decay: coupled L2 coefficient wd (>= 0); SwAV/OSS use 1e-6.
      trust_coefficient: tc (> 0); SwAV uses 0.001.
      eps: added to the ratio's denominator (>= 0).
      exclude_from_adaptation: None (adapt everything, SwAV), a list of substrings matched
        against each variable's path (e.g. ["bias", "batch_normalization", "bn"]; falls back
        to the name), or a callable variable -> bool (True = excluded). Decided once per
        variable in `build`.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        weight_decay=1e-6,
        trust_coefficient=0.001,
        eps=1e-8,
        exclude_from_adaptation=None,
        name="lars",
        **kwargs,
    ):
        # Keras' weight_decay is decoupled (AdamW-style) and must stay off.
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        for arg, value, ok in (
            ("momentum", momentum, 0.0 <= _float(momentum) < 1.0),
            ("weight_decay", weight_decay, _float(weight_decay) >= 0.0),
            ("trust_coefficient", trust_coefficient, _float(trust_coefficient) > 0.0),
            ("eps", eps, _float(eps) >= 0.0),
        ):
            if not ok:
                raise ValueError(f"LARS: invalid {arg}={value!r}.")
        if isinstance(exclude_from_adaptation, dict):
            exclude_from_adaptation = keras.saving.deserialize_keras_object(exclude_from_adaptation)
        if isinstance(exclude_from_adaptation, str):
            exclude_from_adaptation = [exclude_from_adaptation]
        if not (
            exclude_from_adaptation is None
            or callable(exclude_from_adaptation)
            or (
                isinstance(exclude_from_adaptation, list | tuple)
                and all(isinstance(s, str) for s in exclude_from_adaptation)
            )
        ):
            raise ValueError(
                "exclude_from_adaptation must be None, a list of name substrings or a "
                f"callable, got {exclude_from_adaptation!r}."
            )
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.eps = float(eps)
        if isinstance(exclude_from_adaptation, tuple):
            exclude_from_adaptation = list(exclude_from_adaptation)
        self.exclude_from_adaptation = exclude_from_adaptation

    def is_excluded(self, variable):
        """True when `variable` gets plain momentum SGD (ratio 1, no weight decay)."""
        rule = self.exclude_from_adaptation
        if rule is None:
            return False
        if callable(rule):
            return bool(rule(variable))
        where = getattr(variable, "path", None) or variable.name
        return any(s in where for s in rule)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Python bools indexed like the variables: the choice is static, so the traced update
        # contains only the branch each variable needs.
        self._adapt = [not self.is_excluded(v) for v in variables]
        self.momentums = []
        if self.momentum != 0.0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        """One LARC(clip=False) + SGD-momentum step for `variable` (formula in the class doc)."""
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        # IndexedSlices (embedding lookups) become dense: the trust ratio needs the full norm.
        g = tf.cast(tf.convert_to_tensor(gradient), dtype)
        index = self._get_variable_index(variable)
        if self._adapt[index]:
            w = tf.convert_to_tensor(variable)
            wd = tf.cast(self.lars_weight_decay, dtype)
            w_norm = tf.norm(w)
            g_norm = tf.norm(g)
            ratio = self.trust_coefficient * w_norm / (g_norm + wd * w_norm + self.eps)
            adapt = tf.logical_and(w_norm > 0.0, g_norm > 0.0)
            g = tf.where(adapt, (g + wd * w) * ratio, g)
        if self.momentum != 0.0:
            buffer = self.momentums[index]
            g = self.momentum * tf.convert_to_tensor(buffer) + g
            self.assign(buffer, g)
        self.assign_sub(variable, lr * g)

    def get_config(self):
        config = super().get_config()
        rule = self.exclude_from_adaptation
        if callable(rule):
            # Round-trips for functions registered with keras.saving.register_keras_serializable.
            rule = keras.saving.serialize_keras_object(rule)
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.lars_weight_decay,
                "trust_coefficient": self.trust_coefficient,
                "eps": self.eps,
                "exclude_from_adaptation": rule,
            }
        )
        return config


def _resource(variable):
    """The tf.Variable behind a Keras variable (a replica's component inside an update)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


MOMENTUM_FORMS = choices.MOMENTUM_FORMS


@keras.saving.register_keras_serializable(package="kd_keras")
class SGD(keras.optimizers.SGD):
    """Momentum SGD in PyTorch's form (default) or Keras' (on one fused kernel).

    momentum_form="torch" is torch.optim.SGD (dampening 0), the form of the methods' reference
    code, with torch's CPU rounding (tests/test_sgd_torch_form.py: bit-identical weights and
    buffers on a fixed sequence of gradients and changing learning rates):

        buf = momentum * buf + g              (two roundings, as buf.mul_(m).add_(g))
        w = w - lr * buf                      (one rounding: torch's add_ with alpha is a
                                               fused multiply-add)
        nesterov: w = w - lr * (g + momentum * buf), each bracket one fused multiply-add

    momentum_form="keras" is keras.optimizers.SGD on `ResourceApplyKerasMomentum`:

        v = momentum * v - lr * g;  w = w + v
        (nesterov: w = w + momentum * v - lr * g)

    TensorFlow's own `ResourceApplyMomentum` computes the torch form but rounds lr * buf
    before the subtraction (1 ulp off torch now and then, which the torch form avoids at the
    cost of a float64 pass per variable: see `_fma`).

    With a constant lr the two forms are one trajectory (v = -lr * buf); when the lr changes
    (every step of a cosine) Keras' velocity keeps the old rates inside it while torch's
    buffer holds raw gradients and applies the new rate to all of them. Both keep their state
    in the same slot variables (`momentums`, named as Keras' own), so checkpoints of either
    form load into either; `convert_momentum` turns one state into the other on resume. The
    weight decay, when any, is coupled: the method adds wd * w to g (`coupled_weight_decay`),
    as torch's SGD(weight_decay=wd) does.

    Sparse gradients (IndexedSlices) keep Keras' own update under the Keras form and are
    densified under torch's (torch decays every row of the buffer each step); momentum 0
    keeps Keras' update (w = w - lr * g in both forms).

    Args:
      learning_rate, momentum, nesterov, name, **kwargs: as keras.optimizers.SGD.
      momentum_form: "torch" or "keras" (--momentum_form).
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        momentum_form="torch",
        name="SGD",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, name=name, **kwargs
        )
        if momentum_form not in MOMENTUM_FORMS:
            raise ValueError(f"--momentum_form={momentum_form!r}: choose one of {MOMENTUM_FORMS}.")
        self.momentum_form = momentum_form

    def update_step(self, gradient, variable, learning_rate):
        torch_form = self.momentum_form == "torch"
        if self.momentum == 0 or (isinstance(gradient, tf.IndexedSlices) and not torch_form):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        grad = tf.cast(tf.convert_to_tensor(gradient), dtype)
        momentum = tf.cast(self.momentum, dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        if not torch_form:
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=_resource(variable).handle,
                accum=_resource(buffer).handle,
                lr=lr,
                grad=grad,
                momentum=momentum,
                use_nesterov=bool(self.nesterov),
            )
            return
        buf = momentum * tf.convert_to_tensor(buffer) + grad
        self.assign(buffer, buf)
        step = _fma(buf, momentum, grad) if self.nesterov else buf
        self.assign(variable, _fma(step, -lr, tf.convert_to_tensor(variable)))

    def get_config(self):
        config = super().get_config()
        config["momentum_form"] = self.momentum_form
        return config


def _fma(a, b, c):
    """a * b + c rounded once, as torch's CPU kernels' fused multiply-add rounds it.

    The product of two float32 numbers is exact in float64, so the float64 sum rounded back
    to float32 is the fused result (short of a double rounding when the sum itself is inexact
    in float64, far rarer than torch-vs-TF differences). float64 inputs are computed as is.
    """
    wide = tf.float64
    exact = tf.cast(a, wide) * tf.cast(b, wide) + tf.cast(c, wide)
    return tf.cast(exact, a.dtype)


def convert_momentum(optimizer, from_form, step):
    """Rewrites `optimizer`'s momentum slots, written under `from_form`, into its own form.

    Keras' velocity after a step at rate lr is v = -lr * buf when the rate was constant, so
    the conversion uses the rate of the last step taken (step - 1):

        keras -> torch:  buf = -v / lr        torch -> keras:  v = -lr * buf

    Exact for a constant schedule; under a changing one it is the buffer the last rate
    implies (Keras' velocity mixes several rates and no single buffer reproduces it), so the
    resumed trajectory is torch's from then on, not the one a torch-form run would have
    taken. Slots are left alone when the forms agree or at step 0.

    Args:
      optimizer: a built `SGD` (inside a LossScaleOptimizer: pass the inner one).
      from_form: "torch" or "keras", the form that wrote the restored slots.
      step: optimizer steps taken (the restored `iterations`).
    Raises:
      ValueError: naming --momentum_form, when the last rate is 0 and a Keras velocity
        would have to be divided by it.
    """
    if from_form not in MOMENTUM_FORMS:
        raise ValueError(f"--momentum_form={from_form!r}: choose one of {MOMENTUM_FORMS}.")
    to_form = getattr(optimizer, "momentum_form", "torch")
    if from_form == to_form or step <= 0 or not getattr(optimizer, "momentums", None):
        return
    rate = optimizer.learning_rate
    if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        rate = optimizer._learning_rate(step - 1)
    rate = float(keras.ops.convert_to_numpy(rate))
    if to_form == "torch" and rate == 0.0:
        raise ValueError(
            "--momentum_form=torch cannot resume this checkpoint written with "
            "--momentum_form=keras: its last learning rate was 0, so the momentum buffer is "
            "undefined; resume with --momentum_form=keras."
        )
    for slot in optimizer.momentums:
        value = tf.convert_to_tensor(slot)
        slot.assign(-value / rate if to_form == "torch" else -rate * value)


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")  # NaN fails every range check


@keras.saving.register_keras_serializable(package="kd_keras")
class TorchSGD(keras.optimizers.Optimizer):
    """SGD with PyTorch's momentum convention (dampening 0, not Nesterov).

    For every variable w with gradient g:  v = momentum * v + g;  w = w - lr * v.
    (Keras' SGD stores lr * g in the velocity, so it lags torch after a learning-rate change.)
    Weight decay is not applied here; add it to the loss (`kd_keras.eval.linear_probe` does).

    Args:
      learning_rate: float or LearningRateSchedule.
      momentum: in [0, 1).
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, name="torch_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, numbers.Real)
            or not 0 <= momentum < 1
        ):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = [self.add_variable_from_reference(v, name="velocity") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        g = tf.cast(gradient, variable.dtype)
        v = self.velocities[self._get_variable_index(variable)]
        self.assign(v, self.momentum * v + g)
        self.assign_sub(variable, lr * v)

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        return config
