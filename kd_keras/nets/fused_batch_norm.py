"""BatchNormalization on TensorFlow's fused kernel, with Keras 3's numerics and variables.

Keras 3's BatchNormalization (TF backend) is written with generic ops: `tf.nn.moments` (a mean,
a squared difference, a second mean) and `tf.nn.batch_normalization` (rsqrt, a multiply, an
add), and autodiff differentiates each of them. Every one is a pass over the activation, so a
ResNet step spends much of its time in elementwise memory traffic, and Grappler cannot fold an
inference-mode BN into the convolution before it because it only recognises `FusedBatchNormV3`.
PyTorch runs one native kernel for the forward and one for the backward.

`BatchNorm` is a `keras.layers.BatchNormalization` (same variables, names, config, checkpoints,
converters and `isinstance` checks) whose `call` uses `FusedBatchNormV3` whenever it can:

* training (``training and trainable``): batch mean and *biased* variance, exactly Keras'
  statistics; the kernel's variance output is Bessel-corrected, so it is scaled by (n-1)/n
  before the moving averages are updated with Keras' formula;
* inference: the moving statistics, so Grappler's remapper can fuse Conv2D + BN (+ ReLU) into
  one convolution for frozen teachers.

Inputs of rank 2 ([B, C], the MLP heads) run as [B, 1, 1, C]. Anything the fused kernel cannot
express falls back to Keras' own `call`: another axis than the last, a mask, synchronized
(cross-replica) statistics, batch renormalization, or a backend other than TensorFlow.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kd_keras")
class BatchNorm(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization computed by `FusedBatchNormV3` where possible.

    Same constructor arguments and weights as keras.layers.BatchNormalization. Maps
    [B, C] or [B, H, W, C] -> same shape (other ranks: Keras' generic path).
    """

    def _can_fuse(self, inputs, mask):
        rank = len(inputs.shape)
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not self.renorm
            and rank in (2, 4)
            and self.axis in (-1, rank - 1)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        # As Keras does: statistics and normalisation in float32 for float16/bfloat16 inputs.
        x = tf.cast(inputs, tf.float32)
        shape = tf.shape(x)
        if len(inputs.shape) == 2:
            x = tf.reshape(x, [shape[0], 1, 1, shape[1]])
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        if training and self.trainable:
            y = self._normalise_with_batch_statistics(x, gamma, beta)
        else:
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=gamma,
                offset=beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                data_format="NHWC",
                is_training=False,
            )
        if len(inputs.shape) == 2:
            y = tf.reshape(y, shape)
        return tf.cast(y, self.compute_dtype)

    def _normalise_with_batch_statistics(self, x, gamma, beta):
        """[B, H, W, C] normalised by its own moments; updates the moving averages."""
        empty = tf.constant([], tf.float32)
        y, mean, unbiased_variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
        # Keras' moving variance averages the biased batch variance; the kernel returns n/(n-1)
        # times it (a single sample gives 0 either way, not NaN).
        variance = unbiased_variance * tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(
            tf.cast(self.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum)
        )
        self.moving_variance.assign(
            tf.cast(self.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum)
        )
        return y
