"""Supervised training of a backbone with a linear classifier: teachers and the baseline."""

import keras
import tensorflow as tf

from kd_keras.methods.base import Method


class Supervised(Method):
    """Cross-entropy on labels through a linear classifier on backbone features.

    Args:
      backbone: keras.Model, images [B, H, W, 3] in [0, 1] -> features [B, m].
      num_classes: classifier outputs.
      weight_decay: see `Method`.

    Batches are dicts with "student" [B, H, W, 3] (the augmented view) and "label" [B] int.
    Logged: loss, accuracy.
    """

    def __init__(self, backbone, num_classes, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"Supervised training needs >= 2 classes, the data has {num_classes}.")
        self.backbone = backbone
        self.classifier = keras.layers.Dense(num_classes, name="classifier")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, images, training=False):
        """Logits [B, num_classes]."""
        return self.classifier(self.backbone(images, training=training))

    def build(self, input_shape=None):
        if input_shape is not None:
            self.call(tf.zeros([1, *input_shape[1:]]))
        self.built = True

    def _loss(self, labels, logits):
        per_example = keras.losses.sparse_categorical_crossentropy(
            labels, tf.cast(logits, tf.float32), from_logits=True
        )
        return tf.reduce_mean(per_example)

    def train_step(self, data):
        labels = data["label"]
        with tf.GradientTape() as tape:
            logits = self(data["student"], training=True)
            loss = self._loss(labels, logits)
            scaled = self.scale_loss(loss, self.trainable_variables)
        self.apply_loss(tape, scaled, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        labels = data["label"]
        logits = self(data["student"], training=False)
        self.loss_tracker.update_state(self._loss(labels, logits))
        self.accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}


def build_supervised(ctx):
    """The registry's builder (`ctx`: a `kd_keras.methods.registry.BuildContext`)."""
    return Supervised(
        ctx.student, ctx.num_classes, weight_decay=ctx.weight_decay, name="supervised"
    )
