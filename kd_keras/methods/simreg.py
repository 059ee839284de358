"""SimReg (Navaneet et al., "SimReg: Regression as a Simple Yet Effective Tool for
Self-supervised Knowledge Distillation") and its Regress / Regress-BN baselines."""

import keras
import tensorflow as tf

from kd_keras import losses
from kd_keras.methods.base import Method
from kd_keras.nets import heads as heads_lib
from kd_keras.nets.heads import feature_batch_norm

VARIANTS = ("simreg", "regress", "regress_bn")


class _Untracked:
    """Holds objects out of Keras' attribute tracking.

    Teachers are frozen and reloaded from their source, so they must not appear in the
    method's weights or checkpoints (which would also multiply their size).
    """

    def __init__(self, items):
        self.items = tuple(items)


class SimReg(Method):
    """Feature-regression distillation of one or more frozen teachers into a student.

    For each teacher k a prediction head g_k maps the student's backbone features f_s [B, m] to
    the teacher's feature space [B, d_k]. The loss is the mean over teachers (paper Eq. 5) of

      simreg:     mean_b || g_k(f_s)/|g_k(f_s)| - f_t/|f_t| ||^2  (= 2 - 2 cos)
      regress:    mean_b || g_k(f_s) - f_t ||^2                    (unnormalised, linear head)
      regress_bn: mean_b || BN(g_k(f_s)) - BN(f_t) ||^2            (BN without affine params)

    Each head receives gradients only from its own teacher's term; the backbone from all.
    Teacher and student see the same view when the batch has no "teacher" entry.

    Args:
      student: keras.Model, images [B, H, W, 3] in [0, 1] -> features [B, m].
      teachers: sequence of `kd_keras.teachers.loading.Teacher` (frozen, called with training=False).
      heads: sequence of keras.Model, one per teacher, [B, m] -> [B, d_k].
      variant: "simreg", "regress" or "regress_bn".
      sync_bn: synchronise the Regress-BN feature BNs across replicas.
      weight_decay: see `Method`.

    Batches are dicts: "student" [B, H, W, 3] float32, optional "teacher" [B, H, W, 3], or
    optional "teacher_features" {teacher name: [B, d_k]} (any float dtype) read from teacher
    caches, in which case the teachers are not run.
    Logged: loss, loss_<teacher>; at evaluation also mse_<teacher> (the distance above
    per example, i.e. the SimReg loss for "simreg") and cos_<teacher>.
    """

    def __init__(self, student, teachers, heads, variant="simreg", sync_bn=False, **kwargs):
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(
                f"Unknown SimReg variant {variant!r} (--method); use one of {VARIANTS}."
            )
        teachers = tuple(teachers)
        heads = list(heads)
        if not teachers:
            raise ValueError("SimReg needs at least one teacher (--teacher).")
        if len(heads) != len(teachers):
            raise ValueError(f"Got {len(heads)} heads for {len(teachers)} teachers.")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(
                f"Teacher names must be unique, got {names}; set name=... in --teacher."
            )
        self.student = student
        self.heads = heads
        self._teachers = _Untracked(teachers)
        self.variant = variant
        student_dim = student.output_shape[-1]
        for teacher, head in zip(teachers, heads, strict=True):
            if head.input_shape[-1] != student_dim:
                raise ValueError(
                    f"Head for teacher {teacher.name!r} expects {head.input_shape[-1]} inputs but "
                    f"the student backbone gives {student_dim} features."
                )
            if head.output_shape[-1] != teacher.feature_dim:
                raise ValueError(
                    f"Head for teacher {teacher.name!r} outputs {head.output_shape[-1]} features "
                    f"but the teacher gives {teacher.feature_dim}."
                )
        if variant == "regress_bn":
            self.student_bns = [feature_batch_norm(f"bn_student_{n}", sync_bn) for n in names]
            self.teacher_bns = [feature_batch_norm(f"bn_teacher_{n}", sync_bn) for n in names]
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.teacher_loss_trackers = [keras.metrics.Mean(name=f"loss_{n}") for n in names]
        self.mse_trackers = [keras.metrics.Mean(name=f"mse_{n}") for n in names]
        self.cos_trackers = [keras.metrics.Mean(name=f"cos_{n}") for n in names]

    @property
    def teachers(self):
        return self._teachers.items

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            *self.teacher_loss_trackers,
            *self.mse_trackers,
            *self.cos_trackers,
        ]

    def call(self, images, training=False):
        """Head outputs for each teacher, list of [B, d_k]."""
        features = self.student(images, training=training)
        return [head(features, training=training) for head in self.heads]

    def build(self, input_shape=None):
        if input_shape is not None:
            dummy = tf.zeros([1, *input_shape[1:]])
            self.call(dummy)
            if self.variant == "regress_bn":
                for k, teacher in enumerate(self.teachers):
                    self.student_bns[k].build((None, teacher.feature_dim))
                    self.teacher_bns[k].build((None, teacher.feature_dim))
        self.built = True

    def _teacher_targets(self, data):
        cached = data.get("teacher_features")
        if cached is not None:
            # Features read from a teacher cache (kd_keras.teacher_cache): no teacher runs.
            missing = [t.name for t in self.teachers if t.name not in cached]
            if missing:
                raise ValueError(f"The batch has no cached features of teachers {missing}.")
            return [tf.stop_gradient(tf.cast(cached[t.name], tf.float32)) for t in self.teachers]
        images = data.get("teacher", data["student"])
        return [tf.stop_gradient(t(images)) for t in self.teachers]

    def _distances(self, predictions, targets, training):
        """Per-example distance to each teacher (the variant's loss before the batch mean):
        list of float32 [B]."""
        out = []
        for k, (pred, target) in enumerate(zip(predictions, targets, strict=True)):
            if self.variant == "simreg":
                out.append(losses.simreg_distances(pred, target))
            elif self.variant == "regress":
                out.append(losses.regress_distances(pred, target))
            else:
                pred = self.student_bns[k](tf.cast(pred, tf.float32), training=training)
                target = self.teacher_bns[k](tf.cast(target, tf.float32), training=training)
                out.append(losses.regress_distances(pred, target))
        return out

    def train_step(self, data):
        targets = self._teacher_targets(data)
        with tf.GradientTape() as tape:
            predictions = self(data["student"], training=True)
            per_teacher = [tf.reduce_mean(d) for d in self._distances(predictions, targets, True)]
            loss = tf.add_n(per_teacher) / len(per_teacher)
            scaled = self.scale_loss(loss, self.trainable_variables)
        self.apply_loss(tape, scaled, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        for tracker, value in zip(self.teacher_loss_trackers, per_teacher, strict=True):
            tracker.update_state(value)
        return {m.name: m.result() for m in [self.loss_tracker, *self.teacher_loss_trackers]}

    def test_step(self, data):
        targets = self._teacher_targets(data)
        predictions = self(data["student"], training=False)
        distances = self._distances(predictions, targets, False)
        per_teacher = [tf.reduce_mean(d) for d in distances]
        self.loss_tracker.update_state(tf.add_n(per_teacher) / len(per_teacher))
        for k, dist in enumerate(distances):
            self.teacher_loss_trackers[k].update_state(per_teacher[k])
            self.mse_trackers[k].update_state(dist)
            self.cos_trackers[k].update_state(losses.cosine_similarity(predictions[k], targets[k]))
        return {m.name: m.result() for m in self.metrics}


def build_simreg(ctx):
    """The registry's builder: one prediction head per teacher, then `SimReg`.

    Args:
      ctx: `kd_keras.methods.registry.BuildContext` (its cfg.method is the variant).
    """
    cfg = ctx.cfg
    student_dim = ctx.student.output_shape[-1]
    head_list = [
        heads_lib.prediction_head(
            student_dim,
            t.feature_dim,
            cfg.model.head,
            hidden_dims=cfg.model.head_hidden_dims,
            sync_bn=cfg.sync_bn,
            name=f"head_{t.name}",
            init=cfg.model.head_init,
            batch_norm=cfg.model.head_batch_norm,
        )
        for t in ctx.teachers
    ]
    return SimReg(
        ctx.student,
        ctx.teachers,
        head_list,
        variant=cfg.method,
        sync_bn=cfg.sync_bn,
        weight_decay=ctx.weight_decay,
        name=cfg.method,
    )
