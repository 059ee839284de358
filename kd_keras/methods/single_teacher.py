"""What CompRess, SEED and CRD share: one frozen teacher (live or cached), a student and a head.

The teacher sees the same (weak) view as the student unless the batch carries a "teacher"
view, or its features come from a teacher cache ("teacher_features"), exactly as for SimReg.
Heads and memories exist only during training: the exported network is `student`.
"""

import tensorflow as tf

from kd_keras.methods.base import Method, num_replicas
from kd_keras.methods.simreg import _Untracked


class SingleTeacherDistillation(Method):
    """Base of the memory-based baselines.

    Args:
      student: keras.Model, images [B, H, W, 3] in [0, 1] -> features [B, m] (exported).
      teacher: `kd_keras.teachers.loading.Teacher` (frozen, never saved in the method's weights).
      head: keras.Model [B, m] -> [B, d] on the student side (`kd_keras.nets.heads.prediction_head`)
        or None (the student's features are used as they are).
      weight_decay: see `Method`.
    """

    def __init__(self, student, teacher, head=None, **kwargs):
        super().__init__(**kwargs)
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher (--teacher).")
        self.student = student
        self.head = head
        self._teacher = _Untracked([teacher])
        m = student.output_shape[-1]
        if head is not None and head.input_shape[-1] != m:
            raise ValueError(
                f"The head expects {head.input_shape[-1]} inputs but the student backbone gives "
                f"{m} features."
            )

    @property
    def teacher(self):
        return self._teacher.items[0]

    @property
    def teachers(self):
        """Tuple of the one teacher (the interface SimReg's callers use)."""
        return self._teacher.items

    @property
    def output_dim(self):
        """Size of the student-side features the loss sees (head output, else backbone)."""
        network = self.head if self.head is not None else self.student
        return int(network.output_shape[-1])

    def call(self, images, training=False):
        """Student-side features [B, d] (after the head, if any)."""
        features = self.student(images, training=training)
        if self.head is None:
            return features
        return self.head(features, training=training)

    def build(self, input_shape=None):
        if input_shape is not None:
            self.call(tf.zeros([1, *input_shape[1:]]))
        self.build_memories()
        self.built = True

    def build_memories(self):
        """Builds the method's banks (subclasses)."""

    def teacher_features(self, data):
        """The teacher's features of the batch, float32 [B, d_t], a constant."""
        cached = data.get("teacher_features")
        if cached is not None:
            if self.teacher.name not in cached:
                raise ValueError(
                    f"The batch has no cached features of teacher {self.teacher.name}."
                )
            return tf.stop_gradient(tf.cast(cached[self.teacher.name], tf.float32))
        images = data.get("teacher", data["student"])
        return tf.stop_gradient(tf.cast(self.teacher(images), tf.float32))

    def test_step(self, data):
        """The loss against the current memories; nothing is pushed. Subclasses scoring a
        batch with `_loss(student_output, teacher_features)` and a `loss_tracker` use it as is."""
        loss = self._loss(self(data["student"], training=False), self.teacher_features(data))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def global_mean(x):
    """Mean of a per-replica scalar over the replicas (equal local batches): scalar."""
    context = tf.distribute.get_replica_context()
    if context is None or num_replicas() == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, x)


def one_teacher(ctx):
    """The single teacher of a registry `BuildContext` (these methods distil one)."""
    if len(ctx.teachers) != 1:
        raise ValueError(
            f"--method={ctx.cfg.method} distils exactly one teacher; got {len(ctx.teachers)} "
            "--teacher."
        )
    return ctx.teachers[0]


def student_head(ctx, out_dim, name="head"):
    """The `--head` (linear / mlp2 / mlp4, `--head_hidden_dims`) from the student to out_dim."""
    from kd_keras.nets import heads

    cfg = ctx.cfg
    return heads.prediction_head(
        ctx.student.output_shape[-1],
        out_dim,
        cfg.model.head,
        hidden_dims=cfg.model.head_hidden_dims,
        sync_bn=cfg.sync_bn,
        name=name,
        init=cfg.model.head_init,
        batch_norm=cfg.model.head_batch_norm,
    )
