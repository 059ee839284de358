"""SwAV (Caron et al., 2020): swapped prediction of online cluster codes over multi-crop views.

Used on its own as the A.2 baseline of the OSS paper and as a teacher pre-training recipe;
`kd_keras.methods.oss` builds OSS on the same pieces.
"""

import keras
import tensorflow as tf

from kd_keras import losses
from kd_keras.methods.base import Method
from kd_keras.nets.clustering import replica_info


def crop_groups(batch):
    """Multi-crop batch -> per-resolution image stacks in crop-major order.

    Args:
      batch: dict with "large" float [B, n_large, S, S, 3] and optionally "small"
        [B, n_small, s, s, 3] (from `kd_keras.data.augment.make_multicrop_fn`).
    Returns:
      (groups, n_large, n_small): groups is a list of [n * B, side, side, 3] tensors, rows
      ordered crop by crop (rows v*B .. v*B+B-1 are crop v of every image), the order of
      SwAV's `cat(x_1, x_2, x^_1, ..., x^_V)`.
    """
    groups, counts = [], []
    for key in ("large", "small"):
        if key not in batch:
            continue
        crops = batch[key]
        n = crops.shape[1]
        if n == 0:
            continue
        # [B, n, H, W, C] -> [n, B, H, W, C] -> [n * B, H, W, C]
        rows = tf.transpose(crops, [1, 0, 2, 3, 4])
        groups.append(tf.reshape(rows, [-1, *crops.shape[2:]]))
        counts.append(n)
    if not groups or "large" not in batch:
        raise ValueError('A multi-crop batch needs a "large" entry [B, n_large, S, S, 3].')
    n_small = counts[1] if len(counts) > 1 else 0
    return groups, counts[0], n_small


def backbone_features(backbone, groups, training):
    """Runs the backbone once per resolution group; features of all views [n_views * B, m]."""
    return tf.concat([backbone(g, training=training) for g in groups], axis=0)


def dropout_seed(step, stream):
    """Seed pair of a dropout pass: distinct per step, replica and `stream` (network)."""
    replica, _ = replica_info()
    return tf.stack(
        [tf.cast(step, tf.int64), tf.cast(replica, tf.int64) * 16 + tf.cast(stream, tf.int64)]
    )


def per_view(x, n_views):
    """[n_views * B, ...] crop-major rows -> [n_views, B, ...]."""
    return tf.reshape(x, [n_views, -1, *x.shape[1:]])


class SwAVCodes:
    """Codes of the assignment crops from a network's scores, with the optional queue.

    Implements the inner block of OSS A.1 / SwAV's training loop for crop i: scores of the
    queued embeddings are put in front of the batch's scores (from `queue_start_step` on),
    Sinkhorn runs over all rows, and only the batch's rows are kept as codes.
    """

    def __init__(self, prototypes, queue, epsilon, num_iters, queue_start_step):
        self.prototypes = prototypes
        self.queue = queue
        self.epsilon = float(epsilon)
        self.num_iters = int(num_iters)
        self.queue_start_step = int(queue_start_step)

    def __call__(self, embeddings, scores, step, num_crops=2):
        """Codes {crop i: float32 [B, K]} and the fraction of queue rows used (scalar).

        Args:
          embeddings: [n_views, B, E] l2-normalised embeddings (the queue is filled from
            the first `num_crops` views AFTER their scores were taken, as A.1 orders it).
          scores: [n_views, B, K] their scores.
          step: the optimizer step of this update.
        """
        codes = {}
        used = tf.constant(0.0)
        use_queue = step >= self.queue_start_step
        for i in range(num_crops):
            out = scores[i]
            if self.queue is None:
                codes[i] = losses.sinkhorn(out, self.epsilon, self.num_iters)
                continue
            rows, filled = self.queue.local_rows(i)
            valid = tf.logical_and(filled, use_queue)
            all_scores = tf.concat([self.prototypes(rows), out], axis=0)
            mask = tf.concat([valid, tf.ones(tf.shape(out)[:1], tf.bool)], axis=0)
            q = losses.sinkhorn(all_scores, self.epsilon, self.num_iters, row_mask=mask)
            codes[i] = q[-tf.shape(out)[0] :]
            used = tf.reduce_mean(tf.cast(valid, tf.float32))
        if self.queue is not None:
            self.queue.push([tf.stop_gradient(embeddings[i]) for i in range(num_crops)])
        return codes, used


class SwAV(Method):
    """One network trained by SwAV's swapped prediction over multi-crop views.

    For the two large crops i the codes q_i come from Sinkhorn on the network's own scores
    (plus the queue); every other view v predicts q_i with softmax(scores_v / T):

      loss = 1/2 sum_{i in {0,1}} sum_{v != i} CE(q_i, p_v) / (n_views - 1)

    Args:
      backbone: keras.Model taking images of any side (multi-crop) -> features [B, m].
      head: `kd_keras.nets.heads.ProjectionHead` [B, m] -> [B, E].
      prototypes: `kd_keras.nets.clustering.Prototypes` (E x K).
      queue: `kd_keras.nets.clustering.EmbeddingQueue` or None.
      temperature: T (0.1). epsilon, sinkhorn_iters: Sinkhorn settings (0.05, 3).
      queue_start_step: first optimizer step at which queued rows join the Sinkhorn problem.
      freeze_prototypes_steps: the prototypes get no update before this step (SwAV's
        `freeze_prototypes_niters`).
      weight_decay: coupled L2 through the loss (see `Method`); 0 when LARS applies it.

    Batches: dicts from `kd_keras.data.augment.make_multicrop_fn` ("large", "small"). Logged:
    loss, queue_used (fraction of queue rows in the Sinkhorn problem).
    """

    def __init__(
        self,
        backbone,
        head,
        prototypes,
        queue=None,
        temperature=0.1,
        epsilon=0.05,
        sinkhorn_iters=3,
        queue_start_step=0,
        freeze_prototypes_steps=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = head
        self.prototypes = prototypes
        self.queue = queue
        self.temperature = float(temperature)
        self.freeze_prototypes_steps = int(freeze_prototypes_steps)
        self.codes = SwAVCodes(prototypes, queue, epsilon, sinkhorn_iters, queue_start_step)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.queue_tracker = keras.metrics.Mean(name="queue_used")

    @property
    def student(self):
        """The network that is evaluated and exported."""
        return self.backbone

    @property
    def metrics(self):
        return [self.loss_tracker, self.queue_tracker]

    def call(self, images, training=False):
        return self.backbone(images, training=training)

    def build(self, input_shape=None):
        if input_shape is not None:
            features = self.backbone(tf.zeros([1, *input_shape[1:]]))
            z = self.head(features)
            self.prototypes(z)
        if self.queue is not None and not self.queue.built:
            self.queue.build()
        self.built = True

    def embed(self, batch, training):
        """l2-normalised embeddings [n_views, B, E] of all crops and the crop counts."""
        groups, n_large, n_small = crop_groups(batch)
        features = backbone_features(self.backbone, groups, training)
        z = losses.l2_normalize(self.head(features, training=training))
        return per_view(z, n_large + n_small), n_large

    def train_step(self, data):
        step = self.optimizer.iterations
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            z, n_large = self.embed(data, training=True)
            scores = per_view(self.prototypes(tf.reshape(z, [-1, z.shape[-1]])), z.shape[0])
            codes, used = self.codes(z, scores, step, num_crops=min(2, n_large))
            loss = losses.swapped_prediction_loss(codes, scores, self.temperature)
            scaled = self.scale_loss(loss, variables)
        grads = self.gradients(tape, scaled, variables)
        grads = freeze_prototype_gradients(
            grads, variables, self.prototypes, step, self.freeze_prototypes_steps
        )
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        self.loss_tracker.update_state(loss)
        self.queue_tracker.update_state(used)
        return {m.name: m.result() for m in self.metrics}


def freeze_prototype_gradients(grads, variables, prototypes, step, freeze_steps):
    """Zeroes the prototypes' gradient before step `freeze_steps` (SwAV's practice).

    A zero gradient leaves LARS' update at zero too (it then applies neither decay nor trust
    ratio) and the momentum buffer stays empty, so the prototypes do not move.
    """
    if not freeze_steps:
        return grads
    keep = tf.cast(step >= freeze_steps, tf.float32)
    frozen = {id(v) for v in prototypes.trainable_variables}
    return [
        g * tf.cast(keep, g.dtype) if g is not None and id(v) in frozen else g
        for g, v in zip(grads, variables, strict=True)
    ]
