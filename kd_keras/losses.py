"""Distillation losses as pure functions of tensors.

All losses return the mean over the local (per-replica) batch. Under a multi-replica
`tf.distribute` strategy the caller divides by `num_replicas_in_sync` before taking gradients,
because Keras 3's optimizer sums the replicas' gradients (see `methods/base.py`).
"""

import tensorflow as tf


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """Scales `x` to unit l2 norm along `axis` (float32 arithmetic).

    Args:
      x: float tensor [..., D].
    Returns:
      float32 tensor of the same shape.
    """
    x = tf.cast(x, tf.float32)
    return tf.math.l2_normalize(x, axis=axis, epsilon=epsilon)


def simreg_loss(prediction, target):
    """SimReg loss: squared Euclidean distance between l2-normalised vectors.

    For unit vectors ||p - t||^2 = 2 - 2 cos(p, t), so the loss lies in [0, 4].

    Args:
      prediction: student prediction-head output, float [B, D].
      target: teacher features, float [B, D] (treated as a constant).
    Returns:
      float32 scalar: mean over the batch of 2 - 2 cos(prediction, target).
    """
    _check_same_shape(prediction, target)
    p = l2_normalize(prediction)
    t = tf.stop_gradient(l2_normalize(target))
    return tf.reduce_mean(tf.reduce_sum(tf.square(p - t), axis=-1))


def regress_loss(prediction, target):
    """'Regress' baseline: squared Euclidean distance of unnormalised features.

    Args:
      prediction: float [B, D]; target: float [B, D] (treated as a constant).
    Returns:
      float32 scalar: mean over the batch of sum over D of (prediction - target)^2.
    """
    _check_same_shape(prediction, target)
    p = tf.cast(prediction, tf.float32)
    t = tf.stop_gradient(tf.cast(target, tf.float32))
    return tf.reduce_mean(tf.reduce_sum(tf.square(p - t), axis=-1))


def cosine_similarity(a, b):
    """Per-example cosine similarity, float32 [B] for inputs [B, D]."""
    return tf.reduce_sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def mean_squared_error(a, b):
    """Per-example mean over D of the squared difference, float32 [B] for inputs [B, D]."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    return tf.reduce_mean(tf.square(a - b), axis=-1)


def _check_same_shape(prediction, target):
    p_dim = prediction.shape[-1]
    t_dim = target.shape[-1]
    if p_dim is not None and t_dim is not None and p_dim != t_dim:
        raise ValueError(
            f"prediction has feature dimension {p_dim} but the teacher target has {t_dim}; "
            "the prediction head's output size must equal the teacher's feature dimension."
        )
