"""Training callbacks: NaN guard and augmented-view images in TensorBoard (the k-NN monitor is
kd_keras.eval.monitor)."""

import math

import keras
import numpy as np
import tensorflow as tf

from kd_keras.artifacts import checkpointing


class NonFiniteLoss(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


class NaNGuard(keras.callbacks.Callback):
    """Stops training with `NonFiniteLoss` the moment the loss is not finite.

    Place it before the checkpoint callback: raising inside `on_train_batch_end` keeps later
    callbacks from saving the broken weights, so the last good checkpoint survives.
    """

    def __init__(self, monitor="loss", hint="Try a lower --lr.", checkpoint_dir=None):
        super().__init__()
        self.monitor = monitor
        self.hint = hint
        self.checkpoint_dir = checkpoint_dir

    def _kept(self):
        """What survives, in words: the newest checkpoint's step, or that there is none."""
        if self.checkpoint_dir is None:
            return "the last good checkpoint was kept"

        steps = checkpointing.available_steps(self.checkpoint_dir)
        if not steps:
            return "no checkpoint had been written yet"
        return f"the checkpoint of step {steps[0]} in {self.checkpoint_dir} was kept"

    def on_train_batch_end(self, batch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isfinite(float(np.asarray(value).reshape(-1)[0])):
            self.model.stop_training = True
            raise NonFiniteLoss(
                f"{self.monitor} became {float(np.asarray(value).reshape(-1)[0])} at step "
                f"{int(self.model.optimizer.iterations.numpy())}; training stopped and "
                f"{self._kept()}. {self.hint}"
            )


class ViewImageLogger(keras.callbacks.Callback):
    """Writes a few augmented training views to TensorBoard once, at the start of training.

    Args:
      logdir: TensorBoard directory (a "train" sub-directory is used).
      batch: dict of views, each float32 [B, H, W, 3] in [0, 1].
      max_images: images per view key.
    """

    def __init__(self, logdir, batch, max_images=4):
        super().__init__()
        self.logdir = logdir
        self.batch = {k: np.asarray(v[:max_images]) for k, v in batch.items()}
        self.max_images = max_images

    def on_train_begin(self, logs=None):
        writer = tf.summary.create_file_writer(f"{self.logdir}/train")
        with writer.as_default():
            for key, images in self.batch.items():
                tf.summary.image(
                    f"views/{key}", np.clip(images, 0, 1), step=0, max_outputs=self.max_images
                )
        writer.flush()
