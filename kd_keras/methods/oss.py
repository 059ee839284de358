"""OSS: online (or offline) distillation of a teacher into a student with SwAV's clustering
(appendix A.1 of the OSS paper; A.8 for the offline variant with a frozen teacher).

This follows the A.1 pseudo-code step by step:

  z, w   = normalize(h_T(f(x))), normalize(h_S(g(x)))             all 2 + V crops, [B(2+V), E]
  z~, w~ = the same through the heads' dropout pass                  the extra views
  scores = z C, z~ C, w C, w~ C                                      shared prototypes C [E, K]
  for i in the two large crops:
      q_i = sinkhorn(cat(queue_i C, scores_z[crop i]))[-B:]          teacher codes (+ queue)
      queue_i <- push z[crop i]                                      after its scores were taken
      L_T += sum_{v != i, v in 2(V+2) views} CE(q_i, softmax(cat(scores_z, scores_z~)[v] / T))
      L_S += the same with cat(scores_w, scores_w~)
      each divided by (2(2+V) - 2) and by 2
  loss = L_T + L_S + CE(D(GRL(cat(z, z~))), 0) + CE(D(GRL(cat(w, w~))), 1)
  one update of f, g, h_T, h_S, D and C; prototypes re-normalised.

Note the normaliser: the sum over v != i has 2(2+V) - 1 terms (the dropout twin of crop i is
included), while A.1 divides by 2(2+V) - 2; we keep A.1's value (see
`losses.swapped_prediction_loss`).
"""

import keras
import tensorflow as tf

from kd_keras import losses
from kd_keras.methods.base import Method
from kd_keras.methods.swav import (
    SwAVCodes,
    backbone_features,
    crop_groups,
    dropout_seed,
    freeze_prototype_gradients,
    per_view,
)
from kd_keras.optim import schedules

TEACHER, STUDENT = 0, 1


class _Network:
    """Backbone + projection head of one side (teacher or student); not a Keras object."""

    def __init__(self, backbone, head):
        self.backbone = backbone
        self.head = head

    def embed(self, groups, n_views, training, seed):
        """(z [n_views, B, E], z~ [n_views, B, E] or None) l2-normalised."""
        features = backbone_features(self.backbone, groups, training)
        z = losses.l2_normalize(self.head(features, training=training))
        z_drop = None
        if seed is not None:
            z_drop = losses.l2_normalize(self.head(features, training=training, dropout_seed=seed))
            z_drop = per_view(z_drop, n_views)
        return per_view(z, n_views), z_drop


class OSS(Method):
    """OSS online distillation (`online=True`) or its offline variant (A.8).

    Online: teacher and student are trained jointly; one optimizer updates both backbones,
    both projection heads, the feature classifier and the prototypes.
    Offline: the teacher backbone, its head and the prototypes are frozen (e.g. from a `swav`
    run); only the student learns, from L_S alone, with dropout on the student head only and
    no feature classifier.

    Args:
      teacher_backbone, student_backbone: keras.Models taking images of any side.
      teacher_head, student_head: `kd_keras.nets.heads.ProjectionHead`s with the same E.
      prototypes: `kd_keras.nets.clustering.Prototypes` (shared).
      queue: `kd_keras.nets.clustering.EmbeddingQueue` of teacher embeddings, or None.
      classifier: the feature classifier D (`kd_keras.nets.heads.feature_classifier`), online only;
        None (with `grl=None`) trains without it, Figure 5's "no feature classifier" ablation.
      grl: `kd_keras.nets.heads.GradientReversal` in front of D, online only.
      total_steps: N of the GRL schedule alpha(n) = -2 / (1 + exp(-10 n / N)) + 1.
      grl_scale: factor on alpha(n) (1 = the paper; smaller values weaken the reversed
        gradient the networks get, not the classifier's own training; a probe option).
      online: see above.
      temperature, epsilon, sinkhorn_iters, queue_start_step, freeze_prototypes_steps: as in
        `kd_keras.methods.SwAV`.
      use_dropout_views: add the dropout pass views (A.1); False drops them (an ablation).

    Logged: loss, loss_teacher (L_T), loss_student (L_S), loss_domain (both classifier
    cross-entropies), domain_accuracy, grl_alpha, queue_used.
    """

    def __init__(
        self,
        teacher_backbone,
        teacher_head,
        student_backbone,
        student_head,
        prototypes,
        queue=None,
        classifier=None,
        grl=None,
        total_steps=1,
        grl_scale=1.0,
        online=True,
        temperature=0.1,
        epsilon=0.05,
        sinkhorn_iters=3,
        queue_start_step=0,
        freeze_prototypes_steps=0,
        use_dropout_views=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if teacher_head.output_dim != student_head.output_dim:
            raise ValueError(
                f"teacher and student heads must have the same embedding size, got "
                f"{teacher_head.output_dim} and {student_head.output_dim} (--proj_dim)."
            )
        if teacher_head.output_dim != prototypes.dim:
            raise ValueError(
                f"the prototypes have dim {prototypes.dim} but the heads output "
                f"{teacher_head.output_dim} (--proj_dim)."
            )
        if online and (classifier is None) != (grl is None):
            raise ValueError("online OSS takes the feature classifier and its GRL layer together.")
        self.teacher_backbone = teacher_backbone
        self.teacher_head = teacher_head
        self.student_backbone = student_backbone
        self.student_head = student_head
        self.prototypes = prototypes
        self.queue = queue
        self.online = bool(online)
        self.classifier = classifier if online else None
        self.grl = grl if online else None
        self.total_steps = int(total_steps)
        self.grl_scale = float(grl_scale)
        self.temperature = float(temperature)
        self.freeze_prototypes_steps = int(freeze_prototypes_steps)
        self.use_dropout_views = bool(use_dropout_views)
        if not self.online:
            for layer in (teacher_backbone, teacher_head, prototypes):
                layer.trainable = False
        self.teacher_net = _Network(teacher_backbone, teacher_head)
        self.student_net = _Network(student_backbone, student_head)
        self.codes = SwAVCodes(prototypes, queue, epsilon, sinkhorn_iters, queue_start_step)
        names = ("loss", "loss_teacher", "loss_student", "loss_domain", "domain_accuracy")
        self.trackers = {n: keras.metrics.Mean(name=n) for n in names}
        self.trackers["grl_alpha"] = keras.metrics.Mean(name="grl_alpha")
        self.trackers["queue_used"] = keras.metrics.Mean(name="queue_used")

    @property
    def student(self):
        return self.student_backbone

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, images, training=False):
        return self.student_backbone(images, training=training)

    def build(self, input_shape=None):
        if input_shape is not None:
            dummy = tf.zeros([1, *input_shape[1:]])
            for net in (self.teacher_net, self.student_net):
                z = net.head(net.backbone(dummy))
            self.prototypes(z)
            if self.classifier is not None:
                self.classifier(self.grl(z))
        if self.queue is not None and not self.queue.built:
            self.queue.build()
        self.built = True

    def views_scores(self, z, z_drop):
        """[n_views (x2 with dropout views), B, K] scores: plain views, then dropout views."""
        views = z if z_drop is None else tf.concat([z, z_drop], axis=0)
        n, b, e = views.shape[0], tf.shape(views)[1], views.shape[2]
        return tf.reshape(self.prototypes(tf.reshape(views, [-1, e])), [n, b, -1]), views

    def compute_losses(self, batch, step, training=True):
        """All OSS terms of one batch (runs the queue update). Returns a dict of scalars."""
        groups, n_large, n_small = crop_groups(batch)
        n_views = n_large + n_small
        drop = self.use_dropout_views
        teacher_training = training and self.online
        z, z_drop = self.teacher_net.embed(
            groups,
            n_views,
            teacher_training,
            dropout_seed(step, TEACHER) if drop and self.online else None,
        )
        w, w_drop = self.student_net.embed(
            groups, n_views, training, dropout_seed(step, STUDENT) if drop else None
        )
        scores_z, views_z = self.views_scores(z, z_drop)
        scores_w, views_w = self.views_scores(w, w_drop)
        if not self.online:
            scores_z = tf.stop_gradient(scores_z)
        codes, used = self.codes(z, scores_z[:n_views], step, num_crops=min(2, n_large))
        total_views = scores_w.shape[0]
        # A.1's normaliser 2(2+V) - 2 with dropout views; SwAV's n - 1 without.
        denominator = total_views - 2 if drop else total_views - 1
        out = {
            "loss_student": losses.swapped_prediction_loss(
                codes, scores_w, self.temperature, denominator
            ),
            "queue_used": used,
        }
        if not self.online:
            out["loss"] = out["loss_student"]
            return out
        out["loss_teacher"] = losses.swapped_prediction_loss(
            codes, scores_z, self.temperature, denominator
        )
        out["loss"] = out["loss_teacher"] + out["loss_student"]
        if self.classifier is not None:
            out.update(self.domain_terms(views_z, views_w, step, training))
            out["loss"] = out["loss"] + out["loss_domain"]
        return out

    def domain_terms(self, views_z, views_w, step, training):
        """The feature classifier's cross-entropies (teacher 0, student 1) behind the GRL."""
        alpha = self.grl_scale * schedules.grl_alpha(step, self.total_steps)
        self.grl.set_alpha(alpha)
        flat = [tf.reshape(v, [-1, v.shape[-1]]) for v in (views_z, views_w)]
        d_t = self.classifier(self.grl(flat[0]), training=training)
        d_s = self.classifier(self.grl(flat[1]), training=training)
        ce_t, acc_t = losses.domain_classification_loss(d_t, TEACHER)
        ce_s, acc_s = losses.domain_classification_loss(d_s, STUDENT)
        return {
            "loss_domain": ce_t + ce_s,
            "domain_accuracy": 0.5 * (acc_t + acc_s),
            "grl_alpha": tf.cast(alpha, tf.float32),
        }

    def train_step(self, data):
        step = self.optimizer.iterations
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            terms = self.compute_losses(data, step, training=True)
            scaled = self.scale_loss(terms["loss"], variables)
        grads = self.gradients(tape, scaled, variables)
        grads = freeze_prototype_gradients(
            grads, variables, self.prototypes, step, self.freeze_prototypes_steps
        )
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items() if name in terms}
