"""SEED (Fang et al., "SEED: Self-supervised Distillation for Visual Representation",
ICLR 2021): the student mimics the teacher's similarity distribution over a queue of teacher
embeddings, with the teacher's own embedding as an extra anchor."""

import keras
import tensorflow as tf

from kd_keras import losses
from kd_keras.methods.memory_bank import FeatureBank
from kd_keras.methods.single_teacher import SingleTeacherDistillation

# SEED tools/opts.py defaults (the values its README commands use).
QUEUE_SIZE = 65_536  # --queue
STUDENT_TEMPERATURE = 0.2  # --temp
TEACHER_TEMPERATURE = 1e-4  # --distill-t


class SEED(SingleTeacherDistillation):
    """SEED distillation with a FIFO queue of teacher embeddings.

    With unit vectors s (student head output), t (teacher) and the queue D read BEFORE this
    step's push (`kd_keras.losses.seed_loss`):

      loss = CE(softmax([t.t, t.D] / tau_T), softmax([s.t, s.D] / tau_S))

    then t is pushed (SEED `seed/builder.py`, `forward`: logits first, `_dequeue_and_enqueue`
    last). The queue starts as random unit vectors (``torch.randn(dim, K)`` normalised,
    `SEED.__init__`) and its length must be a multiple of the global batch (``assert self.K %
    batch_size == 0``).

    Heads: SEED replaces the student's classifier by a linear layer to the teacher's
    embedding size (``student(num_classes=dim)``), or, with its default ``--student_mlp``,
    by Linear(m, m)-ReLU-Linear(m, dim). Here the head is `kd_keras.nets.heads.prediction_head`
    (linear / mlp2 / mlp4, with SimReg's BatchNorm in the MLPs) to the teacher's feature size.
    SEED's teacher embedding is its SSL projection head's 128-d output; here it is whatever
    the teacher spec returns (its features, or a projection if the teacher model ends in one).

    Args:
      student, teacher, head: see `SingleTeacherDistillation`; the head's output size must be
        the teacher's feature size.
      queue_size: K (65,536), a multiple of the global batch (`check_batch`).
      student_temperature: tau_S (0.2). teacher_temperature: tau_T (1e-4).
      seed: queue initializer seed.

    Logged: loss.
    """

    def __init__(
        self,
        student,
        teacher,
        head=None,
        queue_size=QUEUE_SIZE,
        student_temperature=STUDENT_TEMPERATURE,
        teacher_temperature=TEACHER_TEMPERATURE,
        seed=None,
        **kwargs,
    ):
        super().__init__(student, teacher, head, **kwargs)
        self.student_temperature = losses._positive(
            "--seed_student_temperature", student_temperature
        )
        self.teacher_temperature = losses._positive(
            "--seed_teacher_temperature", teacher_temperature
        )
        teacher_dim = int(self.teacher.feature_dim)
        if self.output_dim != teacher_dim:
            raise ValueError(
                f"SEED compares student and teacher embeddings directly, so the student side "
                f"must give {teacher_dim} features, got {self.output_dim}; use a head "
                "(--head=linear|mlp2|mlp4)."
            )
        self.queue = FeatureBank(
            queue_size,
            teacher_dim,
            "normal",
            "--queue_size",
            multiple_of_batch=True,
            seed=seed,
            name="queue",
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def build_memories(self):
        self.queue.build()

    def check_batch(self, global_batch):
        """Raises ValueError (naming --queue_size) unless the queue fits the global batch."""
        self.queue.check_batch(global_batch)

    def _loss(self, student_features, teacher_features):
        return losses.seed_loss(
            student_features,
            teacher_features,
            self.queue.rows(),
            self.student_temperature,
            self.teacher_temperature,
        )

    def train_step(self, data):
        teacher_features = self.teacher_features(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss = self._loss(self(data["student"], training=True), teacher_features)
            scaled = self.scale_loss(loss, variables)
        self.apply_loss(tape, scaled, variables)
        self.queue.push(teacher_features)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def build_seed(ctx):
    """Registry builder of --method=seed (`BuildContext` -> SEED)."""
    from kd_keras.methods.single_teacher import one_teacher, student_head

    cfg, o = ctx.cfg, ctx.options
    teacher = one_teacher(ctx)
    model = SEED(
        ctx.student,
        teacher,
        student_head(ctx, int(teacher.feature_dim)),
        queue_size=o.queue_size,
        student_temperature=o.seed_student_temperature,
        teacher_temperature=o.seed_teacher_temperature,
        seed=cfg.seed,
        weight_decay=ctx.weight_decay,
        name="seed",
    )
    model.check_batch(cfg.optim.batch_size)
    return model
