"""What every kd_keras method shares: the optimisation step and replica-aware loss scaling."""

import functools

import keras
import tensorflow as tf


def num_replicas():
    """Replicas of the current tf.distribute strategy (1 outside any strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def in_multi_worker_mode(strategy=None):
    """Whether `strategy` (default: the current one) spans several workers.

    The same test Keras' TensorFlow trainer makes before it reduces step outputs across workers.
    """
    strategy = strategy or tf.distribute.get_strategy()
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def multi_worker_safe_logs(logs):
    """Returns step logs in a shape Keras can reduce across workers.

    Under MultiWorkerMirroredStrategy Keras' `fit` reduces every value a `train_step` /
    `test_step` returns with `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars
    (tensorflow#72388). A [1] value is reduced over replicas and its single element, so the
    logs that reach callbacks are scalars again. Elsewhere the logs are returned unchanged,
    because a single-worker strategy keeps the [1] shape.

    Args:
      logs: dict name -> float tensor (scalars, or already batched values).
    """
    if not in_multi_worker_mode():
        return logs
    logs = {k: tf.convert_to_tensor(v) for k, v in logs.items()}
    return {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v for k, v in logs.items()}


def _with_multi_worker_safe_logs(step_fn):
    @functools.wraps(step_fn)
    def step(self, data):
        return multi_worker_safe_logs(step_fn(self, data))

    step._multi_worker_safe = True
    return step


class Method(keras.Model):
    """Base class: subclasses implement `train_step`/`test_step` and call `apply_loss`.

    Args:
      weight_decay: L2 coefficient: every trainable variable's gradient gets
        weight_decay * v, as PyTorch's SGD(weight_decay=...) does (the papers' setting; it
        covers BN and bias parameters too). Keras' own `weight_decay` optimizer argument is
        decoupled (AdamW-style) and would not match.
    """

    def __init_subclass__(cls, **kwargs):
        # Every method's train_step / test_step returns its logs through
        # `multi_worker_safe_logs`, so methods written without multi-worker training in mind
        # still run under --strategy=multi_worker.
        super().__init_subclass__(**kwargs)
        for name in ("train_step", "test_step"):
            step_fn = cls.__dict__.get(name)
            if step_fn is not None and not getattr(step_fn, "_multi_worker_safe", False):
                setattr(cls, name, _with_multi_worker_safe_logs(step_fn))

    def __init__(self, weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        self.weight_decay = float(weight_decay)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' TensorFlow trainer builds optimizer and metric variables from a first batch
        # that it averages over replicas with `strategy.reduce`, which fails under
        # MultiWorkerMirroredStrategy for a dict of batches. The first local replica's part of
        # the batch has the same structure and is all the build needs.
        strategy = self.distribute_strategy
        if iterator is not None and in_multi_worker_mode(strategy):
            for _, _, batches in iterator:
                first = next(batches)
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], first
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def scale_loss(self, loss, variables=None):
        """Loss to differentiate; call it INSIDE the GradientTape.

        Keras' optimizer sums gradients over replicas, so the loss is divided by the replica
        count: the update then equals one device on the global batch. The optimizer's own
        scaling (mixed-precision loss scaling) is applied last. The weight decay is not in it:
        `gradients` adds its gradient directly (`variables` is accepted for older callers).
        """
        del variables
        total = tf.cast(loss, tf.float32) / tf.cast(num_replicas(), tf.float32)
        return self.optimizer.scale_loss(total)

    def gradients(self, tape, scaled_loss, variables):
        """d(scaled_loss)/d(variables) plus the coupled weight decay, one entry per variable.

        The decay is the gradient of 0.5 * weight_decay * sum(v^2) scaled exactly as
        `scale_loss` scales the loss (1 / replicas, then the loss scale): weight_decay * v
        once the optimizer has summed the replicas and unscaled, PyTorch SGD's coupled decay.
        Adding it here, rather than differentiating a penalty in the loss, saves the forward
        sum of squares and two backward multiplies per variable. A variable the loss does
        not reach still gets the decay; without decay its entry stays None.
        """
        grads = tape.gradient(scaled_loss, variables)
        if not self.weight_decay:
            return grads
        factor = self.optimizer.scale_loss(
            tf.constant(self.weight_decay, tf.float32) / tf.cast(num_replicas(), tf.float32)
        )
        return [_add_decay(g, v, factor) for g, v in zip(grads, variables, strict=True)]

    def apply_loss(self, tape, scaled_loss, variables):
        """Differentiates `scaled_loss` (from `scale_loss`) and updates `variables`."""
        grads = self.gradients(tape, scaled_loss, variables)
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        if not pairs:
            raise ValueError("The loss does not depend on any trainable variable.")
        self.optimizer.apply_gradients(pairs)

    def get_config(self):
        # Methods are trained from flags and checkpointed by weights; the exported artefact is
        # the student backbone, which has its own config.
        return {"weight_decay": self.weight_decay}


def _add_decay(gradient, variable, factor):
    """gradient + factor * variable (dense; `gradient` may be None or IndexedSlices)."""
    value = tf.convert_to_tensor(variable)
    decay = tf.cast(factor, value.dtype) * value
    if gradient is None:
        return decay
    return tf.convert_to_tensor(gradient) + decay
