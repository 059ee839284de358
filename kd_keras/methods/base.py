"""What every kd_keras method shares: the optimisation step and replica-aware loss scaling."""

import keras
import tensorflow as tf


def num_replicas():
    """Replicas of the current tf.distribute strategy (1 outside any strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


class Method(keras.Model):
    """Base class: subclasses implement `train_step`/`test_step` and call `apply_loss`.

    Args:
      weight_decay: L2 coefficient: every trainable variable's gradient gets
        weight_decay * v, as PyTorch's SGD(weight_decay=...) does (the papers' setting; it
        covers BN and bias parameters too). Keras' own `weight_decay` optimizer argument is
        decoupled (AdamW-style) and would not match.
    """

    def __init__(self, weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        self.weight_decay = float(weight_decay)

    def scale_loss(self, loss, variables):
        """Loss to differentiate; call it INSIDE the GradientTape.

        Adds the L2 penalty 0.5 * weight_decay * sum(v^2) over `variables` (its gradient is
        weight_decay * v, PyTorch SGD's coupled weight decay). Keras' optimizer sums gradients
        over replicas, so the result is divided by the replica count: the update then equals
        one device on the global batch. Going through the loss (rather than adding to the
        gradients) keeps the penalty correct under replica summing and loss scaling alike.
        The optimizer's own scaling (mixed-precision loss scaling) is applied last.
        """
        total = tf.cast(loss, tf.float32)
        if self.weight_decay:
            penalty = tf.add_n(
                [tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in variables]
            )
            total = total + 0.5 * self.weight_decay * penalty
        total = total / tf.cast(num_replicas(), tf.float32)
        return self.optimizer.scale_loss(total)

    def apply_loss(self, tape, scaled_loss, variables):
        """Differentiates `scaled_loss` (from `scale_loss`) and updates `variables`."""
        grads = tape.gradient(scaled_loss, variables)
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        if not pairs:
            raise ValueError("The loss does not depend on any trainable variable.")
        self.optimizer.apply_gradients(pairs)

    def get_config(self):
        # Methods are trained from flags and checkpointed by weights; the exported artefact is
        # the student backbone, which has its own config.
        return {"weight_decay": self.weight_decay}
