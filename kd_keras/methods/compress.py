"""CompRess (Koohpayegani, Tejankar and Pirsiavash, "CompRess: Self-Supervised Learning by
Compressing Representations", NeurIPS 2020), variants 1q and 2q, with optional MLP heads
(SimReg's CompRess-1q/2q-4L-MLP, Table 3)."""

import keras
import tensorflow as tf

from kd_keras import choices, losses
from kd_keras.methods.memory_bank import FeatureBank
from kd_keras.methods.simreg import _Untracked
from kd_keras.methods.single_teacher import SingleTeacherDistillation

MODES = ("1q", "2q")

# CompRess train_student.py / train_student_one_queue.py defaults.
BANK_SIZE = 128_000  # --compress_memory_size
TEMPERATURE = 0.04  # --compress_t
MOMENTUM = 0.999  # --alpha of train_student.py (2q: momentum copy filling the student bank)
BANK_ROWS = choices.COMPRESS_BANK_ROWS


@keras.saving.register_keras_serializable(package="kd_keras")
class MomentumEncoder(keras.layers.Layer):
    """An exponential moving average of networks' trainable weights, run with their layers.

    CompRess-2q (`train_student.py`) fills the student bank with features of a "key" copy of
    the student: it starts as an exact copy (``moment_update(student, student_key, 0)``), is
    updated after every optimizer step as key = alpha * key + (1 - alpha) * student
    (``moment_update(..., opt.alpha)``, alpha = 0.999), and runs with its BatchNorm layers in
    training mode (``student_key.apply(set_bn_train)``: batch statistics). Here the copies are
    this layer's non-trainable weights (saved in checkpoints) and the key pass is the
    networks' `stateless_call` with those weights and `training=True`; its BN statistic
    updates are discarded, as the key's running statistics are never used.

    Args:
      networks: keras.Models applied in sequence (student backbone, then the head).
      momentum: alpha in [0, 1).
    """

    def __init__(self, networks, momentum=MOMENTUM, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"--compress_momentum must be in [0, 1), got {momentum}.")
        self._networks = _Untracked(networks)
        self.momentum = float(momentum)

    def build(self, input_shape=None):
        self.copies = []
        for n, network in enumerate(self._networks.items):
            copies = []
            for i, v in enumerate(network.trainable_variables):
                copy = self.add_weight(
                    shape=v.shape,
                    initializer="zeros",
                    dtype=v.dtype,
                    trainable=False,
                    autocast=False,
                    aggregation="only_first_replica",
                    name=f"key{n}_{i}",
                )
                copy.assign(v)
                copies.append(copy)
            self.copies.append(copies)
        self.built = True

    def call(self, x):
        for network, copies in zip(self._networks.items, self.copies, strict=True):
            x, _ = network.stateless_call(
                [tf.convert_to_tensor(c) for c in copies],
                [tf.convert_to_tensor(v) for v in network.non_trainable_variables],
                x,
                training=True,
            )
        return tf.stop_gradient(x)

    def update(self):
        """key <- momentum * key + (1 - momentum) * current weights (after the step)."""
        for network, copies in zip(self._networks.items, self.copies, strict=True):
            for copy, v in zip(copies, network.trainable_variables, strict=True):
                copy.assign(self.momentum * copy + (1.0 - self.momentum) * tf.cast(v, copy.dtype))


class CompRess(SingleTeacherDistillation):
    """CompRess: the student mimics the teacher's similarity distribution over anchors.

    Each step, with unit-normalised features and banks read BEFORE this step's push:

      1q: loss = KL(softmax(t . A_t / T) || softmax(s . A_t / T))   (one teacher bank A_t)
      2q: loss = KL(softmax(t . A_t / T) || softmax(s . A_s / T))   (teacher and student banks)

    (`kd_keras.losses.compress_loss`), then the teacher bank receives t and, for 2q, the
    student bank the features of the momentum key copy of student + head (`momentum` > 0,
    CompRess `train_student.py`) or the student's own features (`momentum` = 0, CompRess
    `train_student_without_momentum.py`). For 1q the student is scored against the teacher's
    anchors, so its features must live in the teacher's space: CompRess'
    `train_student_one_queue.py` adds a linear layer (``student.fc = nn.Linear(d_s, d_t)``),
    i.e. `head` = linear; mlp2 / mlp4 give CompRess-1q-MLP (SimReg Table 3). Plain 2q uses
    the backbone's features (`head=None`), 2q-4L-MLP an mlp4 head.

    Both banks start as CompRess' random rows (`memory_bank.uniform_initializer`) and are
    all-gathered FIFO banks (`memory_bank.FeatureBank`): identical on every replica, saved
    with the method's weights. Pushed rows are unit features; `bank_rows` says whether the
    loss normalises the rows it reads again ("unit", so the random initial rows count as unit
    vectors) or reads them as stored ("as_stored", CompRess' `SampleSimilarities`: the initial
    rows keep their drawn norms, 1 +- ~sqrt(0.8 / dim), until they are overwritten).

    Args:
      student, teacher, head: see `SingleTeacherDistillation`; 1q needs a head (or a
        student) whose output size is the teacher's feature size.
      mode: "1q" or "2q".
      bank_size: anchors K per bank (128,000); >= the global batch (`check_batch`).
      temperature: T (0.04).
      momentum: 2q key-encoder momentum alpha (0.999); 0 = no key copy.
      seed: bank initializer seed (None: Keras' global seed generator).
      bank_rows: "unit" (default) or "as_stored" (CompRess), see above.

    Batches: dicts with "student" images and optional "teacher" images or
    "teacher_features" {teacher name: [B, d_t]}. Logged: loss.
    """

    def __init__(
        self,
        student,
        teacher,
        head=None,
        mode="2q",
        bank_size=BANK_SIZE,
        temperature=TEMPERATURE,
        momentum=MOMENTUM,
        seed=None,
        bank_rows="unit",
        **kwargs,
    ):
        super().__init__(student, teacher, head, **kwargs)
        if mode not in MODES:
            raise ValueError(f"Unknown CompRess variant {mode!r}; use one of {MODES}.")
        if bank_rows not in BANK_ROWS:
            raise ValueError(f"--compress_bank_rows must be one of {BANK_ROWS}, got {bank_rows!r}.")
        self.mode = mode
        self.bank_rows = bank_rows
        self.temperature = losses._positive("--compress_temperature", temperature)
        teacher_dim = int(self.teacher.feature_dim)
        if mode == "1q" and self.output_dim != teacher_dim:
            raise ValueError(
                f"CompRess-1q scores the student against the teacher's bank, so the student "
                f"side must give {teacher_dim} features, got {self.output_dim}; use a head "
                "(--head=linear|mlp2|mlp4)."
            )
        self.teacher_bank = FeatureBank(
            bank_size, teacher_dim, "uniform", "--bank_size", seed=seed, name="teacher_bank"
        )
        self.student_bank = None
        self.key_encoder = None
        if mode == "2q":
            self.student_bank = FeatureBank(
                bank_size, self.output_dim, "uniform", "--bank_size", seed=seed, name="student_bank"
            )
            if momentum:
                networks = [self.student] + ([self.head] if self.head is not None else [])
                self.key_encoder = MomentumEncoder(networks, momentum, name="key_encoder")
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def build_memories(self):
        self.teacher_bank.build()
        if self.student_bank is not None:
            self.student_bank.build()
        if self.key_encoder is not None and not self.key_encoder.built:
            self.key_encoder.build()

    def check_batch(self, global_batch):
        """Raises ValueError (naming --bank_size) if a bank cannot take the global batch."""
        self.teacher_bank.check_batch(global_batch)

    def _loss(self, student_features, teacher_features):
        teacher_rows = self.teacher_bank.rows()
        student_rows = teacher_rows if self.mode == "1q" else self.student_bank.rows()
        return losses.compress_loss(
            student_features,
            teacher_features,
            student_rows,
            teacher_rows,
            self.temperature,
            normalise_banks=self.bank_rows == "unit",
        )

    def train_step(self, data):
        teacher_features = self.teacher_features(data)
        images = data["student"]
        # The key pass uses the key weights of the previous step, as the original's forward
        # runs before its optimizer step and momentum update.
        key_features = self.key_encoder(images) if self.key_encoder is not None else None
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            student_features = self(images, training=True)
            loss = self._loss(student_features, teacher_features)
            scaled = self.scale_loss(loss, variables)
        self.apply_loss(tape, scaled, variables)
        self.teacher_bank.push(teacher_features)
        if self.student_bank is not None:
            self.student_bank.push(key_features if key_features is not None else student_features)
        if self.key_encoder is not None:
            self.key_encoder.update()
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def build_compress(ctx):
    """Registry builder of --method=compress_1q / compress_2q (`BuildContext` -> CompRess)."""
    from kd_keras.methods.single_teacher import one_teacher, student_head

    cfg, o = ctx.cfg, ctx.options
    mode = cfg.method.rsplit("_", 1)[-1]
    teacher = one_teacher(ctx)
    head = None
    if o.compress_student_features == "head":
        head = student_head(ctx, int(teacher.feature_dim))
    model = CompRess(
        ctx.student,
        teacher,
        head,
        mode=mode,
        bank_size=o.bank_size,
        temperature=o.compress_temperature,
        momentum=o.compress_momentum if mode == "2q" else 0.0,
        seed=cfg.seed,
        bank_rows=o.compress_bank_rows,
        weight_decay=ctx.weight_decay,
        name=cfg.method,
    )
    model.check_batch(cfg.optim.batch_size)
    return model
