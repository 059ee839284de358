"""CRD (Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020) with
its contrastive loss only, as SimReg's Table 3 (following CompRess) compares with it."""

import keras
import tensorflow as tf

from kd_keras import losses
from kd_keras.methods.base import num_replicas
from kd_keras.methods.memory_bank import IndexedMemory
from kd_keras.methods.single_teacher import SingleTeacherDistillation, global_mean
from kd_keras.nets import heads

# RepDistiller train_student.py defaults.
FEATURE_DIM = 128  # --feat_dim
NUM_NEGATIVES = 16_384  # --nce_k
TEMPERATURE = 0.07  # --nce_t
MEMORY_MOMENTUM = 0.5  # --nce_m


class CRD(SingleTeacherDistillation):
    """Contrastive representation distillation: NCE over a memory of every training sample.

    Student features go through the student head (CRD's ``embed_s``: Linear(m, 128), here
    `kd_keras.nets.heads.prediction_head`, so mlp2 / mlp4 heads are possible), teacher features
    through a trainable linear `teacher_embed` (CRD's ``embed_t``); both are l2-normalised.
    Two memories hold one row per training sample (`memory_bank.IndexedMemory`, indexed by the
    pipeline's "index"). Each step, for every sample b, K indices are drawn uniformly from
    [0, N) (RepDistiller's AliasMethod over uniform unigrams) behind the sample's own index,
    and (`kd_keras.losses.crd_loss`)

      loss = NCE(exp(s_b . M_t[idx_b] / T) / Z_s) + NCE(exp(t_b . M_s[idx_b] / T) / Z_t)

    with Z fixed on the first step to mean(exp(. / T)) x N (RepDistiller `crd/memory.py`,
    "set Z if haven't been set yet"). After the update the samples' rows move towards the new
    embeddings: M[i] = normalise(m M[i] + (1 - m) v) (momentum m = 0.5). The classification
    and KD terms of RepDistiller's student loss are left out (its ``-r 0 -a 0 -b 1``), which
    is what "CRD with just the contrastive loss" means in SimReg Sec. 4.

    Args:
      student, teacher, head: see `SingleTeacherDistillation` (the head maps to
        `feature_dim`).
      num_data: N, the number of training samples (indices of the pipeline in [0, N)).
      feature_dim: embedding size (128).
      num_negatives: K (16,384).
      temperature: T (0.07). momentum: memory momentum m (0.5).
      seed: seed of the memory initialisation and of the negative sampling.
      head_init: how the teacher embedding starts ("torch" / "keras", --head_init).

    Batches: as for `SingleTeacherDistillation`, plus "index" int [B]. Logged: loss.
    """

    def __init__(
        self,
        student,
        teacher,
        head,
        num_data,
        feature_dim=FEATURE_DIM,
        num_negatives=NUM_NEGATIVES,
        temperature=TEMPERATURE,
        momentum=MEMORY_MOMENTUM,
        seed=0,
        head_init="torch",
        **kwargs,
    ):
        super().__init__(student, teacher, head, **kwargs)
        if self.output_dim != feature_dim:
            raise ValueError(
                f"The CRD student head outputs {self.output_dim} features but --crd_feature_dim "
                f"is {feature_dim}."
            )
        if (
            isinstance(num_negatives, bool)
            or not isinstance(num_negatives, int)
            or num_negatives < 1
        ):
            raise ValueError(f"--crd_num_negatives must be >= 1, got {num_negatives!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"--crd_momentum must be in [0, 1), got {momentum}.")
        self.num_data = int(num_data)
        self.num_negatives = int(num_negatives)
        self.temperature = losses._positive("--crd_temperature", temperature)
        self.memory_momentum = float(momentum)
        self.seed = int(seed)
        self.teacher_embed = heads.prediction_head(
            int(self.teacher.feature_dim),
            feature_dim,
            "linear",
            name="teacher_embed",
            init=head_init,
        )
        self.student_memory = IndexedMemory(num_data, feature_dim, seed=seed, name="student_memory")
        self.teacher_memory = IndexedMemory(
            num_data, feature_dim, seed=None if seed is None else seed + 1, name="teacher_memory"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def build_memories(self):
        self.student_memory.build()
        self.teacher_memory.build()
        # Z of the student- and teacher-anchored terms; < 0 = not set yet (CRD's -1).
        self.normalizers = self.add_weight(
            shape=(2,),
            initializer=keras.initializers.Constant(-1.0),
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation="only_first_replica",
            name="normalizers",
        )

    def _contrast_indices(self, indices):
        """[b, K + 1] int32: each sample's own index, then K uniform draws from [0, N)."""
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context is not None else 0
        step = tf.cast(self.optimizer.iterations, tf.int64)
        stream = step * num_replicas() + tf.cast(replica, tf.int64)
        negatives = tf.random.stateless_uniform(
            [tf.shape(indices)[0], self.num_negatives],
            seed=tf.stack([tf.constant(self.seed, tf.int64), stream]),
            minval=0,
            maxval=self.num_data,
            dtype=tf.int32,
        )
        return tf.concat([tf.cast(indices, tf.int32)[:, None], negatives], axis=1)

    def _normalizer(self, k, embeddings, rows):
        """Stored Z_k, or on the first step mean(exp(v . m / T)) x N over the global batch."""
        probabilities = losses.crd_contrast_probabilities(embeddings, rows, self.temperature, 1.0)
        estimate = tf.stop_gradient(global_mean(tf.reduce_mean(probabilities))) * self.num_data
        stored = self.normalizers[k]
        return tf.where(stored < 0, estimate, stored)

    def _embeddings(self, data, training):
        student = self(data["student"], training=training)
        teacher = self.teacher_embed(self.teacher_features(data), training=training)
        return student, teacher

    def train_step(self, data):
        if "index" not in data:
            raise ValueError('CRD needs the dataset index of every sample ("index" in the batch).')
        contrast = self._contrast_indices(data["index"])
        student_rows = self.student_memory.gather(contrast)
        teacher_rows = self.teacher_memory.gather(contrast)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            student, teacher = self._embeddings(data, training=True)
            z_student = self._normalizer(0, student, teacher_rows)
            z_teacher = self._normalizer(1, teacher, student_rows)
            loss = losses.crd_loss(
                student,
                teacher,
                student_rows,
                teacher_rows,
                self.temperature,
                self.num_data,
                z_student,
                z_teacher,
            )
            scaled = self.scale_loss(loss, variables)
        self.apply_loss(tape, scaled, variables)
        self.normalizers.assign(tf.stack([z_student, z_teacher]))
        self.student_memory.update(data["index"], student, self.memory_momentum)
        self.teacher_memory.update(data["index"], teacher, self.memory_momentum)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        """Held-out CRD loss: the positive is the other network's embedding of the same image.

        Evaluation images have no rows in the training memories, so the positive row is
        replaced by the current embedding; the K negatives are memory rows as in training.
        """
        student, teacher = self._embeddings(data, training=False)
        negatives = self._contrast_indices(tf.zeros(tf.shape(student)[:1], tf.int32))[:, 1:]
        student_rows = tf.concat([student[:, None], self.student_memory.gather(negatives)], axis=1)
        teacher_rows = tf.concat([teacher[:, None], self.teacher_memory.gather(negatives)], axis=1)
        loss = losses.crd_loss(
            student,
            teacher,
            student_rows,
            teacher_rows,
            self.temperature,
            self.num_data,
            self._normalizer(0, student, teacher_rows),
            self._normalizer(1, teacher, student_rows),
        )
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def build_crd(ctx):
    """Registry builder of --method=crd (`BuildContext` -> CRD); needs the training-set size."""
    from kd_keras.methods.single_teacher import one_teacher, student_head

    cfg, o = ctx.cfg, ctx.options
    return CRD(
        ctx.student,
        one_teacher(ctx),
        student_head(ctx, o.crd_feature_dim),
        training_examples(cfg),
        feature_dim=o.crd_feature_dim,
        num_negatives=o.crd_num_negatives,
        temperature=o.crd_temperature,
        momentum=o.crd_momentum,
        seed=cfg.seed,
        head_init=cfg.model.head_init,
        weight_decay=ctx.weight_decay,
        name="crd",
    )


def training_examples(cfg):
    """N, the size of --train_split: CRD's memories hold one row per training example.

    Read from the split itself (image folders are listed, TFDS reads its metadata), so a
    method rebuilt from a checkpoint for evaluation gets the same memory shape as training.
    """
    from kd_keras.data import sources as data

    _, info = data.load_split(
        cfg.data.dataset,
        cfg.data.train_split,
        data_dir=cfg.data.data_dir,
        image_size_hint=cfg.data.image_size,
        download=cfg.data.download,
        verify=False,
    )
    return int(info.num_examples)
